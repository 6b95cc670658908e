"""Training curves of one or more runs, compared: loss, eval loss, BLEU, learning rate and tokens/s.

    python -m experiments.plot --workdir=runs/multi30k_hour       # -> runs/multi30k_hour/plots/training.png
    python -m experiments.plot --workdir=runs/a --workdir=runs/b --out=compare.png     # one line per run

Reads each workdir's metrics.jsonl and draws every metric against step and against wall-clock time
(each record's `wall_time`; for files from before it was logged, the sum of the step times) into
one PNG; a metric that no run logged is left out. --out is a .png file, or a directory that gets
training.png. Prints the path.
"""

import os

from absl import flags

from experiments import cli
from transformer import plots

_WORKDIRS = flags.DEFINE_multi_string("workdir", None, "Workdir of a training run; repeat it to compare runs.")
_OUT = flags.DEFINE_string("out", None, "A .png file or a directory (default, for one run: <workdir>/plots).")
flags.mark_flags_as_required(["workdir"])


def output_path(out: str | None, workdirs: list[str]) -> str:
    if out is None:
        if len(workdirs) > 1:
            raise cli.UserError("several runs: say where the plot goes with --out=FILE.png or --out=DIR.")
        out = os.path.join(workdirs[0], "plots")
    return out if out.lower().endswith(".png") else os.path.join(out, "training.png")


def main(argv):
    del argv
    workdirs = _WORKDIRS.value
    path = output_path(_OUT.value, workdirs)
    try:
        print(plots.plot_training(workdirs, path))
    except ValueError as e:  # no metric to plot
        raise cli.UserError(str(e)) from e


if __name__ == "__main__":
    cli.run(main)
