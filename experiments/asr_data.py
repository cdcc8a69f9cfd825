"""Spoken digit and word sequences synthesized with espeak-ng, as log-mel features.

The speech-recognition experiment's data: real synthesized audio, generated locally
(nothing is downloaded) and cached. Each utterance is a random sequence of 1 to
`max_words` words from `WORDS` (the ten digits and eight command words), spoken by the
`espeak-ng` synthesizer with a random speed and pitch, mixed with white noise at a
random SNR, and turned into log-mel features with NumPy. The split is by voice: the
test voices are never heard in training, so the error rates measure generalization
to new speakers. Targets are characters (`CHARS`, with the CTC blank at id 0).

    from experiments import asr_data
    data = asr_data.load("runs/asr_cache", num_train=2000, num_test=400)
    data.x_train.shape   # [N, max_frames, num_mels] float32, zero-padded
    data.y_train.shape   # [N, max_label_len] int32, padded with -1

espeak-ng must be installed (`apt-get install espeak-ng` on Debian/Ubuntu, `brew
install espeak-ng` on macOS, `dnf install espeak-ng` on Fedora); `load` raises
`EspeakNotFoundError` with those commands otherwise. There is no silent fallback.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import wave

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "yes", "no", "up", "down", "left", "right", "stop", "go")
# Index 0 is the CTC blank; then space and the letters the words use.
CHARS = ("<blank>", " ") + tuple("abcdefghijklmnopqrstuvwxyz")
BLANK_ID = 0

# espeak-ng voices, accent + voice variant (checked to sound different with espeak-ng
# 1.51: "en-gb+m1", for one, ignores its variant). The split is by voice: the test
# voices combine accents and variants never heard in training.
TRAIN_VOICES = ("en-us", "en-us+m3", "en-us+f2", "en+m1", "en+f3", "en-gb-x-rp+m4",
                "en-029+m2", "en-gb-scotland+f1", "en-gb-x-gbcwmd+m6", "en-gb-x-rp+f2")
TEST_VOICES = ("en-gb-x-gbclan+m5", "en-us+f4", "en-029+f5", "en-gb-scotland+m7")

SAMPLE_RATE = 16000
FRAME_MS, HOP_MS, NUM_MELS = 25, 10, 40


class EspeakNotFoundError(RuntimeError):
    pass


_INSTALL_HELP = (
    "the speech experiment needs the espeak-ng speech synthesizer, which was not "
    "found on PATH. Install it with `sudo apt-get install -y espeak-ng` (Debian/"
    "Ubuntu), `brew install espeak-ng` (macOS) or `sudo dnf install espeak-ng` "
    "(Fedora), or set ESPEAK_NG to its path."
)


def espeak_binary() -> str:
    """Path of the espeak-ng executable; raises EspeakNotFoundError if missing."""
    # shutil.which also vets an ESPEAK_NG override, so a wrong path gets the same help.
    path = shutil.which(os.environ.get("ESPEAK_NG") or "espeak-ng")
    if not path:
        raise EspeakNotFoundError(_INSTALL_HELP)
    return path


def encode(text: str) -> np.ndarray:
    """Character ids (int32) of `text`; blank is never produced."""
    return np.array([CHARS.index(c) for c in text], np.int32)


def decode(ids) -> str:
    """Text of character ids, skipping blanks and negative (padding) ids."""
    return "".join(CHARS[i] for i in ids if i > 0)


# --- audio ----------------------------------------------------------------------------


def synthesize(text: str, voice: str, *, speed: int, pitch: int) -> np.ndarray:
    """float32 waveform at SAMPLE_RATE of `text` spoken by espeak-ng."""
    out = subprocess.run(
        [espeak_binary(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout",
         text], capture_output=True, check=True)
    return wav_to_audio(out.stdout)


def wav_to_audio(wav: bytes) -> np.ndarray:
    """float32 waveform at SAMPLE_RATE of 16-bit mono WAV bytes (espeak-ng's output)."""
    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        audio = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    audio = audio.astype(np.float32) / 32768.0
    # Linear resampling to 16 kHz is enough for 40 mel bands below 8 kHz.
    n = int(round(len(audio) * SAMPLE_RATE / rate))
    return np.interp(np.arange(n) * rate / SAMPLE_RATE, np.arange(len(audio)),
                     audio).astype(np.float32)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator):
    """Adds white noise at `snr_db` relative to the utterance's mean power."""
    power = np.mean(audio**2) + 1e-12
    noise = rng.normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), audio.shape)
    return (audio + noise).astype(np.float32)


