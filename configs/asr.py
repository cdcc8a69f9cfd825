"""Speech recognition with CTC: espeak-ng spoken digit and word sequences, conv model.

Utterances of 1 to 4 words (ten digits, eight commands) are synthesized with espeak-ng
(random voice, speed, pitch, noise), turned into log-mel frames and transcribed
character by character with `ctc_loss`; test voices are never heard in training.
Reports greedy and beam-search character and word error rates (`test/cer_greedy`,
`test/cer_beam`, `test/wer_greedy`, `test/wer_beam`). The data set is generated on
first use (about 20 s on 2 cores) and cached in `<workdir>/data`. Needs espeak-ng
(`sudo apt-get install -y espeak-ng`; `launch.sh` installs it).

    ./launch.sh cpu experiments.main --config=configs/asr.py --workdir=runs/asr
    python -m experiments.main --config=configs/asr.py:smoke --workdir=runs/asr_smoke

Arguments (comma string after `:`): `loss=<label>`, `smoke` (a few dozen utterances
and steps: seconds). Override any field, e.g. `--config.beam_width=16`.
"""

from configs import common

# One loss: lossjax has one sequence loss. (`zero_infinity` would change nothing
# here: every utterance has more frames than characters.)
LOSSES = {"ctc": {"name": "ctc_loss", "kwargs": {}, "target": "ctc"}}
METRIC, MODE = "test/cer_greedy", "min"


def get_config(arg=None):
    args = common.parse_arg(arg, ("loss", "smoke"))
    smoke = bool(args.get("smoke"))
    c = common.base_config()
    c.data.name = "spoken_words"
    c.data.kwargs = ({"num_train": 48, "num_test": 16, "max_words": 2} if smoke else
                     {"num_train": 2000, "num_test": 400, "max_words": 4})
    c.model.name = "speech_conv"
    c.model.kwargs = {"features": 128, "num_layers": 4, "stride": 2}
    c.beam_width = 8
    # Test error stops falling by about step 400 (the training loss keeps falling).
    c.num_train_steps = 400
    c.batch_size = 32
    c.log_every_steps = 20
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 200
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.grad_clip = 1.0
    common.set_loss(c, LOSSES, args.get("loss", "ctc"))
    if smoke:
        c.batch_size = 16
        c.model.kwargs = {"features": 32, "num_layers": 2, "stride": 2}
        c.beam_width = 4
    return common.finish(c, smoke, smoke_steps=40)
