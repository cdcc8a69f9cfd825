"""The trainer on a (data, fsdp, model) mesh of the 8 fake CPU devices (conftest.py).

Sharded layouts change the order of float32 sums, not the function: each layout's
training losses equal the data-parallel run's step by step to a relative 2e-4 (digits)
or 5e-4 (the language model). Also: the rule table on the smoke language model, the
fused head never gathering its kernel, FSDP's per-device argument bytes, two processes
on a (data=2, model=4) mesh, and checkpoints restored onto another mesh.
"""

from __future__ import annotations

import re
import subprocess

import chex
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_experiments import (
    ROOT,
    _free_port,
    final_state,
    main_command,
    read_metrics,
    smoke_config,
    subprocess_env,
)

from experiments import checkpoints, programs, schema, sharding, train
from experiments import data as data_lib

MESHES = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "data2_fsdp4": (2, 4, 1),
          "data2_model4": (2, 1, 4)}


def _mesh(name):
    return dict(zip(sharding.AXES, MESHES[name], strict=True))


def _config(module, mesh, steps=10, **overrides):
    return smoke_config(module, num_train_steps=steps, log_every_steps=1,
                        checkpoint_every_steps=steps, eval_every_steps=steps,
                        **{f"mesh.{k}": v for k, v in _mesh(mesh).items()}, **overrides)


def _train_losses(tmp_path, module, mesh, **overrides):
    workdir = tmp_path / f"{module}_{mesh}_{overrides.get('loss.name', '')}"
    train.train_and_evaluate(_config(module, mesh, **overrides), str(workdir))
    return [v for _, v in read_metrics(workdir)]


def _programs(module, mesh, **overrides):
    config = _config(module, mesh, **overrides)
    flat = schema.validate_config(config)
    dataset = data_lib.load(flat["data.name"], **dict(flat["data.kwargs"]))
    return programs.get(flat, dataset), flat


# --- the rules ----------------------------------------------------------------------


def test_mesh_shape_takes_the_remaining_devices_and_refuses_bad_sizes():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "model": 2}, 8) == (2, 2, 2)
    assert sharding.mesh_shape({"data": 1, "fsdp": -1, "model": 1}, 8) == (1, 8, 1)
    for data, fsdp in ((-1, -1), (3, 1), (-1, 3), (0, 8)):
        bad = {"data": data, "fsdp": fsdp, "model": 1}
        with pytest.raises(ValueError, match="config.mesh"):
            sharding.mesh_shape(bad, 8)


def test_param_spec_rules():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "model": 4})
    # model splits its logical axis; fsdp takes the largest remaining divisible dim.
    assert sharding.param_spec((32, 1024), ("embed", "vocab"), mesh) == P("fsdp",
                                                                          "model")
    # 2 heads: model=4 does not divide them, they stay whole; fsdp takes head_dim 16.
    assert sharding.param_spec((32, 2, 16), ("embed", "heads", "head_dim"),
                               mesh) == P("fsdp", None, None)
    # No metadata: FSDP only; nothing divisible: replicated.
    assert sharding.param_spec((3, 3, 1, 16), None, mesh) == P(None, None, None,
                                                               "fsdp")
    assert sharding.param_spec((5,), None, mesh) == P(None)


def test_rule_table_on_the_smoke_language_model():
    prog, _ = _programs("lm", "data2_model4", **{"loss.name": "linear_cross_entropy"})
    params = prog.state_sharding["params"]
    spec = lambda *path: params[path[0]][path[1]]["kernel"].spec if len(path) == 2 \
        else params[path[0]][path[1]][path[2]].spec
    # d_model 32, 2 heads of 16, MLP 128, vocabulary 1024 (configs/lm.py smoke).
    assert spec("block_0", "query") == P(None, None, None)  # 2 heads stay whole
    assert spec("block_0", "mlp_in") == P(None, "model")
    assert spec("block_0", "mlp_out") == P("model", None)
    assert params["head"].spec == P(None, "model")
    assert params["embed"]["embedding"].spec == P("model", None)
    # Adam's moments follow the parameters; its count is replicated.
    mu = prog.state_sharding["opt_state"][1][0].mu
    assert mu["head"].spec == P(None, "model")
    assert prog.state_sharding["step"].spec == P()


# --- the same training on every layout -----------------------------------------------


@pytest.mark.parametrize("mesh", ["fsdp8", "data2_fsdp4"])
def test_digits_fsdp_equals_data_parallel(tmp_path, mesh):
    sharded = _train_losses(tmp_path, "digits", mesh)
    reference = _train_losses(tmp_path, "digits", "data8")
    assert len(sharded) == 10
    np.testing.assert_allclose(sharded, reference, rtol=2e-4)
    prog, _ = _programs("digits", mesh)
    specs = [s.spec for s in jax.tree.leaves(prog.state_sharding["params"])]
    assert any("fsdp" in s for s in specs)  # the parameters are split


