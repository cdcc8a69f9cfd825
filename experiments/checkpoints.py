"""Checkpoints: orbax `CheckpointManager` in `<workdir>/checkpoints`, restore that
skips a damaged checkpoint, parameters from another run, restore onto any mesh.

orbax traps (conventions, section 5): `save` on a step that exists returns False and
does nothing, so a damaged step is moved aside (`quarantine`) before it is retrained;
a save killed mid-write leaves a `*.orbax-checkpoint-tmp` folder that restore ignores.
"""

from __future__ import annotations

import pathlib
import shutil
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp


def manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        (pathlib.Path(workdir) / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            # Synchronous saves: the state is donated to the next step right after.
            enable_async_checkpointing=False))


def save(mgr: ocp.CheckpointManager, step: int, state) -> None:
    """Saves `state` as `step` unless that step is already the latest."""
    if mgr.latest_step() != step:
        mgr.save(step, args=ocp.args.StandardSave(state))


def abstract_like(tree, sharding_tree):
    """`jax.ShapeDtypeStruct`s of `tree` carrying the shardings of `sharding_tree`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        tree, sharding_tree)


def restore_latest(mgr: ocp.CheckpointManager, abstract_state, quarantine=None):
    """(step, state) of the newest checkpoint that restores, or None.

    A checkpoint that fails to restore (corrupt or partial) is skipped with a warning
    and moved to `quarantine` (so a later save of the same step is not refused by
    orbax), and the previous one is tried.
    """
    skipped = False
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            state = mgr.restore(step, args=ocp.args.StandardRestore(abstract_state))
            if skipped:
                mgr.reload()  # forget the quarantined steps
            return step, state
        except Exception as e:  # orbax raises many kinds for a damaged checkpoint
            warnings.warn(
                f"checkpoint at step {step} in {mgr.directory} could not be "
                f"restored ({type(e).__name__}: {str(e)[:200]}); skipping it and "
                "trying the previous one.", RuntimeWarning, stacklevel=2)
            if quarantine is not None and jax.process_index() == 0:
                src = pathlib.Path(mgr.directory) / str(step)
                if src.exists():
                    dst = pathlib.Path(quarantine) / f"{step}-{time.time_ns()}"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(src), str(dst))
            skipped = True
    mgr.reload()
    return None


def read_init_from(path: str, abstract_params, sharding):
    """Parameters of the newest checkpoint under `path` (a workdir or checkpoints dir).

    Only the parameters are read (the optimizer there may differ); their tree
    structure, shapes and dtypes must match this run's model.
    """
    root = pathlib.Path(path).absolute()
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    with ocp.CheckpointManager(root, item_handlers=ocp.StandardCheckpointHandler(),
                               options=ocp.CheckpointManagerOptions(
                                   read_only=True)) as mgr:
        step = mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"config.init_from={path!r}: no checkpoint there.")
        params = restore_placed(mgr, step, sharding)["params"]
    want = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), abstract_params)
    got = jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), params)
    if want != got:
        raise ValueError(f"config.init_from={path!r}: its parameters (step {step}) do "
                         f"not fit this model: {got} vs {want}.")
    return params


def restore_placed(mgr: ocp.CheckpointManager, step: int, sharding) -> dict:
    """The whole saved state of `step`, every array placed with `sharding`.

    Works whatever mesh or process count saved it (orbax refuses to restore onto
    other devices without a target). `mgr` needs a StandardCheckpointHandler.
    """
    meta = mgr.item_metadata(step)
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
    return mgr.restore(step, args=ocp.args.StandardRestore(target))
