"""Train (and evaluate) a Transformer: absl flags in, `training.train_and_evaluate` out.

    python -m experiments.train --config=experiments/configs/copy.py --workdir=/tmp/copy \
        --config.num_train_steps=200 --config.model.num_layers=1

Multi-process: set JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID
(as launch/slurm_multinode.sbatch does), or pass --distributed on TPU pod slices (auto-detected).
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from transformer import training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detect).")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(force: bool) -> None:
    """Joins a multi-process job when the environment (or --distributed) says there is one."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        jax.distributed.initialize(coordinator_address=address,
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif force:
        jax.distributed.initialize()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    initialize_distributed(_DISTRIBUTED.value)
    config = _CONFIG.value
    if config.get("prng_impl"):
        # e.g. "unsafe_rbg": much cheaper dropout masks than threefry on CPU and GPU.
        jax.config.update("jax_default_prng_impl", config.prng_impl)
    logging.info("Process %d of %d; devices: %s", jax.process_index(), jax.process_count(), jax.devices())
    training.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
