"""Learning-rate schedules: pure functions `count -> learning rate`, as optax.Schedule.

`count` is optax's update counter: 0 for the first update, 1 for the second, ...

  paper         scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), step = count + 1 (paper, eq. 3)
  inverse_sqrt  linear warmup to peak, then peak * sqrt(warmup / count) (fairseq's inverse_sqrt)
  cosine        linear warmup to peak, then cosine decay to end_value at total_steps
  cosine_cycles cosine cycles one after another, each with its own peak, warmup and length
                (SGDR-style warm restarts, Loshchilov & Hutter 2017)
  constant      value
"""

from __future__ import annotations

import inspect
import itertools

import jax.numpy as jnp
import optax


def paper_schedule(d_model: int, warmup_steps: int = 4000, scale: float = 1.0) -> optax.Schedule:
    """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5) (Vaswani et al., eq. 3).

    NOTE: the paper counts steps from 1; optax counts updates from 0, and the formula at step 0 is 0
    (a wasted first update). We evaluate it at `step = count + 1`, so `schedule(count)` is the
    paper's rate for its step `count + 1`: the first update uses the rate of step 1, and the peak,
    `scale * (d_model * warmup_steps)^-0.5`, is reached at `count = warmup_steps - 1`.
    """
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}.")

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


def inverse_sqrt_schedule(peak_value: float, warmup_steps: int, init_value: float = 0.0) -> optax.Schedule:
    """Linear warmup from `init_value` (count 0) to `peak_value` (count `warmup_steps`), then
    `peak_value * sqrt(warmup_steps / count)` (fairseq's `inverse_sqrt`; continuous at the peak).
    """
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}.")

    def decay(count_after_warmup):  # join_schedules passes count - warmup_steps
        return peak_value * jnp.sqrt(warmup_steps / (jnp.asarray(count_after_warmup, jnp.float32) + warmup_steps))

    warmup = optax.linear_schedule(init_value, peak_value, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def cosine_schedule(peak_value: float, warmup_steps: int, total_steps: int, end_value: float = 0.0,
                    init_value: float = 0.0) -> optax.Schedule:
    """Linear warmup to `peak_value` at count `warmup_steps`, then a half cosine down to `end_value`
    at count `total_steps` (and `end_value` after). optax's `warmup_cosine_decay_schedule`, whose
    `decay_steps` includes the warmup.
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"Need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}.")
    return optax.warmup_cosine_decay_schedule(init_value=init_value, peak_value=peak_value,
                                              warmup_steps=warmup_steps, decay_steps=total_steps,
                                              end_value=end_value)


def cosine_cycles_schedule(peak_values, warmup_steps, cycle_steps, end_value: float = 0.0) -> optax.Schedule:
    """Cosine cycles back to back (warm restarts): cycle i warms up linearly from 0 to
    `peak_values[i]` over `warmup_steps[i]` updates, then anneals to `end_value` at the end of its
    `cycle_steps[i]` updates; the next cycle starts there. With one cycle it is `cosine_schedule`.

    The first cycle of a run does not depend on the later ones, so a finished single-cycle cosine
    run can be continued with more cycles from its last checkpoint.
    """
    peak_values, warmup_steps, cycle_steps = tuple(peak_values), tuple(warmup_steps), tuple(cycle_steps)
    if not cycle_steps or not len(peak_values) == len(warmup_steps) == len(cycle_steps):
        raise ValueError(f"Need one peak, warmup and length per cycle, got {peak_values}, {warmup_steps} and "
                         f"{cycle_steps}.")
    cycles = [cosine_schedule(p, w, n, end_value=end_value) for p, w, n in zip(peak_values, warmup_steps, cycle_steps)]
    boundaries = list(itertools.accumulate(cycle_steps[:-1]))  # where cycles 1, 2, ... start
    return optax.join_schedules(cycles, boundaries)  # cycle i sees count - (start of cycle i)


def constant_schedule(value: float) -> optax.Schedule:
    return optax.constant_schedule(value)


SCHEDULES = {
    "paper": paper_schedule,
    "rsqrt": paper_schedule,  # the name T2T and the Flax WMT example use for the same schedule
    "inverse_sqrt": inverse_sqrt_schedule,
    "cosine": cosine_schedule,
    "cosine_cycles": cosine_cycles_schedule,
    "constant": constant_schedule,
}


def make_schedule(name: str, **kwargs) -> optax.Schedule:
    """The schedule called `name` (a key of SCHEDULES), built from its keyword arguments."""
    if name not in SCHEDULES:
        raise ValueError(f"Unknown learning-rate schedule {name!r}; choose one of {sorted(SCHEDULES)}.")
    return SCHEDULES[name](**kwargs)


# ---------------------------------------------------------------------------------------------
# From an optimizer config: each schedule's builder names the config fields it reads (its keyword
# arguments), from `learning_rate`, `warmup_steps`, `cycle_steps`, `cycle_lr_scales`,
# `cycle_warmup_steps`, plus `d_model` and `total_steps` (num_train_steps). A field a schedule's
# builder does not name has no effect on it (`transformer.run_config` rejects it when set).

CONFIG_BUILDERS = {
    "paper": lambda *, learning_rate, warmup_steps, d_model: paper_schedule(d_model, warmup_steps, scale=learning_rate),
    "rsqrt": lambda *, learning_rate, warmup_steps, d_model: paper_schedule(d_model, warmup_steps, scale=learning_rate),
    "inverse_sqrt": lambda *, learning_rate, warmup_steps: inverse_sqrt_schedule(learning_rate, warmup_steps),
    "cosine": lambda *, learning_rate, warmup_steps, total_steps: cosine_schedule(learning_rate, warmup_steps,
                                                                                  total_steps),
    # Peaks are learning_rate * cycle_lr_scales.
    "cosine_cycles": lambda *, learning_rate, cycle_lr_scales, cycle_warmup_steps, cycle_steps: cosine_cycles_schedule(
        [learning_rate * s for s in cycle_lr_scales], cycle_warmup_steps, cycle_steps),
    "constant": lambda *, learning_rate: constant_schedule(learning_rate),
}


def config_fields(name: str) -> frozenset[str]:
    """The config fields (and `d_model` / `total_steps`) that schedule `name` reads."""
    if name not in CONFIG_BUILDERS:
        raise ValueError(f"Unknown learning-rate schedule {name!r}; choose one of {sorted(CONFIG_BUILDERS)}.")
    return frozenset(inspect.signature(CONFIG_BUILDERS[name]).parameters)


def from_config(name: str, **available) -> optax.Schedule:
    """Schedule `name` from `available` config values, each builder taking the ones it names."""
    return CONFIG_BUILDERS[name](**{k: available[k] for k in config_fields(name)})
