"""Compile a config for a TPU slice on this machine and say whether, and how fast, it will run there.

    python -m experiments.plan --config=experiments/configs/wmt14_ende_big.py --topology=v5e-8
    python -m experiments.plan --config=experiments/configs/wmt14_ende_base.py --topology=v4-32 \
        --config.data.batching=pack --config.data.batch_size=96

It builds the Trainer that `experiments.train` would build for the slice and compiles the train step,
the eval step and (translation) the beam-search decode with the TPU compiler, then prints per-chip
memory against HBM, compiled FLOPs and bytes, collectives, and a roofline estimate of step time,
tokens/s, MFU and time to `num_train_steps`. Exits 1 when a program does not fit, naming the levers.
Needs the TPU compiler: pip install -e ".[tpu]" (no TPU needed). Same --config.FIELD=VALUE
overrides as experiments.train; --topology takes an accelerator type (v5e-8, v4-32) or a topology.
"""

import logging
import os

from absl import flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU accelerator type (v4-8, v5e-8, v5p-8, v6e-8, v5e-32, ...) "
                                "or topology (v5e:2x4).")
_PROGRAMS = flags.DEFINE_list("programs", ["train", "eval", "decode"], "Which programs to compile.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
    del argv
    # Compile for the TPU on a host without one: JAX itself stays on the CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU found" is expected here
    from transformer import plan as plan_lib, tpu  # noqa: PLC0415 -- after JAX_PLATFORMS
    from transformer.run_config import TrainConfig  # noqa: PLC0415

    unknown = sorted(set(_PROGRAMS.value) - {"train", "eval", "decode"})
    if unknown:
        raise cli.UserError(f"--programs: unknown {unknown}; choose from train, eval, decode.")
    run = TrainConfig.from_dict(_CONFIG.value)
    try:
        slice_ = tpu.get_slice(_TOPOLOGY.value)
        result = plan_lib.plan(run, slice_, programs=tuple(_PROGRAMS.value))
    except (tpu.TopologyError, plan_lib.PlanError) as e:
        raise cli.UserError(str(e)) from e
    print(plan_lib.report(result), flush=True)
    if not result.all_fit:
        raise cli.UserError(plan_lib.not_fit_message(result))


if __name__ == "__main__":
    cli.run(main)
