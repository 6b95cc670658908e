"""Mixed-precision matrix products: 16-bit operands, float32 accumulation, in both passes.

`einsum(spec, x, y, dtype)` is the one contraction of this package's layers. In float32 it is
`jnp.einsum`. In bfloat16 (or float16) both operands are cast to `dtype`, products accumulate in
float32, and the result is returned in `dtype`; its backward pass does the same for the two
gradient products, with the incoming gradient cast to `dtype`. Parameters stay float32 (their
gradients come back float32), so this is the usual recipe: 16-bit compute, float32 master weights.

Why a custom VJP: JAX's transpose of a dot with `preferred_element_type=float32` multiplies a float32
cotangent by a 16-bit operand, which XLA promotes to a float32 product, so the backward pass would
run at float32 speed. On CPUs with AMX or AVX-512 BF16, XLA's bf16 x bf16 -> f32 kernels run 3-5x
faster than float32 ones (`python -m experiments.benchmarks.compare --dtype=bfloat16` prints the
rate it measures); on TPU and GPU this is what their matrix units do anyway.

`project(spec, x, kernel, dtype)` is `einsum` for a layer's input times its weights; on CPU in
float32 its gradient products read stored operands (see there).
"""

from __future__ import annotations

import functools
import math
import string

import jax
import jax.numpy as jnp

from transformer import runtime


def einsum(spec: str, x, y, dtype=jnp.float32, out_dtype=None):
    """`jnp.einsum(spec, x, y)` computed in `dtype` with float32 accumulation.

    `spec` names every axis ("BTD,DNH->BTNH"; a "..." is allowed on the first operand and the
    output), and each input axis appears in the other input or the output, so that both gradients
    are einsums of the same kind. The result is in `out_dtype` (default `dtype`): float32 where a
    softmax or a loss follows.
    """
    dtype = jnp.dtype(dtype)
    out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
    if dtype == jnp.float32:
        return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32).astype(out_dtype)
    spec = _expand_ellipsis(spec, x.ndim)
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    for name, axes, others in (("first", lhs, rhs + out), ("second", rhs, lhs + out)):
        if any(axis not in others for axis in axes):
            raise ValueError(f"einsum {spec!r}: every axis of the {name} operand must appear in the other "
                             "operand or the output (sum it out before the product).")
    return _mixed_einsum(spec, dtype, out_dtype, x, y)


