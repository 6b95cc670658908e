"""TPU chips and slices, and the devices of a slice for compiling ahead of time on any machine.

`get_slice("v5e-8")` names a slice the way `gcloud compute tpus tpu-vm create --accelerator-type`
does; `topology_devices(slice)` asks libtpu (the TPU compiler, `pip install -e ".[tpu]"`) for the
devices of that topology, without the hardware, to build a `Mesh` from and compile against.

Chip figures are Google's published per-chip specifications, each with its page. They feed the
roofline estimates of `transformer.plan`, never anything that trains.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

GB, GiB = 1e9, 2.0**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # the accelerator-type prefix: v4, v5e, v5p, v6e
    device_kind: str  # jax.Device.device_kind
    hbm_bytes: float
    peak_bf16_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # bidirectional inter-chip interconnect bandwidth per chip
    topology_prefix: str  # libtpu's topology names: "v5e:2x4"
    megacore: bool  # two TensorCores act as one device (v4, v5p); accelerator types count cores
    dims: int  # 3 for 3-D tori (v4, v5p), 2 for 2-D (v5e, v6e)


CHIPS = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB HBM2 at 1200 GBps. The page gives
    # no per-chip ICI figure; 6 links of 50 GB/s each way (Jouppi et al., ISCA 2023) = 600 GB/s.
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12, 1200 * GB, 600 * GB, "v4", True, 3),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GB HBM2 at 819 GBps, ICI 400 GBps.
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GB, 197e12, 819 * GB, 400 * GB, "v5e", False, 2),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GB HBM2e at 2765 GBps, ICI 1200 GBps.
    "v5p": Chip("v5p", "TPU v5", 95 * GB, 459e12, 2765 * GB, 1200 * GB, "v5", True, 3),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GB HBM at 1638 GBps, ICI 800 GBps.
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GB, 918e12, 1638 * GB, 800 * GB, "v6e", False, 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e"}

# Slice shapes (chips per dimension) by chip count, as Google's pages list them.
_SHAPES_3D = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


class TopologyError(ValueError):
    """An accelerator type or topology this module does not know, or no TPU compiler installed."""


@dataclasses.dataclass(frozen=True)
class Slice:
    chip: Chip
    shape: tuple[int, ...]  # chips per dimension

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def num_hosts(self) -> int:
        """TPU VMs: 4 chips each, except single-host v5e/v6e slices of up to 8 chips."""
        if not self.chip.megacore and self.num_chips <= 8:
            return 1
        return max(1, self.num_chips // 4)

    @property
    def topology(self) -> str:
        return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        return f"{self.chip.name}-{self.num_chips * (2 if self.chip.megacore else 1)}"

    def __str__(self) -> str:
        hosts = f"{self.num_hosts} host{'s' if self.num_hosts > 1 else ''}"
        return f"{self.accelerator_type} ({self.topology}: {self.num_chips} chips, {hosts})"


def get_slice(name: str) -> Slice:
    """A slice from an accelerator type ("v5e-8", "v5litepod-16", "v4-32": v4/v5p count TensorCores)
    or a topology ("v5e:2x4", "v4:2x2x4")."""
    text = name.strip().lower()
    topology = re.fullmatch(r"(v\d[a-z]*):(\d+(?:x\d+)*)", text)
    accelerator = re.fullmatch(r"(v\d[a-z]*)-(\d+)", text)
    if not (topology or accelerator):
        raise TopologyError(f"{name!r} is neither an accelerator type (e.g. v5e-8, v4-32) nor a topology "
                            f"(e.g. v5e:2x4); chips known: {', '.join(CHIPS)}.")
    prefix = (topology or accelerator).group(1)
    chip_name = _ALIASES.get(prefix, prefix)
    if topology and prefix == "v5":
        chip_name = "v5p"  # libtpu spells v5p topologies "v5:AxBxC"
    if chip_name not in CHIPS:
        raise TopologyError(f"unknown TPU chip {prefix!r} in {name!r}: choose one of {', '.join(CHIPS)}.")
    chip = CHIPS[chip_name]
    if topology:
        shape = tuple(int(d) for d in topology.group(2).split("x"))
        if len(shape) != chip.dims:
            raise TopologyError(f"{chip.name} topologies have {chip.dims} dimensions, not {name!r}.")
        return Slice(chip, shape)
    count = int(accelerator.group(2))
    chips = count // 2 if chip.megacore else count
    shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
    if (chip.megacore and count % 2) or chips not in shapes:
        sizes = sorted(c * (2 if chip.megacore else 1) for c in shapes)
        raise TopologyError(f"no {chip.name} slice {name!r}: sizes known are {chip.name}-" +
                            f", {chip.name}-".join(map(str, sizes)) + " (or give a topology such as "
                            f"{chip.topology_prefix}:{'x'.join(map(str, shapes[4]))}).")
    return Slice(chip, shapes[chips])


def have_compiler() -> bool:
    return importlib.util.find_spec("libtpu") is not None


INSTALL_HINT = ('the TPU compiler (libtpu) is not installed: pip install -e ".[tpu]" (it brings the libtpu '
                "that matches the installed jaxlib; it runs on any Linux x86-64 machine, no TPU needed).")


def topology_devices(slice_: Slice) -> list:
    """The devices of `slice_` as the TPU compiler sees them (one per chip), for `Mesh` and AOT compiles."""
    if not have_compiler():
        raise TopologyError(INSTALL_HINT)
    # On a machine that is not a TPU VM, these keep libtpu from probing for hardware and metadata.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Compiling only: several processes (test workers, a plan beside a run) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # noqa: PLC0415

    # Chips per host: the whole slice on one host, else 2x2x1 per TPU VM.
    host_bounds = (*slice_.shape, 1)[:3] if slice_.num_hosts == 1 else (2, 2, 1)
    topology = topologies.get_topology_desc(
        topology_name=slice_.topology, platform="tpu",
        chip_config_name="megacore" if slice_.chip.megacore else "default",
        chips_per_host_bounds=host_bounds, num_slices=1, wrap=(False,) * 3)
    devices = list(topology.devices)
    if len(devices) != slice_.num_chips:
        raise TopologyError(f"libtpu gave {len(devices)} devices for {slice_}, expected {slice_.num_chips}.")
    return devices
