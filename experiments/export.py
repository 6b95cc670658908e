"""Export a translation run as a Hugging Face MarianMT directory (PyTorch weights, tokenizer files).

    python -m experiments.export --workdir=runs/multi30k_hour --checkpoint=averaged --format=marian \
        --out=exports/multi30k_marian

Then, offline: `transformers.MarianMTModel.from_pretrained(OUT)` and
`transformers.MarianTokenizer.from_pretrained(OUT)`. The directory holds config.json,
generation_config.json (the run's beam size; its alpha as Hugging Face's power-form length
penalty), model.safetensors, source.spm = target.spm (the run's SentencePiece model), vocab.json and
tokenizer_config.json. A model Marian cannot express fails with one error listing every mismatch.
Needs the `marian` extra: pip install -e ".[marian]".
"""

from absl import flags

from experiments import cli
from transformer import inference, marian

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a translation run.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", list(inference.CHECKPOINTS), "Which checkpoint to export.")
_STEP = flags.DEFINE_integer("step", None, "A saved step other than the newest.", lower_bound=0)
_FORMAT = flags.DEFINE_enum("format", "marian", ["marian"], "Target format (Hugging Face MarianMT).")
_OUT = flags.DEFINE_string("out", None, "Directory to write (created; files in it are replaced).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    del argv
    config = marian.export_workdir(_WORKDIR.value, _OUT.value, _CHECKPOINT.value, _STEP.value)
    print(f"Wrote a MarianMT model ({config['encoder_layers']}+{config['decoder_layers']} layers, d_model "
          f"{config['d_model']}, vocabulary {config['vocab_size']}) to {_OUT.value}")
    if config["norm_epsilon_trained"] != marian.MARIAN_NORM_EPSILON:
        print(f"Note: the run's LayerNorm epsilon is {config['norm_epsilon_trained']:g}, Marian's "
              f"{marian.MARIAN_NORM_EPSILON:g}: "
              "logits differ by ~1e-4 (they are equal to ~1e-5 for a model trained with model.norm_epsilon=1e-5).")


if __name__ == "__main__":
    cli.run(main)