@pytest.mark.parametrize("loss", ["linear_cross_entropy", "cross_entropy"])
def test_language_model_tensor_parallel_equals_data_parallel(tmp_path, loss):
    sharded = _train_losses(tmp_path, "lm", "data2_model4", **{"loss.name": loss})
    reference = _train_losses(tmp_path, "lm", "data8", **{"loss.name": loss})
    assert len(sharded) == 10
    np.testing.assert_allclose(sharded, reference, rtol=5e-4)


def _compiled_step(prog, flat):
    """The train step compiled for the language model's batch (token windows)."""
    abstract_state = checkpoints.abstract_like(prog.abstract, prog.state_sharding)
    shape = (flat["batch_size"], flat["data.kwargs"]["seq_len"])
    batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=prog.data_sharding)
             for k in ("x", "y")}
    return prog.step.fn.lower(abstract_state, batch).compile()


def test_vocab_parallel_head_kernel_is_never_gathered():
    prog, flat = _programs("lm", "data2_model4",
                           **{"loss.name": "linear_cross_entropy"})
    d, vocab = prog.abstract["params"]["head"].shape
    hlo = _compiled_step(prog, flat).as_text()
    assert not _gathered(hlo, (d, vocab))
    # Each device holds its quarter of the kernel (the shard the loss works on).
    assert re.search(rf"f32\[{d},{vocab // 4}\]", hlo)
    # The detector sees a gather of the kernel where there is one.
    head = prog.state_sharding["params"]["head"]
    gather = jax.jit(lambda k: k * 2, in_shardings=head,
                     out_shardings=NamedSharding(prog.mesh, P()))
    assert _gathered(gather.lower(jax.ShapeDtypeStruct((d, vocab), np.float32,
                                                       sharding=head)).compile()
                     .as_text(), (d, vocab))


def _gathered(hlo: str, shape) -> list[str]:
    """The all-gather ops of `hlo` whose result has `shape` (float32)."""
    whole = re.compile(rf"f32\[{shape[0]},{shape[1]}\]")
    results = [line.split("=", 1)[1].split("all-gather", 1)[0]
               for line in hlo.splitlines()
               if re.search(r" all-gather(-start)?\(", line)]
    return [r for r in results if whole.search(r)]


def test_fsdp_cuts_the_per_device_argument_bytes_of_the_language_model():
    sizes = {}
    for mesh in ("data8", "fsdp8"):
        prog, flat = _programs("lm", mesh, **{"loss.name": "linear_cross_entropy"})
        analysis = _compiled_step(prog, flat).memory_analysis()
        sizes[mesh] = analysis.argument_size_in_bytes
    assert sizes["fsdp8"] <= sizes["data8"] / 6, sizes


# --- several processes, another mesh -----------------------------------------------