def _mel_filterbank(num_fft: int, num_mels: int, rate: int) -> np.ndarray:
    """[num_fft // 2 + 1, num_mels] triangular filters on the HTK mel scale."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(20.0), mel(rate / 2), num_mels + 2))
    freqs = np.linspace(0, rate / 2, num_fft // 2 + 1)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lower) / (center - lower)
    falling = (upper - freqs[:, None]) / (upper - center)
    return np.maximum(0.0, np.minimum(rising, falling))


def log_mel(audio: np.ndarray, *, num_mels: int = NUM_MELS) -> np.ndarray:
    """float32 `[frames, num_mels]` log-mel energies (25 ms Hann frames, 10 ms hop)."""
    frame = SAMPLE_RATE * FRAME_MS // 1000
    hop = SAMPLE_RATE * HOP_MS // 1000
    num_fft = 1 << (frame - 1).bit_length()
    audio = np.pad(audio, (0, max(0, frame - len(audio))))
    count = 1 + (len(audio) - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(count)[:, None]
    frames = audio[idx] * np.hanning(frame)[None, :]
    power = np.abs(np.fft.rfft(frames, num_fft, axis=-1)) ** 2
    mel = power @ _mel_filterbank(num_fft, num_mels, SAMPLE_RATE)
    # log with a floor: silence maps to a finite value, not -inf.
    return np.log(mel + 1e-6).astype(np.float32)


# --- the data set ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AsrDataset:
    """Padded log-mel features and character targets, split by voice.

    x: float32 `[N, max_frames, num_mels]` (zero past each length, standardized with
    the training set's per-band mean and std); x_lengths: int32 `[N]`; y: int32
    `[N, max_label_len]`, padded with -1; y_lengths: int32 `[N]`; texts and voices:
    the transcript and voice of each utterance.
    """

    x_train: np.ndarray
    x_train_lengths: np.ndarray
    y_train: np.ndarray
    y_train_lengths: np.ndarray
    texts_train: tuple[str, ...]
    voices_train: tuple[str, ...]
    x_test: np.ndarray
    x_test_lengths: np.ndarray
    y_test: np.ndarray
    y_test_lengths: np.ndarray
    texts_test: tuple[str, ...]
    voices_test: tuple[str, ...]
    num_classes: int = len(CHARS)
    blank_id: int = BLANK_ID


def _utterance_specs(count, voices, max_words, rng):
    specs = []
    for _ in range(count):
        words = rng.choice(WORDS, rng.integers(1, max_words + 1))
        specs.append(dict(
            text=" ".join(words), voice=str(rng.choice(voices)),
            speed=int(rng.integers(130, 200)), pitch=int(rng.integers(25, 75)),
            snr_db=float(rng.uniform(10.0, 30.0)), noise_seed=int(rng.integers(2**31))))
    return specs


def _render(spec):
    audio = synthesize(spec["text"], spec["voice"], speed=spec["speed"],
                       pitch=spec["pitch"])
    audio = add_noise(audio, spec["snr_db"], np.random.default_rng(spec["noise_seed"]))
    return log_mel(audio)


def _pad(arrays, fill, dtype):
    lengths = np.array([len(a) for a in arrays], np.int32)
    out = np.full((len(arrays), max(lengths.max(initial=0), 1)) + arrays[0].shape[1:],
                  fill, dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out, lengths


def _build(specs, workers):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        feats = list(pool.map(_render, specs))
    x, x_lengths = _pad(feats, 0.0, np.float32)
    y, y_lengths = _pad([encode(s["text"]) for s in specs], -1, np.int32)
    return x, x_lengths, y, y_lengths


def load(cache_dir, *, num_train: int = 2000, num_test: int = 400, max_words: int = 4,
         seed: int = 0, workers: int | None = None) -> AsrDataset:
    """The data set, generated on first use and cached as .npz in `cache_dir`.

    Utterances are drawn from a fixed seed, so a cache made elsewhere is identical up
    to the espeak-ng version (recorded in the cache's metadata). Raises
    EspeakNotFoundError, saying how to install espeak-ng, if it is missing and no
    cache exists.
    """
    config = dict(num_train=num_train, num_test=num_test, max_words=max_words,
                  seed=seed, train_voices=TRAIN_VOICES, test_voices=TEST_VOICES,
                  words=WORDS, features=[SAMPLE_RATE, FRAME_MS, HOP_MS, NUM_MELS])
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    path = pathlib.Path(cache_dir) / f"asr_{key}.npz"
    if not path.exists():
        version = subprocess.run([espeak_binary(), "--version"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        rng = np.random.default_rng(seed)
        train_specs = _utterance_specs(num_train, TRAIN_VOICES, max_words, rng)
        test_specs = _utterance_specs(num_test, TEST_VOICES, max_words, rng)
        workers = workers or min(8, os.cpu_count() or 1)
        train, test = _build(train_specs, workers), _build(test_specs, workers)
        # Standardize each mel band with the training set's statistics (valid frames).
        valid = np.arange(train[0].shape[1])[None, :] < train[1][:, None]
        mean = train[0][valid].mean(0)
        std = train[0][valid].std(0) + 1e-5
        arrays = {}
        for name, (x, xl, y, yl), specs in (("train", train, train_specs),
                                             ("test", test, test_specs)):
            mask = np.arange(x.shape[1])[None, :, None] < xl[:, None, None]
            arrays |= {f"x_{name}": np.where(mask, (x - mean) / std, 0.0)
                       .astype(np.float32), f"x_{name}_lengths": xl,
                       f"y_{name}": y, f"y_{name}_lengths": yl,
                       f"texts_{name}": np.array([s["text"] for s in specs]),
                       f"voices_{name}": np.array([s["voice"] for s in specs])}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, meta=json.dumps(config | {"espeak": version}),
                            **arrays)
        os.replace(tmp, path)  # atomic: a killed run never leaves a half cache
    with np.load(path) as f:
        fields = {k: f[k] for k in f.files if k != "meta"}
    for k in list(fields):
        if k.startswith(("texts_", "voices_")):
            fields[k] = tuple(str(s) for s in fields[k])
    return AsrDataset(**fields)
