"""The products of a train step, alone: XLA's speed beside torch's at one of compare.py's shapes.

    python -m experiments.benchmarks.products --shapes=base_8k,base_32k --dtype=float32
    python -m experiments.benchmarks.products --dtype=bfloat16      # every shape

Where `experiments.benchmarks.compare` finds our step slower than torch's, this says whether the
products themselves are (the kernels XLA's CPU backend calls against torch's oneDNN ones) or the
rest of the step is. For T = batch x length tokens and the shape's d_model D, d_ff F and vocabulary
V, each product runs alone, jitted, in `--dtype` (bfloat16 accumulates in float32, as our layers
do), and on torch tensors of the same shapes and dtype; the best of `--rounds` rounds counts:
  * projection:    [T, D] @ [D, D]    (attention's queries, keys, values and output)
  * ffn in:        [T, D] @ [D, F]
  * ffn out:       [T, F] @ [F, D]
  * vocab block:   [256, D] @ [D, V]  (the output projection, fused with the loss 256 positions at a time)
  * weight grad:   [T, D]^T @ [T, F]  (every weight gradient contracts the token axis, leading in both)
  * square:        [2048, 2048] @ [2048, 2048] (the peak compare.py reports)
XLA_FLAGS apply to the JAX side, so one flag's effect on the kernels is a second run away.
"""

import os

import jax
import jax.numpy as jnp
from absl import flags

from experiments import cli
from experiments.benchmarks import compare
from experiments.benchmarks.compare import SHAPES

_REPEATS = flags.DEFINE_integer("repeats", 10, "Products per timed round (the best round counts).", lower_bound=1)
# --shapes, --dtype and --rounds are compare.py's flags (imported with its shapes).
_SHAPES, _DTYPE, _ROUNDS = compare._SHAPES, compare._DTYPE, compare._ROUNDS
VOCAB_BLOCK = 256


def products(shape: str) -> dict[str, tuple[str, tuple[int, int], tuple[int, int]]]:
    """name -> (einsum, left operand shape, right operand shape) of a train step at a compare.py shape."""
    vocab, d_model, _, d_ff, _, batch, length, _ = SHAPES[shape]
    tokens = batch * length
    return {
        "projection": ("tk,kn->tn", (tokens, d_model), (d_model, d_model)),
        "ffn in": ("tk,kn->tn", (tokens, d_model), (d_model, d_ff)),
        "ffn out": ("tk,kn->tn", (tokens, d_ff), (d_ff, d_model)),
        "vocab block": ("tk,kn->tn", (VOCAB_BLOCK, d_model), (d_model, vocab)),
        "weight grad": ("tk,tn->kn", (tokens, d_model), (tokens, d_ff)),
        "square": ("tk,kn->tn", (2048, 2048), (2048, 2048)),
    }


def flops(equation: str, left: tuple[int, int], right: tuple[int, int]) -> int:
    sizes = dict(zip(equation[:2], left)) | dict(zip(equation[3:5], right))
    return 2 * sizes["t"] * sizes["k"] * sizes["n"]


def rate(gflops: float) -> str:
    """GFLOP/s for the table: whole numbers, or two significant digits below 10 (bfloat16 products
    emulated on a CPU without bfloat16 instructions can run below 1)."""
    return f"{gflops:,.0f}" if gflops >= 10 else f"{gflops:.2g}"


def best_seconds(fn, repeats: int, rounds: int) -> float:
    """Seconds per call of `fn()`, the best of `rounds` rounds of `repeats` calls (after one warm-up call)."""
    jax.block_until_ready(fn())
    return min(compare.timed(fn, repeats) for _ in range(rounds))


def jax_product(equation: str, left, right, dtype: str):
    a, b = jnp.ones(left, dtype), jnp.ones(right, dtype)
    f = jax.jit(lambda a, b: jnp.einsum(equation, a, b, preferred_element_type=jnp.float32))
    return lambda: f(a, b)


def torch_product(equation: str, left, right, dtype: str):
    import torch  # noqa: PLC0415

    a, b = torch.ones(left, dtype=getattr(torch, dtype)), torch.ones(right, dtype=getattr(torch, dtype))
    if equation == "tk,tn->kn":
        return lambda: a.t() @ b
    return lambda: a @ b


def main(argv):
    del argv
    import torch  # noqa: PLC0415

    dtype = _DTYPE.value
    unknown = sorted(set(_SHAPES.value) - set(SHAPES))
    if unknown:
        raise cli.UserError(f"--shapes: unknown shape(s) {unknown}; use some of {', '.join(SHAPES)}.")
    print(f"{dtype}: JAX {jax.__version__} ({jax.default_backend()}, XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("| shape | product | operands | JAX GFLOP/s | torch GFLOP/s | JAX / torch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in _SHAPES.value:
        for name, (equation, left, right) in products(shape).items():
            work = flops(equation, left, right) / 1e9
            ours = work / best_seconds(jax_product(equation, left, right, dtype), _REPEATS.value, _ROUNDS.value)
            theirs = work / best_seconds(torch_product(equation, left, right, dtype), _REPEATS.value, _ROUNDS.value)
            operands = f"`{equation}` {list(left)} {list(right)}"
            print(f"| {shape} | {name} | {operands} | {rate(ours)} | {rate(theirs)} | {ours / theirs:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    cli.run(main)
