"""Test set-up and fixtures shared by every test module.

Eight simulated CPU devices let sharding tests build real meshes; the flag must be set before JAX
initialises its backend, hence here, before any test module imports jax.
"""

import gzip
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
