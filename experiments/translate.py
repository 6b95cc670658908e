"""Translate sentences with a trained model: one input line in, one translation line out.

    echo "A man rides a bike." | python -m experiments.translate --workdir=DIR [--beam_size=4]
    python -m experiments.translate --workdir=DIR --input=FILE > out.txt

Output streams: translations are written (in input order) after every chunk of input lines, so an
interrupted job keeps what it did. Empty or blank lines give empty lines; inputs longer than the
model's maximum length are truncated with a warning; bytes that are not UTF-8 are replaced (U+FFFD),
with a warning naming the line.
"""

import itertools
import sys

from absl import flags, logging

from experiments import cli
from transformer import evaluation, inference, runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_INPUT = flags.DEFINE_string("input", None, "File of sentences, one per line (default: stdin).")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", ["latest", "averaged"], "Which checkpoint to use.")
_STEP = flags.DEFINE_integer("step", None, "A saved step other than the newest.", lower_bound=0)
_BEAM = flags.DEFINE_integer("beam_size", None, "Beam size (1 = greedy); default: the run's config.",
                             lower_bound=1, upper_bound=64)
_ALPHA = flags.DEFINE_float("alpha", None, "Length penalty (>= 0); default: the run's config.", lower_bound=0.0)
_BATCH = flags.DEFINE_integer("batch_size", None, "Sentences per batch; default: the run's config.", lower_bound=1)
_CHUNK_BATCHES = 8  # batches per streamed chunk: long enough to sort by length, short enough to stream
flags.mark_flags_as_required(["workdir"])


def read_lines(stream):
    """Lines of a binary stream as text; undecodable bytes become U+FFFD, with a warning."""
    for number, raw in enumerate(stream, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            logging.warning("Line %d is not valid UTF-8: undecodable bytes replaced by U+FFFD.", number)
            line = raw.decode("utf-8", errors="replace")
        yield line.rstrip("\r\n")


def main(argv):
    del argv
    runtime.initialize()
    run, trainer, params, tokenizer, _ = inference.load_for_inference(_WORKDIR.value, _CHECKPOINT.value, _STEP.value)
    if tokenizer is None or run.decode is None:
        raise cli.UserError(f"{_WORKDIR.value} holds a {run.objective!r} run on {run.data.name!r} data: translating "
                            "needs a translation run trained on real text.")
    stream = open(_INPUT.value, "rb") if _INPUT.value else sys.stdin.buffer
    translator = evaluation.Translator.from_config(
        trainer.model, tokenizer, run.decode, max_input_length=run.data.max_length, sharding=trainer.batch_sharding,
        beam_size=_BEAM.value, alpha=_ALPHA.value, batch_size=_BATCH.value)
    lines = read_lines(stream)
    with trainer.context(), stream:
        while chunk := list(itertools.islice(lines, translator.batch_size * _CHUNK_BATCHES)):
            for translation in translator(params, chunk):
                sys.stdout.write(translation + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    cli.run(main)
