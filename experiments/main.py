"""Trains one experiment: flags only.

    python -m experiments.main --config=configs/digits.py:loss=focal_loss \
        --workdir=runs/digits_focal [--config.optimizer.learning_rate=3e-3]

Re-running the same command resumes from the workdir's last checkpoint. With
LOSSJAX_DISTRIBUTED=1 (set by `./launch.sh tpu`) each process first calls
`jax.distributed.initialize()`; JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID, when set, are passed to it (for clusters JAX cannot detect itself).
Exits with 143 when SIGTERM stopped the run after its checkpoint was saved.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """`--config` (a config file, its fields overridable) and `--workdir`.

    Configs lock themselves (`configs.common.finish`), all but `loss.kwargs`: any
    keyword of the configured loss can be set from the command line
    (`--config.loss.kwargs.label_smoothing=0.2`), hence `accept_new_attributes`; a
    keyword the loss does not take fails in `experiments.schema.validate_config`,
    naming the valid ones, and a typo elsewhere fails here.
    """
    config_flags.DEFINE_config_file("config", None, "experiment config file",
                                    flag_values=flag_values, lock_config=False,
                                    accept_new_attributes=True)
    flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics",
                        flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


define_flags()


def initialize_distributed() -> None:
    import jax

    if os.environ.get("LOSSJAX_DISTRIBUTED") != "1":
        return
    kwargs = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)


def main(argv):
    del argv
    # orbax logs every save at INFO through absl; keep the terminal to our own lines.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("experiments").setLevel(logging.INFO)
    initialize_distributed()
    from experiments import train

    summary = train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    logging.getLogger("experiments").info("done: %s", summary)
    if summary["preempted"]:
        sys.exit(143)


if __name__ == "__main__":
    app.run(main)
