"""Text classification: CPython standard-library docstrings labelled by their package.

Real English prose shipped with the interpreter (asyncio, email, http, importlib,
logging, multiprocessing, unittest, xml), hashed word uni- and bigrams, a fastText-style
bag-of-n-grams model.

    ./launch.sh cpu experiments.main --config=configs/text.py:loss=focal_loss \
        --workdir=runs/text_focal
    python -m experiments.main --config=configs/text.py:smoke --workdir=runs/text_smoke

Arguments (comma string after `:`): `loss=<label>`, `smoke`.
"""

from configs import common

LOSSES = {
    "cross_entropy": {"name": "cross_entropy", "kwargs": {}, "target": "labels"},
    "label_smoothing": {"name": "cross_entropy", "kwargs": {"label_smoothing": 0.1},
                        "target": "labels"},
    "focal_loss": {"name": "focal_loss", "kwargs": {"gamma": 2.0}, "target": "labels"},
    "multiclass_hinge_loss": {"name": "multiclass_hinge_loss", "kwargs": {},
                              "target": "labels"},
    "squared_error": {"name": "squared_error", "kwargs": {}, "target": "one_hot"},
}
METRIC, MODE = "test/accuracy", "max"


def get_config(arg=None):
    args = common.parse_arg(arg, ("loss", "smoke"))
    c = common.base_config()
    c.data.name = "stdlib_docs"
    c.data.kwargs = {"num_buckets": 8192, "max_len": 128}
    c.model.name = "bag_of_ngrams"
    c.model.kwargs = {"vocab_size": 8192, "embed_dim": 64, "hidden": 64}
    c.num_train_steps = 300
    c.batch_size = 64
    c.log_every_steps = 10
    c.eval_every_steps = 30
    c.checkpoint_every_steps = 300
    # Sparse bag-of-n-gram embeddings need a larger step than the CNN.
    c.optimizer.learning_rate = 3e-2
    c.optimizer.warmup_steps = 15
    common.set_loss(c, LOSSES, args.get("loss", "cross_entropy"))
    return common.finish(c, bool(args.get("smoke")), smoke_steps=40)
