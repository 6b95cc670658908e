"""Attention cost against sequence length: forward+backward time and compiled memory, one head block.

    python -m experiments.benchmarks.long_context
    python -m experiments.benchmarks.long_context --lengths=1024,4096,16384 --methods=reference,banded --out=lc.png

For each method and length T it compiles `grad(sum(attention(q, k, v) * g))` with respect to q, k
and v ([1, T, N, H] float32, causal, as in language modelling) and reads the compiler's memory
figures (`compiled.memory_analysis()`: temporaries + arguments + outputs, the program's peak).
It runs the program only when those figures fit under `--max_gib`, and when its time, extrapolated
quadratically from the method's previous length, stays under `--max_seconds`; otherwise the row
says which, and the memory column still shows what the compiler would need. Time is the median of `--repeats`
runs after one warm-up.

Methods (transformer.attention, transformer.longformer, transformer.reformer):
  * reference: softmax(QK^T)V over the dense [T, T] logits: quadratic time and memory;
  * chunked: online softmax over key blocks of `--chunk`: quadratic time, linear memory;
  * banded: Longformer's sliding window of `--window` keys, computed band by band: linear both;
  * lsh: Reformer's shared-QK LSH attention, `--lsh_hashes` rounds of `--lsh_bucket` chunks: ~T log T;
  * xl: Transformer-XL's segments of `--segment` queries, each attending to itself and the previous
    segment's keys (memory length = segment, stop-gradient): linear both.
The table goes to stdout; `--out` gets a PNG with time and memory against T on log-log axes, where
quadratic growth has twice the slope of linear growth.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags

from experiments import cli
from transformer import attention, masking

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384", "32768"], "Sequence lengths T.")
_METHODS = flags.DEFINE_list("methods", ["reference", "chunked", "banded", "lsh", "xl"], "Which methods to measure.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads N.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension H.")
_WINDOW = flags.DEFINE_integer("window", 256, "banded: keys per query (causal sliding window).")
_CHUNK = flags.DEFINE_integer("chunk", 512, "chunked: key block length.")
_SEGMENT = flags.DEFINE_integer("segment", 512, "xl: segment length (and memory length).")
_LSH_BUCKET = flags.DEFINE_integer("lsh_bucket", 64, "lsh: queries per sorted chunk.")
_LSH_HASHES = flags.DEFINE_integer("lsh_hashes", 2, "lsh: hash rounds.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per point (median reported).")
_MAX_GIB = flags.DEFINE_float("max_gib", 12.0, "Run a program only if its compiled memory fits under this.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 30.0, "Skip running a point whose time, extrapolated quadratically "
                                  "from the method's previous length, exceeds this (its memory is still compiled).")
_OUT = flags.DEFINE_string("out", None, "Write the PNG plot here.")


def xl_segments(query, key, value, *, segment: int):
    """Transformer-XL's attention pattern: [B, T, N, H] cut into T / segment segments; each attends to
    its own keys (causally) and, with stop-gradient, to the previous segment's (its memory)."""
    batch, length, heads, head_dim = query.shape
    if length % segment:
        raise ValueError(f"xl: length {length} is not a multiple of the segment length {segment}.")
    split = lambda x: jnp.moveaxis(x.reshape(batch, length // segment, segment, heads, head_dim), 1, 0)  # noqa: E731
    query_index = segment + jnp.arange(segment)  # the memory holds key indices [0, segment)
    key_index = jnp.arange(2 * segment)

    def step(memory, xs):
        q, k, v = xs
        mem_k, mem_v, mem_valid = memory
        keys = jnp.concatenate([jax.lax.stop_gradient(mem_k), k], axis=1)  # [B, 2 * segment, N, H]
        values = jnp.concatenate([jax.lax.stop_gradient(mem_v), v], axis=1)
        valid = jnp.concatenate([jnp.full((segment,), mem_valid), jnp.ones((segment,), bool)])
        mask = masking.causal_mask(query_index, key_index) & valid[None, None, None, :]
        out = attention.dot_product_attention(q, keys, values, mask, implementation="reference")
        return (k, v, jnp.array(True)), out

    init = (jnp.zeros_like(split(key)[0]), jnp.zeros_like(split(value)[0]), jnp.array(False))
    _, out = jax.lax.scan(step, init, (split(query), split(key), split(value)))
    return jnp.moveaxis(out, 0, 1).reshape(batch, length, heads, head_dim)


def lsh(query, key, value, *, bucket_size: int, num_hashes: int):
    """Reformer's LSH attention; its queries are its keys (shared QK), so `key` is unused."""
    from transformer import reformer  # noqa: PLC0415

    del key
    return reformer.lsh_attention(query, value, rng=jax.random.key(0), num_hashes=num_hashes,
                                  bucket_size=bucket_size, causal=True)


def method(name: str):
    """name -> attention(q, k, v) -> out, all [B, T, N, H]."""
    causal = masking.SegmentMask(causal=True)
    kernels = {
            "reference": functools.partial(attention.dot_product_attention, mask=causal, implementation="reference"),
            "chunked": functools.partial(attention.dot_product_attention, mask=causal, implementation="chunked",
                                         chunk_size=_CHUNK.value),
            "banded": functools.partial(attention.dot_product_attention, implementation="banded",
                                        mask=masking.SegmentMask(causal=True, window=_WINDOW.value)),
            "lsh": functools.partial(lsh, bucket_size=_LSH_BUCKET.value, num_hashes=_LSH_HASHES.value),
            "xl": functools.partial(xl_segments, segment=_SEGMENT.value),
    }
    if name not in kernels:
        raise cli.UserError(f"unknown method {name!r}: choose from {', '.join(kernels)}.")
    return kernels[name]


def measure(name: str, length: int, previous: dict | None = None) -> dict:
    """Compiles forward+backward of `name` at `length`; runs it if it fits. One table row.
    `previous`: the row of the same method at a shorter length, to extrapolate the time from."""
    kernel = method(name)
    shape = (1, length, _HEADS.value, _HEAD_DIM.value)

    def loss(q, k, v, g):
        return jnp.sum(kernel(q, k, v) * g)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    keys = jax.random.split(jax.random.key(length), 4)
    q, k, v, g = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    start = time.perf_counter()
    compiled = grad.lower(q, k, v, g).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
    row = dict(method=name, length=length, compile_s=compile_s, peak_bytes=peak, seconds=None, skipped="")
    if peak > _MAX_GIB.value * 2**30:
        return {**row, "skipped": "over --max_gib"}
    if previous is not None and previous["seconds"] is None:
        return {**row, "skipped": previous["skipped"]}  # a shorter length already did not run
    if previous is not None and previous["seconds"] * (length / previous["length"])**2 > _MAX_SECONDS.value:
        return {**row, "skipped": "over --max_seconds"}
    jax.block_until_ready(compiled(q, k, v, g))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, g))
        times.append(time.perf_counter() - start)
    row["seconds"] = statistics.median(times)
    return row


