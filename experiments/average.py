"""Average the parameters of a run's last N checkpoints into <workdir>/averaged (paper, Sec. 6.1).

    python -m experiments.average --workdir=DIR --num_checkpoints=5
"""

import os

from absl import app, flags, logging

from transformer import checkpointing, training

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_NUM = flags.DEFINE_integer("num_checkpoints", 5, "How many of the latest checkpoints to average.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    workdir = _WORKDIR.value
    _, trainer, _, _, _ = training.load_for_inference(workdir)
    source = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    steps = source.all_steps()[-_NUM.value:]
    if len(steps) < _NUM.value:
        logging.warning("Only %d checkpoints available (%s); averaging those.", len(steps), steps)
    state, step = checkpointing.average_params(source, trainer.abstract_state, steps)
    source.close()
    target = checkpointing.Checkpointer(os.path.join(workdir, "averaged"), keep=1)
    target.save(step, state)
    target.close()
    print(f"Averaged checkpoints {steps} into {target.directory}/{step}")


if __name__ == "__main__":
    app.run(main)
