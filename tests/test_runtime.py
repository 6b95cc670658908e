"""runtime.keep_freed_host_memory: a large block freed by one step is reused by the next, not faulted in again."""

import os
import subprocess
import sys

import pytest

from transformer import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")

# In a fresh interpreter: import the entry points' package (which keeps freed memory unless told not
# to), then allocate, touch and free a block of argv[1] bytes five times from a second thread, as
# XLA's CPU backend does with its scratch space; print the minor page faults of the last four rounds.
_PROBE = """
import ctypes, resource, sys, threading
import experiments

size = int(sys.argv[1])

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def step():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # touch every page
    libc.free(block)

faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    thread = threading.Thread(target=step)
    thread.start()
    thread.join()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
from transformer import runtime
print(runtime.host_memory_kept(), sum(faults[1:]))
"""


def _faults(keep: str, size: int) -> int:
    env = {**os.environ, runtime.KEEP_HOST_MEMORY_ENV: keep, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _PROBE, str(size)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    kept, faults = result.stdout.split()[-2:]
    assert kept == str(keep == "1")
    return int(faults)


@glibc_only
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    pages = (64 << 20) // 4096  # 16,384 pages of 4 KiB a round
    assert _faults("0", 64 << 20) > 3 * pages  # the control: glibc maps and unmaps the block every round
    assert _faults("1", 64 << 20) < pages // 4  # kept: the rounds after the first reuse the heap


@glibc_only
def test_blocks_over_2_gib_are_kept_too():
    # A base-sized step at a 32k vocabulary frees more than 2 GiB at the top of the heap; a trim
    # threshold of 2**31 - 1 (the largest positive int mallopt takes) handed it back every step.
    size = (9 << 30) // 4  # 2.25 GiB
    pages = size // 4096
    assert _faults("1", size) < pages // 4


def test_turned_off_by_its_variable(monkeypatch):
    monkeypatch.setenv(runtime.KEEP_HOST_MEMORY_ENV, "0")
    assert runtime.keep_freed_host_memory() is False


@pytest.mark.parametrize("platforms,cpu_only", [("cpu", True), ("cpu,", True), ("tpu", False), ("cuda,cpu", False)])
def test_cpu_only_host_reads_jax_platforms(monkeypatch, platforms, cpu_only):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert runtime.cpu_only_host() is cpu_only


def test_an_accelerator_host_is_left_alone(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert runtime.keep_freed_host_memory() is False


@pytest.mark.parametrize("platform,fast_bf16,dtype", [
    ("tpu", False, "bfloat16"), ("gpu", None, "bfloat16"),
    ("cpu", True, "bfloat16"), ("cpu", False, "float32"), ("cpu", None, "float32")])
def test_auto_dtype_is_bfloat16_only_where_it_is_fast(monkeypatch, platform, fast_bf16, dtype):
    monkeypatch.setattr(runtime, "cpu_has_fast_bfloat16", lambda: fast_bf16)
    assert runtime.fast_compute_dtype(platform) == dtype


@pytest.mark.parametrize("flags,fast", [("fpu avx2 fma", False), ("fpu avx512f avx512_bf16", True),
                                        ("fpu amx_bf16 amx_tile", True), (None, None)])
def test_the_cpu_flags_are_read_from_cpuinfo(tmp_path, flags, fast):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n" + (f"flags\t\t: {flags}\n" if flags else ""))
    assert runtime.cpu_has_fast_bfloat16(str(cpuinfo)) is fast
    assert runtime.cpu_has_fast_bfloat16(str(tmp_path / "missing")) is None