def _two_processes(workdir, *flags, module="lm"):
    port = _free_port()
    procs = [subprocess.Popen(
        main_command(workdir, "smoke", module, *flags), cwd=ROOT,
        env=subprocess_env(4, LOSSJAX_DISTRIBUTED="1",
                           JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                           JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]


def test_one_process_checkpoint_resumes_on_two_processes_on_a_model_mesh(tmp_path):
    """1 process x 8 devices (data=8) trains 5 of 10 steps; 2 processes x 4 devices
    on (data=2, model=4) resume and finish: the losses of steps 6..10 and the final
    parameters equal one uninterrupted single-process run. The schedule is constant,
    so a run's first 5 steps do not depend on its length."""
    common = {"optimizer.schedule": "constant", "loss.name": "linear_cross_entropy"}
    workdir = tmp_path / "resumed"
    train.train_and_evaluate(_config("lm", "data8", steps=5, **common), str(workdir))
    _two_processes(workdir, "--config.num_train_steps=10", "--config.log_every_steps=1",
                   "--config.checkpoint_every_steps=10", "--config.eval_every_steps=10",
                   "--config.mesh.data=2", "--config.mesh.model=4",
                   "--config.optimizer.schedule=constant",
                   "--config.loss.name=linear_cross_entropy")
    single = tmp_path / "single"
    train.train_and_evaluate(_config("lm", "data8", steps=10, **common), str(single))
    resumed, reference = read_metrics(workdir), read_metrics(single)
    assert [s for s, _ in resumed] == list(range(1, 11))
    np.testing.assert_allclose([v for _, v in resumed], [v for _, v in reference],
                               rtol=5e-4)
    chex.assert_trees_all_close(final_state(workdir)[1]["params"],
                                final_state(single)[1]["params"], rtol=1e-3,
                                atol=1e-5)


def test_checkpoint_restores_bitwise_onto_another_mesh_and_training_goes_on(tmp_path):
    """Saved with fsdp=8 on 8 devices: restored onto data=4 over 4 devices, bitwise;
    extended from 20 to 40 steps in a 4-device process, its later losses equal one
    uninterrupted 40-step run (constant learning rate)."""
    constant = {"optimizer.schedule": "constant"}
    workdir = tmp_path / "extended"
    train.train_and_evaluate(_config("digits", "fsdp8", steps=20, **constant),
                             str(workdir))
    saved_step, saved = final_state(workdir)
    assert saved_step == 20

    prog, _ = _programs("digits", "fsdp8", steps=20, **constant)
    mesh4 = sharding.make_mesh({"data": 4, "fsdp": 1, "model": 1},
                               devices=jax.devices()[:4])
    target = jax.tree.map(lambda _: NamedSharding(mesh4, P()), prog.abstract)
    manager = checkpoints.manager(workdir, 3)
    step, restored = checkpoints.restore_latest(
        manager, checkpoints.abstract_like(prog.abstract, target))
    manager.close()
    assert step == 20
    assert {d for x in jax.tree.leaves(restored) for d in x.devices()} == set(
        jax.devices()[:4])
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored["params"]),
                                saved["params"])
    for got, want in zip(jax.tree.leaves(restored["opt_state"]),
                         jax.tree.leaves(saved["opt_state"]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)

    subprocess.run(main_command(workdir, "smoke", "digits",
                                "--config.num_train_steps=40",
                                "--config.log_every_steps=1",
                                "--config.checkpoint_every_steps=40",
                                "--config.eval_every_steps=40",
                                "--config.optimizer.schedule=constant"),
                   cwd=ROOT, env=subprocess_env(4), check=True, capture_output=True,
                   timeout=300)
    reference = tmp_path / "uninterrupted"
    train.train_and_evaluate(_config("digits", "data8", steps=40, **constant),
                             str(reference))
    extended, uninterrupted = read_metrics(workdir), read_metrics(reference)
    assert [s for s, _ in extended] == list(range(1, 41))
    np.testing.assert_allclose([v for _, v in extended][20:],
                               [v for _, v in uninterrupted][20:], rtol=2e-4)


# --- the grain pipeline -------------------------------------------------------------


def test_sampler_epochs_are_fresh_permutations_seeded_by_the_seed():
    from experiments import dataset

    n, batch = 100, 20  # five batches per epoch
    epochs = [np.concatenate([dataset.batch_indices(0, s, n, batch)
                              for s in range(5 * e, 5 * e + 5)]) for e in range(2)]
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled
    assert not np.array_equal(dataset.batch_indices(1, 0, n, batch),
                              dataset.batch_indices(0, 0, n, batch))
    with pytest.raises(ValueError, match="exceeds"):
        dataset.batch_indices(0, 0, 10, 20)
    # The cached reading is grain's sampler, also across an epoch's end (step 2 of
    # 7 rows of 3 spans epochs 0 and 1); neighbouring seeds share no epoch.
    grain_batches = dataset.sampler(5, 7, 3)
    for step in range(8):
        np.testing.assert_array_equal(dataset.batch_indices(5, step, 7, 3),
                                      np.asarray(grain_batches[step]))
    first = lambda seed: np.concatenate([dataset.batch_indices(seed, s, n, batch)
                                         for s in range(5)])
    second = np.concatenate([dataset.batch_indices(0, s, n, batch)
                             for s in range(5, 10)])
    assert not np.array_equal(first(1), second)


def test_each_process_reads_only_its_rows():
    from experiments import pipeline

    class Counting(pipeline.ArraySource):
        reads: list = []

        def __getitems__(self, ids):
            self.reads.append(np.asarray(ids))
            return super().__getitems__(ids)

    arrays = {"x": np.arange(50, dtype=np.float32)[:, None], "y": np.arange(50)}
    source = Counting(arrays)
    whole = pipeline.TrainBatches(source, seed=3, batch_size=8, rows=np.arange(8))(4)
    halves = [pipeline.TrainBatches(source, seed=3, batch_size=8, rows=rows)(4)
              for rows in (np.arange(4), np.arange(4, 8))]
    assert [len(r) for r in source.reads] == [8, 4, 4]
    for key in arrays:
        np.testing.assert_array_equal(
            np.concatenate([h[key] for h in halves]), whole[key])


def _write_source_module(path, *, relabel: bool):
    path.write_text(f'''
import numpy as np
from experiments import data


class DigitsRecords:
    """Only __len__ and __getitem__: the grain RandomAccessDataSource protocol."""

    def __init__(self):
        d = data.digits()
        self.x, self.y = d.x_train, d.y_train
        if {relabel}:
            self.y = (self.y + 1) % 10

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {{"x": self.x[i], "y": self.y[i]}}
''')


def test_a_users_random_access_source_plugs_in_with_one_field(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_source_module(tmp_path / "same_digits.py", relabel=False)
    _write_source_module(tmp_path / "relabelled_digits.py", relabel=True)
    builtin = _train_losses(tmp_path, "digits", "data8")
    same = _train_losses(tmp_path / "a", "digits", "data8",
                         **{"data.train_source": "same_digits:DigitsRecords"})
    other = _train_losses(tmp_path / "b", "digits", "data8",
                          **{"data.train_source": "relabelled_digits:DigitsRecords"})
    # The same records in the same order: bitwise the built-in run.
    assert same == builtin
    assert other != builtin
    with pytest.raises(ValueError, match="package.module:name"):
        train.train_and_evaluate(
            _config("digits", "data8", **{"data.train_source": "no_colon"}),
            str(tmp_path / "c"))
