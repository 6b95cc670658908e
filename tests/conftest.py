"""Test set-up shared by every test module.

Eight simulated CPU devices let sharding tests build real meshes; the flag must be set before JAX
initialises its backend, hence here, before any test module imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