def project(spec: str, x, kernel, dtype=jnp.float32):
    """`einsum(spec, x, kernel, dtype)` for a layer's input times its weights (the dense layers' and
    attention's projections).

    On CPU in float32 the two gradient products read the incoming gradient and the input as they
    are stored (`jax.lax.optimization_barrier` on each). Left free, XLA recomputes the input's
    cheap producers (LayerNorm, dropout's hash, ReLU) and the gradient's (LayerNorm's backward)
    inside the transposing copy that the weight gradient's 3-d product needed, element by element in
    the transposed, strided order: the float32 train step ran 6% (Multi30k) to 8% (base_32k)
    slower so (2026-12-02, `docs/speed.md`). Both gradients are 2-d products over the merged batch
    and length axes (`_flat_gradient_products`). Elsewhere, and in 16-bit dtypes (whose custom
    gradient stores 16-bit operands), this is `einsum`.
    """
    if jnp.dtype(dtype) == jnp.float32 and runtime.trace_platform() == "cpu":
        return _stored_operands_einsum(_expand_ellipsis(spec, x.ndim), x.astype(jnp.float32),
                                       kernel.astype(jnp.float32))
    return einsum(spec, x, kernel, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stored_operands_einsum(spec, x, y):
    return _product(spec, jnp.float32, jnp.float32, x, y)


def _stored_operands_forward(spec, x, y):
    return _stored_operands_einsum(spec, x, y), (x, y)


def _stored_operands_backward(spec, residuals, grad):
    x, y = residuals
    x, grad = jax.lax.optimization_barrier((x, grad))
    return _flat_gradient_products(spec, x, y, grad)


def _flat_gradient_products(spec: str, x, y, grad):
    """`_gradient_products(spec, x, y, grad)` as two-dimensional products, where x is [*S, *K], the
    kernel y holds the axes K and N in some order, and grad is [*S, *N] (S: the summed batch and
    length axes, leading both; a projection's spec).

    Merging S, K and N each into one axis makes both products plain matrix products of free
    reshapes: dx = grad [S, N] x y^T [N, K], dy = x^T [K, S] x grad [S, N] (contracting the leading
    axis of the stored x, which XLA's CPU kernels read as it is). Given the multi-axis einsums,
    XLA's CPU backend first writes x out transposed to [K, S] for the weight gradient, element by
    element in strided order (~13 ms for a [2048, 2048] float32 activation on a Zen 5), and for an
    attention projection's input gradient it may reorder the heads' axes of grad and kernel first.
    Only the small kernel is transposed here, when its axes are not in K, N order. Other specs take
    `_gradient_products`.
    """
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    summed = "".join(axis for axis in lhs if axis not in rhs)
    k_axes, n_axes = lhs[len(summed):], out[len(summed):]
    if (not summed or not lhs.startswith(summed) or not out.startswith(summed) or set(k_axes) & set(n_axes)
            or sorted(k_axes + n_axes) != sorted(rhs)):
        return _gradient_products(spec, x, y, grad)
    k_shape, n_shape = x.shape[len(summed):], grad.shape[len(summed):]
    k, n = math.prod(k_shape), math.prod(n_shape)
    x2, grad2 = x.reshape(-1, k), grad.reshape(-1, n)
    y2 = jnp.einsum(f"{rhs}->{k_axes}{n_axes}", y).reshape(k, n)
    dx = jnp.einsum("tn,kn->tk", grad2, y2, preferred_element_type=jnp.float32).reshape(x.shape)
    dy = jnp.einsum("tk,tn->kn", x2, grad2, preferred_element_type=jnp.float32).reshape(*k_shape, *n_shape)
    return dx, jnp.einsum(f"{k_axes}{n_axes}->{rhs}", dy)


_stored_operands_einsum.defvjp(_stored_operands_forward, _stored_operands_backward)


def _expand_ellipsis(spec: str, ndim: int) -> str:
    """'...i,io->...o' with a 3-d first operand -> 'abi,io->abo' (letters not in `spec`)."""
    if "..." not in spec:
        return spec
    lhs = spec.split(",")[0]
    free = [c for c in string.ascii_letters if c not in spec]
    return spec.replace("...", "".join(free[:ndim - (len(lhs) - 3)]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _mixed_einsum(spec, dtype, out_dtype, x, y):
    return _product(spec, dtype, out_dtype, x, y)


def _product(spec, dtype, out_dtype, x, y):
    out = jnp.einsum(spec, x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def _forward(spec, dtype, out_dtype, x, y):
    x16, y16 = x.astype(dtype), y.astype(dtype)
    # The residuals are the 16-bit operands (half the memory of float32 ones); the zero-size
    # arrays carry the operands' own dtypes, which their gradients must take.
    return _product(spec, dtype, out_dtype, x16, y16), (x16, y16, jnp.zeros((0,), x.dtype), jnp.zeros((0,), y.dtype))


def _backward(spec, dtype, out_dtype, residuals, grad):
    x16, y16, x_like, y_like = residuals
    dx, dy = _gradient_products(spec, x16, y16, grad.astype(dtype))
    return dx.astype(x_like.dtype), dy.astype(y_like.dtype)


def _gradient_products(spec, x, y, grad):
    """The gradients (float32) of sum(grad * einsum(spec, x, y)) with respect to x and y."""
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    # d/dx sum(g * einsum(x, y)) = einsum(g, y) over the axes x lacks, and likewise for y.
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", grad, y, preferred_element_type=jnp.float32)
    # The weight gradient, a sum over the leading batch and length axes, in the layout XLA picks: in
    # the whole step that beat copying the activations to [D, B*T] first for XNNPACK's fast form
    # (the Multi30k step 3% and base_32k 10% faster in bfloat16, equal in float32, 2026-12-01),
    # though alone the product runs ~4x slower so.
    dy = jnp.einsum(f"{lhs},{out}->{rhs}", x, grad, preferred_element_type=jnp.float32)
    return dx, dy


def leading_contraction(x, y):
    """x [M, K], y [M, N] -> x^T y [K, N] in float32, with x copied to [K, M] first: XLA's CPU kernels
    (XNNPACK) have no fast form of a product contracting the leading axis of its first operand, and
    left to itself XLA may transpose the larger y (the output projection's [M, V] gradient). x and y
    in one dtype."""
    return jnp.dot(copying_transpose(x, (1, 0)), y, preferred_element_type=jnp.float32)


def copying_transpose(x, perm):
    """jnp.transpose(x, perm) that XLA cannot fold into the product that made or reads x.

    XLA turns transpose(dot(a, b)) into a dot with swapped operands, which on CPU can be a form its
    fast kernels lack. Splitting the first axis in two, transposing, and merging the halves again
    computes the same array but is no longer a plain transpose of the dot.
    """
    first = x.shape[0]
    split = next((k for k in range(2, first) if first % k == 0), None)
    if split is None:
        return jnp.transpose(x, perm)
    parts = x.reshape(split, first // split, *x.shape[1:])
    where = perm.index(0)  # the split axis lands where axis 0 goes, its halves side by side
    parts_perm = [p + 1 for p in perm[:where]] + [0, 1] + [p + 1 for p in perm[where + 1:]]
    out = jnp.transpose(parts, parts_perm)
    return out.reshape([x.shape[p] for p in perm])


_mixed_einsum.defvjp(_forward, _backward)


def add_bias(y, bias):
    """y [..., *F] + bias [*F] (float32 parameters; F one axis or several, as [N, H] for a projection to
    heads), in y's dtype; the bias gradient summed in float32.

    JAX's own gradient of `y + bias.astype(y.dtype)` is a reduction of y's cotangent in y's dtype:
    in bfloat16 a sum of thousands of 16-bit terms kept in 16 bits, which stalls once the running
    sum's spacing outgrows the terms (4,096 cotangents of 1 + 2^-7 sum to 2,048 in it). Here the
    cotangent is summed in float32, as every other parameter gradient of this package is. A float32
    (or wider) y takes the plain addition, whose gradient XLA can fuse with its neighbours.
    """
    return _plus(y, bias) if jnp.dtype(y.dtype).itemsize >= 4 else _add_bias(y, bias)


def _plus(y, bias):
    return y + bias.astype(y.dtype)


_add_bias = jax.custom_vjp(_plus)


def _add_bias_forward(y, bias):
    return _add_bias(y, bias), jnp.zeros((0,) * bias.ndim, bias.dtype)  # the bias's rank and dtype


def _add_bias_backward(bias_like, grad):
    leading = tuple(range(grad.ndim - bias_like.ndim))
    dbias = jnp.sum(grad.astype(jnp.float32), axis=leading)
    return grad, dbias.astype(bias_like.dtype)


_add_bias.defvjp(_add_bias_forward, _add_bias_backward)


# ---------------------------------------------------------------------------------------------
# Moving 16-bit floats without arithmetic.


def as_bits(x):
    """16-bit floats viewed as uint16 (a free bitcast); anything else as it is.

    XLA's CPU backend computes gathers and dynamic-update-slices of bfloat16 in float32: it converts
    the whole operand and writes a new buffer, so a decoding cache updated in place at every step
    becomes a full copy and two conversions. Moved as integers, the bits go through untouched and
    the update stays in place. `from_bits(as_bits(x), x.dtype)` is `x`.
    """
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if jnp.dtype(x.dtype).itemsize == 2 and jnp.issubdtype(
        x.dtype, jnp.floating) else x


def from_bits(x, dtype):
    """The inverse of `as_bits` for an array of `dtype`."""
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)
