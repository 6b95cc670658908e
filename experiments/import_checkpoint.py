"""Import a Hugging Face MarianMT directory as a workdir to fine-tune, translate with, or evaluate.

    python -m experiments.import_checkpoint --format=marian --from=DIR --workdir=runs/imported \
        [--config=experiments/configs/multi30k.py:hour]
    python -m experiments.train --config=experiments/configs/workdir.py:runs/imported --workdir=runs/imported \
        --config.num_train_steps=1000                                                   # fine-tune
    echo "A man rides a bike." | python -m experiments.translate --workdir=runs/imported

The workdir gets config.json (the --config recipe: data, optimizer, decoding; with the model
fields of the Marian model), spm.model (the Marian directory's SentencePiece model) and a step-0
checkpoint of its weights with a fresh optimizer. The Marian vocabulary must be its SentencePiece
model's own ids with pad, eos, unk at 0, 1, 2 (as this project's exports are); anything else that
the EncoderDecoder cannot express fails with one error listing every mismatch. Needs the
`marian` extra (safetensors; torch for pytorch_model.bin).
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli
from transformer import marian, runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/multi30k.py:hour", "Recipe for fine-tuning (its model fields are replaced).",
    lock_config=False)
_FROM = flags.DEFINE_string("from", None, "A MarianMT directory (config.json, model.safetensors, source.spm, "
                            "vocab.json).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The new workdir (must hold no checkpoints).")
_FORMAT = flags.DEFINE_enum("format", "marian", ["marian"], "Source format (Hugging Face MarianMT).")
flags.mark_flags_as_required(["from", "workdir"])


def main(argv):
    del argv
    config = _CONFIG.value
    runtime.initialize(config.prng_impl)
    run = marian.import_workdir(flags.FLAGS["from"].value, _WORKDIR.value, config)
    m = run.model
    print(f"Imported a MarianMT model ({m.num_encoder_layers}+{m.num_decoder_layers} layers, d_model {m.d_model}, "
          f"vocabulary {m.vocab_size}) into {_WORKDIR.value} as step 0.")


if __name__ == "__main__":
    cli.run(main)
