"""Average the parameters of a run's last N checkpoints into <workdir>/averaged (paper, Sec. 6.1).

    python -m experiments.average --workdir=DIR --num_checkpoints=5
"""

from absl import flags

from experiments import cli
from transformer import inference, runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_NUM = flags.DEFINE_integer("num_checkpoints", 5, "How many of the latest checkpoints to average.", lower_bound=1)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    runtime.initialize()
    steps, directory = inference.average_checkpoints(_WORKDIR.value, _NUM.value)
    print(f"Averaged checkpoints {steps} into {directory}/{steps[-1]}")


if __name__ == "__main__":
    cli.run(main)
