"""Test setup: 8 fake CPU devices for the pmap / shard_map tests.

float64 is not switched on globally, so every test sees the dtypes a user sees; tests
that need double precision (check_grads, references) use `with jax.enable_x64(True):`.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