def format_table(rows) -> str:
    lines = [f"{'method':<10} {'T':>7} {'fwd+bwd ms':>11} {'memory MiB':>11} {'compile s':>10}"]
    for r in rows:
        ms = "-" if r["seconds"] is None else f"{1e3 * r['seconds']:.1f}"
        lines.append(f"{r['method']:<10} {r['length']:>7} {ms:>11} {r['peak_bytes'] / 2**20:>11.1f} "
                     f"{r['compile_s']:>10.1f}  {r['skipped']}")
    return "\n".join(lines)


def plot(rows, path: str):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        timed = [r for r in mine if r["seconds"] is not None]
        ax_time.plot([r["length"] for r in timed], [r["seconds"] for r in timed], "o-", label=name)
        ax_memory.plot([r["length"] for r in mine], [r["peak_bytes"] / 2**20 for r in mine], "o-", label=name)
    for ax, label in ((ax_time, "forward+backward seconds"), (ax_memory, "compiled memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_memory.axhline(_MAX_GIB.value * 1024, color="grey", linestyle=":", label=f"--max_gib {_MAX_GIB.value:g}")
    ax_time.legend()
    ax_memory.legend(fontsize="small")
    fig.suptitle(f"Causal attention, {_HEADS.value} heads x {_HEAD_DIM.value}, float32, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv):
    del argv
    rows = []
    for name in _METHODS.value:
        method(name)  # an unknown name fails before anything compiles
    for name in _METHODS.value:
        previous = None
        for length in sorted(int(x) for x in _LENGTHS.value):
            rows.append(measure(name, length, previous))
            previous = rows[-1]
            print(format_table(rows[-1:]).splitlines()[1], flush=True)
    print()
    print(format_table(rows))
    if _OUT.value:
        plot(rows, _OUT.value)
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)
