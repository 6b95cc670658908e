"""Device mesh and logical-axis rules: how the model's named axes map onto `data`, `fsdp`, `tensor`.

Modules name their axes (`nn.with_logical_partitioning`, `nn.with_logical_constraint`) and never a
mesh axis; this file is the one place that says where each name lives:

  * `data`: pure data parallelism, the batch is split, parameters replicated;
  * `fsdp`: the batch is split *and* parameters/optimizer state are sharded along `embed`
    (fully sharded data parallel, ZeRO-3): gathered per layer on use;
  * `tensor`: Megatron-style tensor parallelism over heads, MLP width and vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes). Names not listed are replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 to take what is left."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1.")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {len(devices)} devices.")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but "
                         f"{len(devices)} are available: set one size to -1 to fill the rest.")
    try:
        device_array = jax.experimental.mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # noqa: BLE001 -- e.g. CPU or odd topologies: plain order is fine
        device_array = np.asarray(devices).reshape(sizes)
    return Mesh(device_array, MESH_AXES)


def logical_to_mesh_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                         rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """The PartitionSpec for an array with logical axis `names`; a dimension whose size the mesh axes
    do not divide is replicated instead (e.g. 4 heads over tensor=8)."""
    if names is None:
        return PartitionSpec()
    rule = dict(rules)
    spec, used = [], set()
    for name, size in zip(names, shape):
        axes = rule.get(name)
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if not axes or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def tree_shardings(abstract_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a tree of (possibly logically boxed) abstract arrays, e.g. from `jax.eval_shape`.

    Leaves boxed with `nn.LogicallyPartitioned` are sharded by their names; other leaves
    (step counters, optimizer scalars, rng keys) are replicated.
    """

    def leaf_sharding(leaf):
        names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else None
        value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
        return NamedSharding(mesh, logical_to_mesh_spec(names, value.shape, mesh, rules))

    return jax.tree.map(leaf_sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [B, ...] are split over every data-parallel axis."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def activation_rules(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Rules for `nn.logical_axis_rules` when tracing: mesh axes of size 1 are dropped."""
    out = []
    for name, axes in rules:
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(out)
