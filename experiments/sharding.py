"""The device mesh and where every array of a run lives on it.

The mesh has three axes (`config.mesh`): "data" and "fsdp" split the batch, "model"
splits parameters by their logical axes (tensor parallelism). Every array's layout is
a `NamedSharding` derived here, from one rule table; the trainer has no per-model
cases.

- The batch: split over ("data", "fsdp") on its first axis, replicated over "model".
- A parameter (and its optimizer moments, which have its shape):
  1. tensor parallelism: each dimension whose logical name (flax partitioning
     metadata on the model, `nn.with_logical_partitioning`) maps to "model" in
     `LOGICAL_RULES` is split over "model" when the axis size divides it; otherwise
     it stays whole on "model" (the smoke language model's 2 attention heads at
     model=4 stay whole, its MLP and vocabulary split);
  2. FSDP (the big_vision rule): the largest remaining dimension that the fsdp size
     divides is split over "fsdp"; a parameter with no such dimension (a small bias,
     a scalar) is replicated over "fsdp".
  Models without metadata (the CNN, MLP, ...) get rule 2 only.
- Everything else of the state (the step, the rng, optimizer counts) is replicated.

GSPMD inserts the collectives; the one place that needs them by hand is the fused
language-model head: with model > 1, `vocab_parallel` computes
`lossjax.linear_cross_entropy` inside `jax.shard_map` on each device's vocabulary
shard of the head kernel (`vocab_axis_name="model"`), so the kernel is never gathered.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
# Logical axis name (on the models' parameters) -> mesh axis. Names not listed
# ("embed", "head_dim", ...) are never split by tensor parallelism.
LOGICAL_RULES = {"vocab": "model", "heads": "model", "mlp": "model"}


def mesh_shape(fields: dict, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, model) sizes from `config.mesh` fields; one -1 takes the rest."""
    sizes = [int(fields[a]) for a in AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=True))}: sizes "
                         "must be positive, with at most one -1.")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=True))}: "
                             f"{num_devices} devices do not split into {known}.")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=True))} needs "
                         f"{math.prod(sizes)} devices; there are {num_devices}.")
    return tuple(sizes)


def make_mesh(fields: dict | None = None, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, model) mesh over `devices` (default: all devices of all
    processes). Auto axes, never installed globally (see `experiments.parallel`)."""
    devices = jax.devices() if devices is None else devices
    fields = fields or {"data": -1, "fsdp": 1, "model": 1}
    return jax.make_mesh(mesh_shape(fields, len(devices)), AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh) -> NamedSharding:
    """The batch's first axis split over ("data", "fsdp")."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh) -> int:
    """How many pieces the batch is split into."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def param_spec(shape: tuple[int, ...], logical, mesh) -> P:
    """The `PartitionSpec` of a parameter of `shape` with logical axis names
    `logical` (a tuple, or None without metadata); the rules of the module doc."""
    spec = [None] * len(shape)
    model, fsdp = mesh.shape["model"], mesh.shape["fsdp"]
    for i, name in enumerate(logical or ()):
        if (LOGICAL_RULES.get(name) == "model" and model > 1
                and shape[i] % model == 0 and "model" not in spec):
            spec[i] = "model"
    if fsdp > 1:
        free = [i for i in range(len(shape))
                if spec[i] is None and shape[i] % fsdp == 0]
        if free:
            # The largest; among equals the first (deterministic).
            spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return P(*spec)


def state_shardings(abstract_state: dict, logical_params, mesh) -> dict:
    """Shardings of a train state {"params", "opt_state", "step", "rng"}.

    `logical_params` is the params tree of logical axis names (`PartitionSpec`s from
    `nn.get_partition_spec`; empty specs where a model has no metadata). Every
    subtree of the optimizer state with the parameters' structure (Adam's moments,
    momentum) takes the parameters' shardings; its other leaves are replicated.
    """
    params = abstract_state["params"]
    treedef = jax.tree.structure(params)
    specs = jax.tree.map(lambda x, names: param_spec(x.shape, tuple(names), mesh),
                         params, logical_params)
    param_sharding = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    replicated = NamedSharding(mesh, P())

    def opt_leaf(subtree):
        if jax.tree.structure(subtree) == treedef:
            return param_sharding
        return jax.tree.map(lambda _: replicated, subtree)

    def is_param_like(x):
        return jax.tree.structure(x) == treedef

    opt = jax.tree.map(opt_leaf, abstract_state["opt_state"], is_leaf=is_param_like)
    return {"params": param_sharding, "opt_state": opt, "step": replicated,
            "rng": replicated}


def vocab_parallel(loss_fn, mesh):
    """`loss_fn(hidden, kernel, labels, *, where)` (a fused head loss, "mean") computed
    in `jax.shard_map`: rows split over the batch axes, the head kernel's vocabulary
    over "model", never gathered; the result is the global mean, replicated."""
    batch = P(BATCH_AXES)
    # Loss shape [batch, seq]: a per-example `where` is [batch, 1].
    return _in_shard_map(loss_fn, mesh, (batch, P(None, "model"), batch),
                         loss_rank=2, vocab_axis_name="model")


def batch_parallel(loss_fn, mesh, num_args: int = 2):
    """`loss_fn(*arrays, where)` ("mean") computed in `jax.shard_map` with every
    array split over the batch axes and `axis_name` set to them: a contrastive loss
    scores each device's anchors against candidates gathered from every device."""
    return _in_shard_map(loss_fn, mesh, (P(BATCH_AXES),) * num_args, loss_rank=1)


def _in_shard_map(loss_fn, mesh, arg_specs, *, loss_rank: int, **axes):
    """`loss_fn` in `jax.shard_map` over `mesh` with `axis_name=BATCH_AXES` (and
    `axes`): positional arrays laid out by `arg_specs`, `where` split over the
    batch axes (all True, `[batch] + [1] * (loss_rank - 1)`, when None), the
    replicated global mean out."""

    def local(*args):
        *arrays, where = args
        return loss_fn(*arrays, where=where, axis_name=BATCH_AXES, **axes)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(*arg_specs, P(BATCH_AXES)),
                           out_specs=P())

    @functools.wraps(loss_fn)
    def loss(*arrays, where=None):
        if where is None:
            where = jnp.ones(arrays[0].shape[:1] + (1,) * (loss_rank - 1), bool)
        return mapped(*arrays, where)

    return loss
