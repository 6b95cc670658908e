"""Entry points (`python -m experiments.NAME`) and their configs.

Importing the package has one side effect, on a CPU-only Linux host with glibc: freed host memory
is kept for reuse (`transformer.runtime.keep_freed_host_memory`; TRANSFORMER_KEEP_HOST_MEMORY=0
turns it off), where mapping it afresh took ~20% of a CPU train step. It has to happen before JAX
starts its threads.
"""

from transformer import runtime as _runtime

_runtime.keep_freed_host_memory()
