"""Score a stream language model (data.batching="stream") segment by segment, at several
Transformer-XL evaluation memory lengths: loss, perplexity and bits per token (per character with
a "char" vocabulary).

    python -m experiments.evaluate_lm --workdir=runs/char_lm_xl --eval_memory_length=0,64,192,448
"""

from absl import flags

from experiments import cli
from transformer import inference, runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a stream language-model run.")
_SPLIT = flags.DEFINE_string("split", None, "Split to score (default: the run's eval split).")
_MEMORY = flags.DEFINE_list("eval_memory_length", ["0"], "Evaluation memory lengths (0 = no memory).")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", list(inference.CHECKPOINTS), "Which checkpoint to score.")
_STEP = flags.DEFINE_integer("step", None, "A saved step other than the newest.", lower_bound=0)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    runtime.initialize()
    lengths = [int(m) for m in _MEMORY.value]
    for r in inference.evaluate_stream(_WORKDIR.value, lengths, _SPLIT.value, _CHECKPOINT.value, step=_STEP.value):
        print(f"{r['split']} step {r['step']} eval memory {r['eval_memory_length']}: loss {r['loss']:.4f}  "
              f"perplexity {r['perplexity']:.3f}  bits/token {r['bits_per_token']:.4f}")


if __name__ == "__main__":
    cli.run(main)
