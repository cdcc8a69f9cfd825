"""Per-device memory of the language model's train step on each mesh layout.

    python -m benchmarks.mesh_memory              # configs/lm.py, 8 fake CPU devices
    python -m benchmarks.mesh_memory --smoke      # the smoke model

Compiles (never runs) the trainer's step for `configs/lm.py` with the fused and the
materialized loss on (data, fsdp, model) = (8, 1, 1), (1, 8, 1), (2, 1, 4) and
(1, 2, 4), and prints XLA's memory analysis per device in MiB: arguments (parameters,
Adam state, batch), temporaries and outputs. Compilation only, so the numbers do not
depend on machine load. Each layout is compiled in this one process (8 devices are
set before JAX starts).
"""

from __future__ import annotations

import argparse
import os

LAYOUTS = ((8, 1, 1), (1, 8, 1), (2, 1, 4), (1, 2, 4))
LOSSES = ("linear_cross_entropy", "cross_entropy")


def measure(smoke: bool) -> list[dict]:
    import jax
    import numpy as np

    from configs import lm
    from experiments import checkpoints, programs, schema, sharding
    from experiments import data as data_lib

    rows = []
    for loss in LOSSES:
        for layout in LAYOUTS:
            config = lm.get_config(f"loss={loss}" + (",smoke" if smoke else ""))
            with config.unlocked():
                for axis, size in zip(sharding.AXES, layout, strict=True):
                    config.mesh[axis] = size
            flat = schema.validate_config(config)
            dataset = data_lib.load(flat["data.name"], **dict(flat["data.kwargs"]))
            prog = programs.get(flat, dataset)
            state = checkpoints.abstract_like(prog.abstract, prog.state_sharding)
            shape = (flat["batch_size"], flat["data.kwargs"]["seq_len"])
            batch = {k: jax.ShapeDtypeStruct(shape, np.int32,
                                             sharding=prog.data_sharding)
                     for k in ("x", "y")}
            analysis = prog.step.fn.lower(state, batch).compile().memory_analysis()
            mib = lambda b: b / 2**20
            rows.append({"loss": loss, "layout": layout,
                         "arguments": mib(analysis.argument_size_in_bytes),
                         "temp": mib(analysis.temp_size_in_bytes),
                         "outputs": mib(analysis.output_size_in_bytes),
                         "params": mib(sum(x.size * x.dtype.itemsize for x in
                                           jax.tree.leaves(prog.abstract["params"])))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    rows = measure(args.smoke)
    print(f"parameters: {rows[0]['params']:.2f} MiB (float32), per device MiB:\n")
    print("| loss | data, fsdp, model | arguments | temp | outputs |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['loss']}` | {', '.join(map(str, r['layout']))} | "
              f"{r['arguments']:.2f} | {r['temp']:.2f} | {r['outputs']:.2f} |")


if __name__ == "__main__":
    main()
