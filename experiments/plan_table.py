"""The README's table: `experiments.plan` for several configs on several TPU slices, as Markdown.

    python -m experiments.plan_table \
        --configs=experiments/configs/wmt14_ende_base.py,experiments/configs/wmt14_ende_big.py \
        --topologies=v4-8,v5e-8,v5p-8,v6e-8,v5e-32

Each cell is a compile with the TPU compiler (minutes for the paper's models on a CPU). On a
multi-host slice a config that buckets by tokens (single-host only) is planned with packed rows
of the same size instead, and the row says so. Figures besides memory are roofline estimates.
"""

import importlib.util
import logging
import os

from absl import flags

from experiments import cli

_CONFIGS = flags.DEFINE_list("configs", None, "Config files (a config file's argument after ':').")
_TOPOLOGIES = flags.DEFINE_list("topologies", ["v4-8", "v5e-8", "v5p-8", "v6e-8", "v5e-32"], "TPU slices.")
flags.mark_flags_as_required(["configs"])


def load_config(path: str):
    """`get_config()` of a config file, "file.py:ARG" passing ARG, as --config=path would."""
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(file))[0], file)
    if spec is None or not os.path.isfile(file):
        raise cli.UserError(f"no config file {file!r}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def main(argv):
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from transformer import plan as plan_lib, tpu  # noqa: PLC0415
    from transformer.run_config import TrainConfig  # noqa: PLC0415

    rows = ["| config | slice | fits | memory per chip (train step) | est. step | est. tokens/s | est. MFU | "
            "est. time to num_train_steps |", "|---|---|---|---|---|---|---|---|"]
    for path in _CONFIGS.value:
        config = load_config(path)
        name = os.path.splitext(os.path.basename(path.split(":")[0]))[0]
        for topology in _TOPOLOGIES.value:
            slice_ = tpu.get_slice(topology)
            run_config, note = config, ""
            if slice_.num_hosts > 1 and config.data.get("batching") == "bucket":
                single = plan_lib.train_batch_shape(TrainConfig.from_dict(config), 8)
                run_config = config.copy_and_resolve_references()
                run_config.data.batching = "pack"
                run_config.data.batch_size = single.rows
                run_config.data.tokens_per_batch = None
                note = f" (packed, {single.rows} x {single.length})"
            p = plan_lib.plan(TrainConfig.from_dict(run_config), slice_, log=lambda _: None)
            print(plan_lib.report(p), flush=True)
            train = p.programs[0]
            worst = max(p.programs, key=lambda prog: prog.total_bytes)
            fits = "yes" if p.all_fit else f"no ({worst.name})"
            memory = ("over HBM" if train.out_of_memory else
                      f"{train.total_bytes / tpu.GiB:.1f} of {slice_.chip.hbm_bytes / tpu.GiB:.0f} GiB")
            if p.all_fit:  # from perfect overlap of compute and memory traffic to none
                fast, slow = p.estimate(True), p.estimate(False)
                cells = [f"{fast['step_seconds'] * 1e3:.0f}-{slow['step_seconds'] * 1e3:.0f} ms",
                         f"{slow['tokens_per_second'] / 1e3:,.0f}k-{fast['tokens_per_second'] / 1e3:,.0f}k",
                         f"{100 * slow['mfu']:.0f}-{100 * fast['mfu']:.0f}%",
                         f"{plan_lib.duration(fast['hours'])} - {plan_lib.duration(slow['hours'])}"]
            else:
                cells = ["-"] * 4
            rows.append(f"| {name} | {slice_.accelerator_type}{note} | {fits} | {memory} | " + " | ".join(cells) + " |")
            print("\n".join(rows), flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    cli.run(main)
