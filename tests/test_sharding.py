"""Meshes, logical rules, and sharded training equal to single-device training."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments.configs import copy as copy_config
from transformer import sharding, training
from transformer.data import synthetic


def test_make_mesh_fills_minus_one():
    mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        sharding.make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="at most one may be -1"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="uses 4 devices but 8 are available"):
        sharding.make_mesh(data=2, fsdp=2, tensor=1)


def test_logical_to_mesh_spec():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    assert sharding.logical_to_mesh_spec(("embed", "heads", "head_dim"), (64, 8, 8), mesh) == P("fsdp", "tensor", None)
    assert sharding.logical_to_mesh_spec(("vocab", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    # 3 heads do not split over tensor=2: replicated rather than an error.
    assert sharding.logical_to_mesh_spec(("embed", "heads", "head_dim"), (64, 3, 8), mesh) == P("fsdp", None, None)
    assert sharding.logical_to_mesh_spec(None, (5,), mesh) == P()


def sharded_config():
    config = copy_config.get_config()
    config.model.update(d_model=64, d_ff=128, num_heads=8, num_layers=1, dropout_rate=0.1)
    config.data.update(batch_size=16, max_length=8, vocab_size=64)
    # NOTE: Adam's first updates are ~lr * sign(g); eps = 1e-3 keeps the comparison well conditioned
    # for entries whose gradient is itself at rounding level (it differs across reduction orders).
    config.optimizer.update(schedule="constant", learning_rate=1e-3, eps=1e-3, warmup_steps=None)
    return config


def run_steps(config, mesh_shape, num_steps=5, devices=None):
    model_cfg = training.model_config(config, config.data.vocab_size)
    trainer = training.Trainer(config, model_cfg, sharding.make_mesh(**mesh_shape, devices=devices))
    state = trainer.init_state(config.seed)
    batches = synthetic.SyntheticIterator(
        lambda **kw: synthetic.synthetic_batch("copy", **kw), seed=0, batch_size=16, length=8, vocab_size=64)
    losses = []
    for _ in range(num_steps):
        state, metrics = trainer.train_step(state, trainer.to_global(next(batches)))
        losses.append(float(metrics["loss_sum"]) / float(metrics["weight_sum"]))
    return np.array(losses), jax.device_get(state.params), trainer, state


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps(sharded_config(), dict(data=1), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [dict(data=8), dict(data=1, fsdp=8), dict(data=1, tensor=8),
                                        dict(data=2, fsdp=2, tensor=2)])
def test_sharded_training_matches_single_device(single_device_run, mesh_shape):
    expected_losses, expected_params, _, _ = single_device_run
    losses, params, trainer, state = run_steps(sharded_config(), mesh_shape)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, expected_params)
    # The parameters really are sharded as the rules say.
    query = state.params["decoder"]["layer_0"]["self_attention"]["query"]
    if mesh_shape.get("tensor", 1) > 1:
        assert query.sharding.spec[1] == "tensor"
    if mesh_shape.get("fsdp", 1) > 1:
        assert query.sharding.spec[0] == "fsdp"
    # Each device holds the block that its mesh coordinates select under the PartitionSpec (worked out
    # here from the mesh, not read back from JAX's shard.index), and the blocks tile the array once per
    # replica: the query kernel is split over fsdp and tensor, and copied over data only.
    mesh, spec = trainer.mesh, tuple(query.sharding.spec) + (None,) * (query.ndim - len(query.sharding.spec))
    coordinates = {device: dict(zip(mesh.axis_names, index)) for index, device in np.ndenumerate(mesh.devices)}

    def block(device):  # per dimension: [which block, how many blocks] -> a slice
        slices = []
        for size, axes in zip(query.shape, spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            position, count = 0, 1
            for axis in axes:  # the first named axis is the major one
                position, count = position * mesh.shape[axis] + coordinates[device][axis], count * mesh.shape[axis]
            assert size % count == 0, (query.shape, spec)
            slices.append(slice(position * size // count, (position + 1) * size // count))
        return tuple(slices)

    full = params["decoder"]["layer_0"]["self_attention"]["query"]  # already matched to the single-device run
    covered = np.zeros(query.shape, np.int32)
    for shard in query.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[block(shard.device)])
        covered[block(shard.device)] += 1
    assert (covered == mesh.shape["data"]).all(), np.unique(covered)


@pytest.mark.slow  # end to end (~20-35 s); the default suite stays under 10 minutes on 2 cores
def test_gradient_accumulation_equals_one_large_batch():
    config = sharded_config()
    config.dropout = False
    _, one_step, _, _ = run_steps(config, dict(data=8), num_steps=1)
    config.optimizer.grad_accum_steps = 4
    _, accumulated, _, _ = run_steps(config, dict(data=8), num_steps=1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), accumulated, one_step)
