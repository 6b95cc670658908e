"""precision.einsum: float32 is jnp.einsum; bfloat16 has float32 accumulation and true gradients.
precision.project: einsum, its float32 gradient on CPU reading stored operands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import precision

# (spec, first operand shape, second operand shape): the contractions the layers use.
SPECS = [
    ("BTD,DF->BTF", (2, 3, 8), (8, 16)),  # feed-forward, dense
    ("BTD,DNH->BTNH", (2, 3, 8), (8, 2, 4)),  # query projection
    ("BTNH,NHD->BTD", (2, 3, 2, 4), (2, 4, 8)),  # output projection
    ("BTD,VD->BTV", (2, 3, 8), (12, 8)),  # tied embedding logits: the weight gradient is transposed
    ("BTKGH,BSKH->BKGTS", (2, 3, 1, 2, 4), (2, 5, 1, 4)),  # attention logits: a batch axis
    ("...i,io->...o", (2, 3, 8), (8, 4)),
]


def _operands(shape_x, shape_y, seed=0):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, shape_x), jax.random.normal(ky, shape_y)


def _loss(fn, x, y, probe):
    return jnp.sum(fn(x, y).astype(jnp.float32) * probe)


@pytest.mark.parametrize("spec,shape_x,shape_y", SPECS)
def test_float32_is_plain_einsum_values_and_gradients(spec, shape_x, shape_y):
    x, y = _operands(shape_x, shape_y)
    expected = jnp.einsum(spec, x, y)
    np.testing.assert_allclose(precision.einsum(spec, x, y), expected, rtol=1e-6, atol=1e-6)
    probe = jax.random.normal(jax.random.PRNGKey(1), expected.shape)
    got = jax.grad(_loss, argnums=(1, 2))(lambda a, b: precision.einsum(spec, a, b), x, y, probe)
    want = jax.grad(_loss, argnums=(1, 2))(lambda a, b: jnp.einsum(spec, a, b), x, y, probe)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,shape_x,shape_y", SPECS)
def test_bfloat16_values_and_gradients_match_float32_to_bfloat16_precision(spec, shape_x, shape_y):
    x, y = _operands(shape_x, shape_y)
    out = precision.einsum(spec, x, y, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    # Products of bf16-rounded operands, summed in float32, then rounded once.
    exact = jnp.einsum(spec, x.astype(jnp.bfloat16).astype(jnp.float32), y.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(out.astype(jnp.float32), exact, rtol=1e-2, atol=1e-2)

    probe = jax.random.normal(jax.random.PRNGKey(1), out.shape)
    got = jax.grad(_loss, argnums=(1, 2))(lambda a, b: precision.einsum(spec, a, b, jnp.bfloat16), x, y, probe)
    want = jax.grad(_loss, argnums=(1, 2))(lambda a, b: jnp.einsum(spec, a, b), x, y, probe)
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32 and g.shape == w.shape  # float32 master weights get float32 gradients
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(g, w, atol=3e-2 * scale)


PROJECTIONS = [spec for spec in SPECS if spec[0] in ("BTD,DF->BTF", "BTD,DNH->BTNH", "BTNH,NHD->BTD", "...i,io->...o")]


def _barriers(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("optimization_barrier")


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("spec,shape_x,shape_y", PROJECTIONS)
def test_project_float32_values_and_gradients_are_einsums(monkeypatch, spec, shape_x, shape_y, platform):
    """On CPU the gradient reads stored operands (barriers), elsewhere it is einsum's: the same numbers."""
    monkeypatch.setattr(precision.runtime, "trace_platform", lambda: platform)
    x, y = _operands(shape_x, shape_y)
    expected = jnp.einsum(spec, x, y)
    np.testing.assert_allclose(precision.project(spec, x, y), expected, rtol=1e-6, atol=1e-6)
    probe = jax.random.normal(jax.random.PRNGKey(1), expected.shape)
    grad = jax.grad(_loss, argnums=(1, 2))
    got = grad(lambda a, b: precision.project(spec, a, b), x, y, probe)
    want = grad(lambda a, b: jnp.einsum(spec, a, b), x, y, probe)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == jnp.float32 and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    barriers = _barriers(lambda a, b: grad(lambda a, b: precision.project(spec, a, b), a, b, probe), x, y)
    assert barriers == (1 if platform == "cpu" else 0)


# projection specs, operand shapes, whether both gradients are 2-d products
FLAT_GRADIENTS = [
    ("BTD,DF->BTF", (2, 3, 8), (8, 16), True),  # feed-forward
    ("BTD,DNH->BTNH", (2, 3, 8), (8, 2, 4), True),  # query projection
    ("BTNH,NHD->BTD", (2, 3, 2, 4), (2, 4, 8), True),  # output projection
    ("BTD,NHD->BTNH", (2, 3, 8), (2, 4, 8), True),  # a kernel stored [N, H, D]: transposed for the products
    ("BTD,DF->TBF", (2, 3, 8), (8, 16), False),  # the summed axes in another order: the einsums
    ("BTD,DF->BFT", (2, 3, 8), (8, 16), False),  # the summed axes not leading the output: the einsums
]


