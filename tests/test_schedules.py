"""Learning-rate schedules against their formulas, computed here with plain Python floats."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import schedules


def paper_formula(step, d_model, warmup, scale=1.0):
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


@pytest.mark.parametrize("step", [1, 2, 100, 3999, 4000, 4001, 100_000])
def test_paper_schedule_matches_eq3(step):
    schedule = schedules.paper_schedule(d_model=512, warmup_steps=4000, scale=2.0)
    got = float(schedule(step - 1))  # optax count = paper step - 1
    np.testing.assert_allclose(got, paper_formula(step, 512, 4000, 2.0), rtol=1e-6)


def test_paper_schedule_first_update_nonzero_and_peak_at_warmup():
    schedule = jax.jit(schedules.make_schedule("rsqrt", d_model=512, warmup_steps=100))
    counts = jnp.arange(1000)
    values = np.asarray(jax.vmap(schedule)(counts))
    assert values[0] > 0
    assert int(np.argmax(values)) == 99  # paper step 100 = warmup
    np.testing.assert_allclose(values.max(), (512 * 100) ** -0.5, rtol=1e-6)
    assert np.all(np.diff(values[:100]) > 0) and np.all(np.diff(values[100:]) < 0)


def test_inverse_sqrt_schedule():
    peak, warmup = 1e-3, 10
    schedule = schedules.make_schedule("inverse_sqrt", peak_value=peak, warmup_steps=warmup, init_value=1e-4)
    for count in range(warmup + 1):  # linear from init at 0 to peak at warmup
        np.testing.assert_allclose(float(schedule(count)), 1e-4 + (peak - 1e-4) * count / warmup, rtol=1e-6)
    for count in [10, 11, 40, 1000, 12345]:
        np.testing.assert_allclose(float(schedule(count)), peak * math.sqrt(warmup / count), rtol=1e-6)
    assert float(schedule(0)) == pytest.approx(1e-4)


def test_cosine_schedule():
    peak, warmup, total, end = 1e-3, 10, 110, 1e-5
    schedule = schedules.make_schedule("cosine", peak_value=peak, warmup_steps=warmup, total_steps=total,
                                       end_value=end)
    for count in range(warmup + 1):
        np.testing.assert_allclose(float(schedule(count)), peak * count / warmup, rtol=1e-6, atol=1e-12)
    for count in [10, 35, 60, 85, 110]:
        progress = (count - warmup) / (total - warmup)
        want = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))
        np.testing.assert_allclose(float(schedule(count)), want, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(60)), (peak + end) / 2, rtol=1e-5)  # halfway
    np.testing.assert_allclose(float(schedule(500)), end, rtol=1e-6)  # stays at the end value


def test_cosine_cycles_schedule_restarts_each_cycle_from_zero():
    peaks, warmups, lengths = (1e-3, 4e-4), (10, 5), (110, 45)
    schedule = schedules.make_schedule("cosine_cycles", peak_values=peaks, warmup_steps=warmups, cycle_steps=lengths)
    first = schedules.cosine_schedule(peaks[0], warmups[0], lengths[0])
    for count in [0, 5, 10, 60, 109, 110]:  # the first cycle is a plain cosine schedule
        np.testing.assert_allclose(float(schedule(count)), float(first(count)), rtol=1e-6, atol=1e-12)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-12)  # annealed, then the restart
    np.testing.assert_allclose(float(schedule(110 + 5)), 4e-4, rtol=1e-6)  # second peak after its warmup
    np.testing.assert_allclose(float(schedule(110 + 2)), 4e-4 * 2 / 5, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(110 + 25)), 2e-4, rtol=1e-5)  # halfway down the second cycle
    assert float(schedule(155)) == pytest.approx(0.0, abs=1e-12) and float(schedule(10**4)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="one peak, warmup and length per cycle"):
        schedules.make_schedule("cosine_cycles", peak_values=(1e-3,), warmup_steps=(1, 1), cycle_steps=(5, 5))


def test_constant_schedule():
    schedule = schedules.make_schedule("constant", value=3e-4)
    assert [float(schedule(c)) for c in (0, 7, 10**6)] == pytest.approx([3e-4] * 3)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="cosine.*inverse_sqrt.*paper"):
        schedules.make_schedule("linear", value=1.0)


def test_bad_warmup_raises():
    with pytest.raises(ValueError):
        schedules.paper_schedule(512, warmup_steps=0)
    with pytest.raises(ValueError):
        schedules.cosine_schedule(1e-3, warmup_steps=100, total_steps=100)
