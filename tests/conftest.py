"""Test set-up and fixtures shared by every test module.

Eight simulated CPU devices let sharding tests build real meshes, and programs compile without
LLVM's optimisation (FAST_COMPILE, below); the flags must be set before JAX initialises its backend,
hence here, before any test module imports jax. An `XLA_FLAGS` of the caller's replaces them.

Compiled programs go to a persistent cache in the repository (`.jax_test_cache/`, ignored by git):
many tests compile the same small model, in both xdist workers, in the subprocesses the end-to-end
tests start (they inherit these variables) and again in the slow run after the default one. XLA
compiles each once; the rest load it. The cache is keyed on the program, the compiler flags and
the devices, so a changed program recompiles. `JAX_COMPILATION_CACHE_DIR=` (empty) turns it off.
The TPU programs that tests/test_plan.py compiles for a topology are written too but cannot be read
back without a TPU: a later run warns ("Error reading persistent compilation cache entry ...
DeserializeLoadedExecutable") and compiles them again, as it would without the cache.
"""

import gzip
import os

# XLA:CPU aborts the process when a simulated device waits over 40 s (its default) for the others at a
# collective; eight devices sharing two cores with a second xdist worker may fall that far behind each
# other. A real deadlock, which XLA:CPU rarely hits (see crash_rerun.py), waits forever: 300 s ends it
# (it cost CI 20 minutes at 1,200 s) and crash_rerun runs its test again.
COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=300")
# LLVM's optimisation of the generated code is most of XLA:CPU's compile time for the tests' small
# programs, which buy nothing from it: without it the default suite ran 13:02 -> 8:20 cold on 2 cores
# (2026-12-06). A test that trains for minutes runs slower without it (the Multi30k end-to-end test,
# slow suite, 309 s -> 363 s), but the slow suite compiles much too and shares the default suite's
# cache only under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE} {COLLECTIVE_TIMEOUTS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".jax_test_cache"))
# Cache every program, however fast it compiled: the tests compile hundreds of small ones.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

# A test whose xdist worker dies (XLA's abort at a deadlocked collective) runs once more, and says so.
from crash_rerun import (  # noqa: E402, F401
    pytest_handlecrashitem,
    pytest_report_teststatus,
    pytest_terminal_summary,
)


@pytest.fixture(scope="session")
def multi30k_dir() -> str:
    """`<repo root>/../shared/data/multi30k` or $MULTI30K_DIR; missing data fails the test, loudly."""
    path = os.environ.get("MULTI30K_DIR") or os.path.join(REPO, "..", "shared", "data", "multi30k")
    if not os.path.isfile(os.path.join(path, "train.en.gz")):
        pytest.fail(f"Multi30k raw files not found in {path}: set MULTI30K_DIR to the directory holding train.en.gz.")
    return os.path.abspath(path)


@pytest.fixture(scope="session")
def read_lines(multi30k_dir):
    """`read_lines("train.en.gz", limit)`: the lines of a Multi30k raw file."""
    def read(name: str, limit: int | None = None) -> list[str]:
        with gzip.open(os.path.join(multi30k_dir, name), "rt", encoding="utf-8") as f:
            return f.read().splitlines()[:limit]
    return read


@pytest.fixture(scope="session")
def train_examples(read_lines):
    """`train_examples(n)`: the first n Multi30k training pairs as {"source": English, "target": German}."""
    def examples(n: int) -> list[dict]:
        pairs = zip(read_lines("train.en.gz", n), read_lines("train.de.gz", n))
        return [{"source": en, "target": de} for en, de in pairs]
    return examples
