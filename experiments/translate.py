"""Translate sentences with a trained model: one input line in, one translation line out.

    echo "A man rides a bike." | python -m experiments.translate --workdir=DIR [--beam_size=4]
    python -m experiments.translate --workdir=DIR --input=FILE > out.txt

Empty lines give empty lines; inputs longer than the model's maximum length are truncated with a
warning.
"""

import sys

from absl import app, flags

from transformer import evaluation, inference, runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_INPUT = flags.DEFINE_string("input", None, "File of sentences, one per line (default: stdin).")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", ["latest", "averaged"], "Which checkpoint to use.")
_BEAM = flags.DEFINE_integer("beam_size", None, "Beam size (1 = greedy); default: the run's config.")
_ALPHA = flags.DEFINE_float("alpha", None, "Length penalty; default: the run's config.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Sentences per batch; default: the run's config.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    runtime.initialize()
    run, trainer, params, tokenizer, _ = inference.load_for_inference(_WORKDIR.value, _CHECKPOINT.value)
    if tokenizer is None:
        raise app.UsageError("experiments.translate needs a run trained on real text (it has a tokenizer).")
    if _INPUT.value:
        with open(_INPUT.value, encoding="utf-8") as f:
            lines = f.read().splitlines()
    else:
        lines = sys.stdin.read().splitlines()
    translator = evaluation.Translator.from_config(
        trainer.model, tokenizer, run.decode, max_input_length=run.data.max_length, sharding=trainer.batch_sharding,
        beam_size=_BEAM.value, alpha=_ALPHA.value, batch_size=_BATCH.value)
    with trainer.context():
        for translation in translator(params, lines):
            print(translation)


if __name__ == "__main__":
    app.run(main)
