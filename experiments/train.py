"""Train (and evaluate) a Transformer: absl flags in, `training.train_and_evaluate` out.

    python -m experiments.train --config=experiments/configs/copy.py --workdir=/tmp/copy \
        --config.num_train_steps=200 --config.model.num_layers=1

Multi-process: set JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID
(as launch/slurm_multinode.sbatch does), or pass --distributed on TPU pod slices (auto-detect).
"""


from absl import flags
from ml_collections import config_flags

from experiments import cli
from transformer import runtime, training
from transformer.run_config import TrainConfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detect).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_seconds", 100, "Multi-process: after this long without word "
                                  "from a process, the others stop with an error.", lower_bound=1)
_RESTART_DATA = flags.DEFINE_bool("restart_data", False, "Resume even if the checkpoint's input-pipeline position "
                                  "is missing or damaged, starting the data from its beginning.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    config = _CONFIG.value
    run = TrainConfig.from_dict(config)  # a bad field fails here, before any device is touched
    runtime.initialize(run.prng_impl, distributed=_DISTRIBUTED.value, heartbeat_timeout_seconds=_HEARTBEAT.value)
    training.train_and_evaluate(config, _WORKDIR.value, restart_data=_RESTART_DATA.value)


if __name__ == "__main__":
    cli.run(main)
