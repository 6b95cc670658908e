"""What every entry point shares: flag parsing and errors that end in one line, not a traceback.

A user's mistake (a bad flag or config field, a missing workdir or file, a damaged checkpoint, a
workdir in use, a diverged run, a full disk) ends the command with exit code 1 and one line on
stderr starting with "Error:". Anything else is a bug and keeps its traceback.
"""

import sys

from absl import app, flags

from transformer import checkpointing, training, workdir
from transformer.run_config import ConfigError


class UserError(Exception):
    """A mistake in what the user asked for; its message says what to do instead."""


USER_ERRORS = (UserError, ConfigError, checkpointing.CheckpointError, workdir.WorkdirError, training.TrainingDiverged,
               OSError)


def fail(message: str):
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()
    sys.exit(1)


def parse_alphas(values) -> list:
    """--alphas as floats (none given: [None], the config's alpha)."""
    try:
        alphas = [float(v) for v in values]
    except ValueError:
        raise UserError(f"--alphas={','.join(values)}: give length penalties as numbers, e.g. 0.6,0.8,1.0.")
    if any(a < 0 for a in alphas):
        raise UserError(f"--alphas={','.join(values)}: length penalties must be >= 0.")
    return alphas or [None]


def parse_flags(argv):
    """absl's parsing, with ml_collections' errors (an unknown or ill-typed config field) as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e}. Pass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # from --config.FIELD=VALUE overrides
        fail("bad --config override: " + str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'"))


def run(main):
    """`app.run(main)` with one-line errors for user mistakes."""
    def guarded(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}: every option is a --flag.")
        try:
            return main(argv)
        except USER_ERRORS as e:
            fail(str(e))

    app.run(guarded, flags_parser=parse_flags)
