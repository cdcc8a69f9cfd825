"""Pieces shared by the experiment configs: the argument parser and the base config."""

from __future__ import annotations

import ml_collections as mlc


def parse_arg(arg: str | None, known: tuple[str, ...]) -> dict[str, str | bool]:
    """Parses the comma string after `:`, as in `configs/x.py:loss=focal_loss,smoke`.

    `key=value` items give strings, bare items give True. Unknown keys raise ValueError.
    """
    out: dict[str, str | bool] = {}
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if key not in known:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; valid: "
                             f"{', '.join(known)}.")
        out[key] = value if sep else True
    return out


def base_config() -> mlc.ConfigDict:
    """Fields every experiment has; a task config fills data, model, loss, schedule."""
    c = mlc.ConfigDict()
    c.seed = 0
    c.num_train_steps = 1000
    c.batch_size = 64
    c.log_every_steps = 50
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.parallel = "jit"  # or "pmap" (a 1-D data mesh only)
    # Device mesh (experiments.sharding): the batch splits over data x fsdp,
    # parameters over fsdp (FSDP) and by logical axes over model (tensor
    # parallelism); -1 takes the remaining devices.
    c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    c.dtype = "float32"  # or "bfloat16": bf16 compute, f32 params and loss
    c.checks = False  # True: chex value checks inside the step (slower)
    c.init_from = ""  # a workdir whose latest parameters start a fresh run
    c.progress_bar = True
    # train_source: "package.module:name" of a random-access source that replaces
    # the data set's training split (experiments.pipeline).
    c.data = mlc.ConfigDict({"name": "", "kwargs": {}, "train_source": ""})
    c.model = mlc.ConfigDict({"name": "", "kwargs": {}})
    c.loss = mlc.ConfigDict({"name": "cross_entropy", "kwargs": {}, "target": "labels"})
    c.optimizer = mlc.ConfigDict({
        "name": "adam", "learning_rate": 1e-3, "schedule": "cosine",
        "warmup_steps": 50, "weight_decay": 0.0, "momentum": 0.9, "grad_clip": 0.0})
    return c


def set_loss(config: mlc.ConfigDict, losses: dict, label: str) -> None:
    """Sets config.loss from a task's table of losses (or a bare registry name)."""
    spec = losses.get(label, {"name": label, "kwargs": {}, "target": "labels"})
    config.loss = mlc.ConfigDict({"name": spec["name"],
                                  "kwargs": dict(spec.get("kwargs", {})),
                                  "target": spec.get("target", "labels")})


def finish(config: mlc.ConfigDict, smoke: bool,
           smoke_steps: int = 40) -> mlc.ConfigDict:
    """Applies the smoke variant (a few steps, frequent logs) and locks the config."""
    if smoke:
        config.num_train_steps = smoke_steps
        config.log_every_steps = 5
        config.eval_every_steps = smoke_steps // 2
        config.checkpoint_every_steps = smoke_steps // 2
        config.optimizer.warmup_steps = 5
    config.lock()  # a typo like config.optimizer.learnig_rate = 1 now raises
    # ... but any keyword of the loss may be added (`--config.loss.kwargs.gamma=1`);
    # the trainer rejects one the loss does not take, naming the valid ones.
    config.loss.kwargs.unlock()
    return config