@pytest.mark.parametrize("spec,shape_x,shape_y,flat", FLAT_GRADIENTS)
def test_flat_gradient_products_are_einsums_and_2d_products_where_the_summed_axes_lead(spec, shape_x, shape_y, flat):
    x, y = _operands(shape_x, shape_y)
    grad = jax.random.normal(jax.random.PRNGKey(1), jnp.einsum(spec, x, y).shape)
    got = precision._flat_gradient_products(spec, x, y, grad)
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, y)
    for g, w in zip(got, vjp(grad)):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(lambda *args: precision._flat_gradient_products(spec, *args))(x, y, grad)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2
    assert all(v.aval.ndim == 2 for dot in dots for v in dot.invars) == flat


def test_project_in_bfloat16_is_einsum_without_barriers():
    spec, shape_x, shape_y = SPECS[0]
    x, y = _operands(shape_x, shape_y)
    out = precision.project(spec, x, y, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, precision.einsum(spec, x, y, jnp.bfloat16))
    probe = jnp.ones(out.shape)
    assert _barriers(jax.grad(lambda a: _loss(lambda a, b: precision.project(spec, a, b, jnp.bfloat16), a, y, probe)),
                     x) == 0


def test_bfloat16_operands_get_bfloat16_gradients_and_out_dtype_is_honoured():
    x, y = _operands((2, 3, 8), (8, 4))
    x16 = x.astype(jnp.bfloat16)
    assert precision.einsum("BTD,DF->BTF", x16, y, jnp.bfloat16, out_dtype=jnp.float32).dtype == jnp.float32
    gx, gy = jax.grad(lambda a, b: jnp.sum(precision.einsum("BTD,DF->BTF", a, b, jnp.bfloat16)), argnums=(0, 1))(x16, y)
    assert gx.dtype == jnp.bfloat16 and gy.dtype == jnp.float32


def test_copying_transpose_is_a_transpose():
    x = jnp.arange(6 * 5 * 4, dtype=jnp.float32).reshape(6, 5, 4)
    for perm in ([1, 0, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]):
        np.testing.assert_array_equal(precision.copying_transpose(x, perm), jnp.transpose(x, perm))
    np.testing.assert_array_equal(precision.copying_transpose(x[:5], [1, 0, 2]), jnp.transpose(x[:5], [1, 0, 2]))


def test_an_axis_summed_inside_one_operand_is_refused():
    x, y = _operands((2, 3), (3, 4))
    with pytest.raises(ValueError, match="every axis of the first operand"):
        precision.einsum("ab,bc->c", x, y, jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32])
def test_as_bits_round_trips_and_moves_16_bit_floats_as_integers(dtype):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)) * 100, dtype)
    bits = precision.as_bits(x)
    assert bits.dtype == (jnp.uint16 if dtype in (jnp.bfloat16, jnp.float16) else dtype)
    back = precision.from_bits(jax.lax.dynamic_update_slice(bits, bits[:1], (2, 0)), dtype)
    assert back.dtype == dtype
    np.testing.assert_array_equal(np.asarray(back[:2], np.float32), np.asarray(x[:2], np.float32))
    np.testing.assert_array_equal(np.asarray(back[2], np.float32), np.asarray(x[0], np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,bias_ndim", [((5,), 1), ((3, 5), 1), ((2, 3, 5), 1), ((2, 3, 4, 5), 2)])
def test_add_bias_values_and_gradients_are_those_of_the_addition(shape, bias_ndim, dtype):
    y, probe = _operands(shape, shape)
    y, probe = y.astype(dtype), probe.astype(dtype)
    bias = jax.random.normal(jax.random.PRNGKey(2), shape[len(shape) - bias_ndim:])  # [F] or [N, H]

    def loss(y, b):
        return jnp.sum((precision.add_bias(y, b) * probe).astype(jnp.float32))

    out = precision.add_bias(y, bias)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, y + bias.astype(dtype))
    gy, gb = jax.grad(loss, argnums=(0, 1))(y, bias)
    assert gy.dtype == dtype and gb.dtype == jnp.float32
    np.testing.assert_array_equal(gy, probe)
    want = np.asarray(probe, np.float64).reshape(-1, *bias.shape).sum(0)
    np.testing.assert_allclose(gb, want, rtol=1e-6, atol=1e-6)


def test_add_bias_bfloat16_bias_gradient_accumulates_in_float32():
    # 4,096 rows of 1 + 2^-7 cotangents (exact in bfloat16): a sum kept in bfloat16 stalls long
    # before 4,128; float32 accumulation gets it exactly.
    y = jnp.zeros((64, 64, 3), jnp.bfloat16)
    bias = jnp.zeros((3,), jnp.float32)
    probe = jnp.full(y.shape, 1 + 2**-7, jnp.bfloat16)

    def loss(y, b):
        return jnp.sum((precision.add_bias(y, b) * probe).astype(jnp.float32))

    gy, gb = jax.grad(loss, argnums=(0, 1))(y, bias)
    assert gy.dtype == jnp.bfloat16 and gb.dtype == jnp.float32
    np.testing.assert_array_equal(gb, np.full(3, 4096 * (1 + 2**-7), np.float32))
    assert precision.add_bias(y, bias).dtype == jnp.bfloat16
