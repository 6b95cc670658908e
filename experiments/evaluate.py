"""Score a trained translation model on a split: sacreBLEU (cased and lowercased) and perplexity.

    python -m experiments.evaluate --workdir=DIR --split=test_2016_flickr [--checkpoint=averaged]

Writes <workdir>/eval/<split>.<checkpoint>.txt (one translation per line) and .json (the scores).
"""

from absl import flags

from experiments import cli
from transformer import inference, runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_SPLIT = flags.DEFINE_string("split", "validation", "Split of the run's dataset to score.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", list(inference.CHECKPOINTS), "Which checkpoint to score.")
_STEP = flags.DEFINE_integer("step", None, "A saved step other than the newest.", lower_bound=0)
_BEAM = flags.DEFINE_integer("beam_size", None, "Beam size (1 = greedy); default: the run's config.",
                             lower_bound=1, upper_bound=64)
_ALPHA = flags.DEFINE_float("alpha", None, "Length penalty (>= 0); default: the run's config.", lower_bound=0.0)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    runtime.initialize()
    result = inference.evaluate_split(_WORKDIR.value, _SPLIT.value, _CHECKPOINT.value, _BEAM.value, _ALPHA.value,
                                      step=_STEP.value)
    print(f"{result['split']} ({result['checkpoint']} checkpoint, step {result['step']}, "
          f"beam {result['beam_size']}): BLEU {result['bleu']:.2f}  lowercased BLEU {result['bleu_lc']:.2f}  "
          f"perplexity {result['perplexity']:.2f}  length ratio {result['length_ratio']:.3f}  "
          f"({result['sentences_per_s']:.1f} sentences/s)")
    print(f"sacreBLEU signature: {result['signature']}")
    print(f"sacreBLEU signature (lowercased): {result['signature_lc']}")


if __name__ == "__main__":
    cli.run(main)
