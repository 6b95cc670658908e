"""Process-wide set-up shared by every entry point: joining a multi-process job, the PRNG, host memory.

Call `initialize` first thing in a `main`, before anything touches a JAX device.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys

import jax
from absl import logging

_joined = False


def initialize(prng_impl: str = "", *, distributed: bool = False, heartbeat_timeout_seconds: int = 100) -> None:
    """Joins a multi-process job when the environment (or `distributed`) says there is one; sets the PRNG.

    Multi-process: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID (as
    launch/slurm_multinode.sbatch sets them), or `distributed=True` on TPU pod slices and other
    clusters JAX detects by itself. `prng_impl` (e.g. "unsafe_rbg", much cheaper dropout masks than
    threefry on CPU and GPU) becomes jax_default_prng_impl; "" keeps JAX's default. A checkpoint's
    PRNG state must be restored under the implementation it was saved with.

    `heartbeat_timeout_seconds` bounds how long the other processes wait for one that died (kill -9,
    a lost host) before they stop with an error instead of hanging in a collective.
    """
    global _joined
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not _joined and (address or distributed):
        if address:
            jax.distributed.initialize(coordinator_address=address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                       process_id=int(os.environ["JAX_PROCESS_ID"]),
                                       heartbeat_timeout_seconds=heartbeat_timeout_seconds)
        else:
            jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
        _joined = True
    use_prng_impl(prng_impl)
    logging.info("Process %d of %d; devices: %s", jax.process_index(), jax.process_count(), jax.devices())


def trace_platform() -> str:
    """The platform the computation being traced is for: the devices' of the mesh in context (an AOT
    topology's included), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if device is not None and device.platform:
        return device.platform
    return jax.default_backend()


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
KEEP_HOST_MEMORY_ENV = "TRANSFORMER_KEEP_HOST_MEMORY"
_host_memory_kept = False


def cpu_only_host() -> bool:
    """Whether JAX will compute on this host's CPU: JAX_PLATFORMS names only "cpu", or, unset, no
    TPU, NVIDIA or AMD GPU device file is present. Decided without starting a JAX backend."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    return not any(glob.glob(pattern) for pattern in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*",
                                                       "/dev/kfd"))


def keep_freed_host_memory() -> bool:
    """On a CPU-only Linux host, has glibc's malloc keep the memory a train step frees for the next
    step, instead of handing it back to the kernel and taking it again. True if set; False on a host
    with an accelerator, off glibc, or with TRANSFORMER_KEEP_HOST_MEMORY=0.

    XLA's CPU backend allocates each execution's scratch space as one block (~380 MiB for a
    Multi30k train step) from a thread of its pool. glibc serves a block that large from a fresh
    `mmap` and unmaps it on `free`, so every step took ~97k page faults and the kernel zeroed the
    block anew: ~200 ms of system time per ~550 ms step on 2 cores. With one malloc arena, no
    `mmap` for allocations and no trimming, the block comes from the heap and stays there (no faults
    after the first ~6 steps). The cost: the process keeps its peak heap until it exits (resident
    2.8 GiB instead of 1.3 GiB for that step), as TensorFlow's and PyTorch's recommended
    allocators (tcmalloc, jemalloc) also do, and all threads share one arena, which a many-core
    accelerator host feeding its devices from many input threads should not (hence CPU-only). Call
    it before JAX starts its threads (the first use of a device): threads that already have an
    arena keep it.
    """
    if (os.environ.get(KEEP_HOST_MEMORY_ENV, "1") == "0" or not sys.platform.startswith("linux")
            or not cpu_only_host()):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    # mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 means no limit. The
    # largest positive int, 2**31 - 1, let a base-sized step at a 32k vocabulary (more than 2 GiB
    # freed at the top of the heap) hand its memory back every step: ~1.4 GiB faulted in again a
    # step, 0.64x torch's step rate instead of 0.98x (2026-12-01).
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    global _host_memory_kept
    _host_memory_kept = all([mallopt(param, value) == 1 for param, value in settings])
    return _host_memory_kept


def host_memory_kept() -> bool:
    """Whether `keep_freed_host_memory` took effect in this process (benchmarks print it)."""
    return _host_memory_kept


def use_prng_impl(prng_impl: str) -> None:
    """Makes `prng_impl` ("" = JAX's default, threefry) the implementation of new PRNG keys."""
    jax.config.update("jax_default_prng_impl", prng_impl or "threefry2x32")


@functools.cache
def cpu_has_fast_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this Linux CPU has bfloat16 matrix instructions (AMX or AVX-512 BF16), from the flags
    in `cpuinfo`; None if unknown."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"amx_bf16", "avx512_bf16"} & set(flags))


def fast_compute_dtype(platform: str) -> str:
    """The compute dtype that `ModelConfig.dtype="auto"` takes on `platform` ("cpu", "tpu", "gpu"...):
    bfloat16 on accelerators and on CPUs with bfloat16 matrix instructions (AMX, AVX-512 BF16),
    float32 on other CPUs (and where the CPU's flags cannot be read), whose 16-bit products XLA
    emulates: on a 2-core AVX2 EPYC the Multi30k train step ran at 0.73x float32's rate in
    bfloat16 (2026-12-03, docs/speed.md)."""
    if platform != "cpu":
        return "bfloat16"
    return "bfloat16" if cpu_has_fast_bfloat16() else "float32"


def warn_if_slow_dtype(dtype: str) -> None:
    """Logs a warning when `dtype` is 16-bit compute on a CPU backend without bfloat16 instructions,
    where XLA emulates it (no faster than float32, often slower)."""
    if dtype == "float32" or jax.default_backend() != "cpu" or cpu_has_fast_bfloat16() is not False:
        return
    logging.warning("ModelConfig.dtype=%s on a CPU without AMX or AVX-512 BF16: 16-bit products are emulated "
                    "here, no faster than float32. Consider --config.model.dtype=float32.", dtype)
