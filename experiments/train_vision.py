"""Train and evaluate a Vision Transformer: absl flags in, `vision_training.train_and_evaluate` out.

    python -m experiments.train_vision --config=experiments/configs/vit_digits.py --workdir=/tmp/vit_digits
    python -m experiments.train_vision --config=experiments/configs/vit_cifar10.py:S --workdir=runs/vit_s_cifar10

Running the same command again resumes from the workdir's newest checkpoint. Test accuracy and
loss end up in <workdir>/results.json; the curves in <workdir>/metrics.jsonl (and TensorBoard).
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli
from transformer import vision_training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    config = _CONFIG.value
    vision_training.VisionTrainConfig.from_dict(config)  # a bad field fails here, before any device is touched
    results = vision_training.train_and_evaluate(config, _WORKDIR.value)
    print(f"test accuracy {results['test_accuracy']:.4f} ({results['test_examples']} images) at step "
          f"{results['step']}; {_WORKDIR.value}/results.json")


if __name__ == "__main__":
    cli.run(main)
