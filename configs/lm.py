"""Language modelling: a small decoder-only transformer on CPython's own source.

Next-token prediction over word-level tokens of the standard library's `.py` files and
`pydoc_data` topics (`experiments/lm_data.py`; tokenized on first use, a few seconds,
and cached in `<workdir>/data`), held-out files for the test loss, token accuracy and
`test/perplexity` (exp of the test loss). `loss=cross_entropy` builds the
`[batch, seq, vocab]` logits; `loss=linear_cross_entropy` computes the same function
from the final hidden states and the head kernel without them, in training and in
evaluation (test loss by the fused loss itself, token accuracy by an arg-max over
vocab blocks). `z_loss` and `label_smoothing` train with those options of the fused
loss; the test loss is plain cross-entropy for every label, so all four compare in
the same units. Each run's `summary.json` records the compiled step's memory
(`memory/xla_temp_mib`: XLA's scratch buffers per step, where the materialized
logits and their gradient live) and the process's `memory/peak_rss_mib`.

Default: 16,384-token vocabulary, 128-token windows, 2 layers of width 128, batch
16, 300 steps, test metrics on 128 held-out windows (16k tokens). On a 2-core CPU:
about 3.3 steps/s with `linear_cross_entropy`, 1.4 with `cross_entropy`. The study
(`configs/study.py`, task `lm`) runs a shorter variant of it.

    ./launch.sh cpu experiments.main --config=configs/lm.py:loss=linear_cross_entropy \
        --workdir=runs/lm_fused
    python -m experiments.main --config=configs/lm.py:loss=cross_entropy \
        --workdir=runs/lm_ce
    python -m experiments.main --config=configs/lm.py:smoke --workdir=runs/lm_smoke

Arguments (comma string after `:`): `loss=<label>` (a label of LOSSES below),
`smoke` (a tiny vocabulary, corpus and model, 20 steps: seconds).
"""

from configs import common

LOSSES = {
    "cross_entropy": {"name": "cross_entropy", "kwargs": {}, "target": "tokens"},
    "linear_cross_entropy": {"name": "linear_cross_entropy", "kwargs": {},
                             "target": "tokens"},
    "z_loss": {"name": "linear_cross_entropy", "kwargs": {"z_loss": 1e-4},
               "target": "tokens"},
    "label_smoothing": {"name": "linear_cross_entropy",
                        "kwargs": {"label_smoothing": 0.1}, "target": "tokens"},
}
METRIC, MODE = "test/loss", "min"


def get_config(arg=None):
    args = common.parse_arg(arg, ("loss", "smoke"))
    smoke = bool(args.get("smoke"))
    c = common.base_config()
    c.data.name = "stdlib_lm"
    c.data.kwargs = ({"vocab_size": 1024, "seq_len": 32, "max_files": 40,
                      "max_test_windows": 16} if smoke else
                     {"vocab_size": 16384, "seq_len": 128, "max_test_windows": 128})
    c.model.name = "transformer"
    c.model.kwargs = ({"num_layers": 1, "d_model": 32, "num_heads": 2} if smoke else
                      {"num_layers": 2, "d_model": 128, "num_heads": 4})
    c.num_train_steps = 300
    c.batch_size = 16
    c.log_every_steps = 10
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 300
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.grad_clip = 1.0
    common.set_loss(c, LOSSES, args.get("loss", "linear_cross_entropy"))
    return common.finish(c, smoke, smoke_steps=20)
