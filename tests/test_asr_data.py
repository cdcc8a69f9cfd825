"""Tests for experiments/asr_data.py: espeak-ng utterances, log-mel features, cache.

These run the real espeak-ng (CI installs it, as launch.sh does); a handful of short
utterances keeps the whole file to a few seconds.
"""

import io
import json
import subprocess
import wave

import numpy as np
import pytest

from experiments import asr_data

SR = 16000
FRAME, HOP, NUM_FFT = 400, 160, 512  # 25 ms and 10 ms at 16 kHz; next power of two
SMALL = dict(num_train=6, num_test=3, max_words=3, seed=0, workers=2)


def _htk_mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _htk_hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def _band_edges_hz(num_mels):
    # Bands equally spaced on the HTK mel scale from 20 Hz to Nyquist.
    return _htk_hz(np.linspace(_htk_mel(20.0), _htk_mel(SR / 2), num_mels + 2))


def _reference_log_mel(audio, num_mels):
    """float64 log-mel from an explicit DFT and per-band triangles (no np.fft)."""
    audio = np.asarray(audio, np.float64)
    if len(audio) < FRAME:
        audio = np.concatenate([audio, np.zeros(FRAME - len(audio))])
    n = np.arange(FRAME)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / (FRAME - 1))  # symmetric Hann
    bins = np.arange(NUM_FFT // 2 + 1)
    # Zero padding each frame to NUM_FFT is implicit in the DFT over NUM_FFT points.
    angle = 2 * np.pi * np.outer(n, bins) / NUM_FFT
    bin_hz = bins * SR / NUM_FFT
    edges = _band_edges_hz(num_mels)
    weights = np.zeros((len(bins), num_mels))
    for m in range(num_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(bin_hz):
            if lo < f <= mid:
                weights[k, m] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                weights[k, m] = (hi - f) / (hi - mid)
    out = []
    start = 0
    while start + FRAME <= len(audio):
        x = audio[start:start + FRAME] * window
        power = (x @ np.cos(angle)) ** 2 + (x @ np.sin(angle)) ** 2
        out.append(np.log(power @ weights + 1e-6))
        start += HOP
    return np.array(out)


@pytest.fixture(autouse=True)
def _no_espeak_override(monkeypatch):
    # The tests decide where espeak-ng comes from; a user's ESPEAK_NG must not leak in.
    monkeypatch.delenv("ESPEAK_NG", raising=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return asr_data.load(tmp_path_factory.mktemp("asr_cache"), **SMALL)


def _fields(data):
    return {k: getattr(data, k) for k in asr_data.AsrDataset.__dataclass_fields__}


def _assert_same(a, b):
    fa, fb = _fields(a), _fields(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], np.ndarray):
            assert fa[k].dtype == fb[k].dtype, k
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
        else:
            assert fa[k] == fb[k], k


# --- the synthesizer ------------------------------------------------------------------


def test_missing_espeak_says_how_to_install(tmp_path, monkeypatch):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    cache = tmp_path / "cache"
    for call in (asr_data.espeak_binary,
                 lambda: asr_data.synthesize("one", "en-us", speed=160, pitch=50),
                 lambda: asr_data.load(cache, num_train=2, num_test=1)):
        with pytest.raises(asr_data.EspeakNotFoundError) as err:
            call()
        message = str(err.value)
        assert "espeak-ng" in message
        assert "apt-get install" in message and "brew install" in message
    assert issubclass(asr_data.EspeakNotFoundError, RuntimeError)
    assert not cache.exists()  # nothing half-written


def test_espeak_ng_env_var_selects_the_binary(tmp_path, monkeypatch):
    real = asr_data.espeak_binary()
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("ESPEAK_NG", real)
    assert asr_data.espeak_binary() == real


def test_wrong_espeak_ng_override_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("ESPEAK_NG", str(tmp_path / "no" / "espeak-ng"))
    with pytest.raises(asr_data.EspeakNotFoundError, match="apt-get install"):
        asr_data.espeak_binary()


def test_synthesize_resamples_to_16khz():
    # One espeak-ng run, and the resampler checked on exactly its bytes: comparing
    # `synthesize` with a second, separate espeak-ng run made the test depend on the
    # two runs agreeing sample for sample, which nothing here needs to assume.
    text, voice, speed, pitch = "seven go", "en-us+f2", 170, 40
    raw = subprocess.run(
        [asr_data.espeak_binary(), "-v", voice, "-s", str(speed), "-p", str(pitch),
         "--stdout", text], capture_output=True, check=True).stdout
    audio = asr_data.wav_to_audio(raw)
    with wave.open(io.BytesIO(raw)) as w:
        rate, width = w.getframerate(), w.getsampwidth()
        src = np.frombuffer(w.readframes(w.getnframes()), np.int16) / 32768.0
    assert width == 2 and rate != SR  # espeak-ng speaks at 22050 Hz: resampling is real
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == round(len(src) * SR / rate)
    # Same signal on the same time axis: sample i of the output sits at i / SR seconds.
    t = np.arange(len(audio)) / SR
    np.testing.assert_allclose(audio, np.interp(t, np.arange(len(src)) / rate, src),
                               atol=1e-6)
    assert np.abs(audio).max() > 0.05  # speech, not silence
    # synthesize is espeak-ng then this resampler.
    spoken = asr_data.synthesize(text, voice, speed=speed, pitch=pitch)
    assert spoken.dtype == np.float32 and np.abs(spoken).max() > 0.05


def test_voices_exist_and_sound_different():
    assert not set(asr_data.TRAIN_VOICES) & set(asr_data.TEST_VOICES)
    voices = asr_data.TRAIN_VOICES + asr_data.TEST_VOICES
    assert len(set(voices)) == len(voices)
    # espeak-ng exits non-zero for an unknown voice and silently ignores some variants
    # ("en-gb+m1" equals "en-gb"): every voice must give its own waveform.
    waves = {v: asr_data.synthesize("three", v, speed=160, pitch=50).tobytes()
             for v in voices}
    assert len(set(waves.values())) == len(voices)


def test_add_noise_snr():
    rng = np.random.default_rng(0)
    t = np.arange(4 * SR) / SR
    clean = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for snr_db in (10.0, 25.0):
        noisy = asr_data.add_noise(clean, snr_db, rng)
        assert noisy.dtype == np.float32 and noisy.shape == clean.shape
        noise = noisy.astype(np.float64) - clean
        measured = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2)
                                 / np.mean(noise**2))
        assert abs(measured - snr_db) < 0.1


# --- features -------------------------------------------------------------------------


@pytest.mark.parametrize("length,frames", [(0, 1), (100, 1), (400, 1), (559, 1),
                                           (560, 2), (16000, 98)])
def test_log_mel_shape_and_dtype(length, frames):
    audio = np.random.default_rng(0).normal(0, 0.1, length)  # float64 in
    out = asr_data.log_mel(audio)
    assert out.shape == (frames, asr_data.NUM_MELS)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert asr_data.log_mel(audio.astype(np.float32), num_mels=24).shape == (frames, 24)


def test_log_mel_matches_reference():
    rng = np.random.default_rng(0)
    t = np.arange(3000) / SR
    audio = (0.4 * np.sin(2 * np.pi * 700 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t)
             + rng.normal(0, 0.05, t.shape)).astype(np.float32)
    for num_mels in (40, 24):
        want = _reference_log_mel(audio, num_mels)
        got = asr_data.log_mel(audio, num_mels=num_mels)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("band", [2, 15, 30, 39])
def test_log_mel_sine_peaks_in_its_band(band):
    centers = _band_edges_hz(asr_data.NUM_MELS)[1:-1]
    t = np.arange(SR // 2) / SR
    audio = (0.5 * np.sin(2 * np.pi * centers[band] * t)).astype(np.float32)
    out = asr_data.log_mel(audio)
    np.testing.assert_array_equal(out.argmax(-1), band)
    # Energy is quadratic in amplitude: doubling the sine adds log 4 to strong bands.
    louder = asr_data.log_mel(2 * audio)
    strong = out > np.log(1e-2)
    assert strong[:, band].all()
    np.testing.assert_allclose((louder - out)[strong], np.log(4.0), atol=1e-3)


def test_log_mel_silence_is_finite():
    out = asr_data.log_mel(np.zeros(1600, np.float32))
    np.testing.assert_allclose(out, np.log(1e-6), rtol=1e-6)


# --- text -----------------------------------------------------------------------------


def test_encode_decode_round_trip():
    text = " ".join(asr_data.WORDS)
    ids = asr_data.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.min() > asr_data.BLANK_ID and ids.max() < len(asr_data.CHARS)
    assert asr_data.decode(ids) == text
    assert asr_data.CHARS[asr_data.BLANK_ID] == "<blank>"
    # Blanks and -1 padding are dropped, as in a padded CTC target or a raw decode.
    padded = np.concatenate([[0], asr_data.encode("go up"), [0, -1, -1]])
    assert asr_data.decode(padded.astype(np.int32)) == "go up"
    with pytest.raises(ValueError):
        asr_data.encode("Go")  # no upper case in the alphabet


# --- the data set ---------------------------------------------------------------------


def test_dataset_contents(small):
    for split, n in (("train", SMALL["num_train"]), ("test", SMALL["num_test"])):
        x, xl = getattr(small, f"x_{split}"), getattr(small, f"x_{split}_lengths")
        y, yl = getattr(small, f"y_{split}"), getattr(small, f"y_{split}_lengths")
        texts = getattr(small, f"texts_{split}")
        assert x.dtype == np.float32 and x.shape[0] == n
        assert x.shape[2] == asr_data.NUM_MELS and x.shape[1] == xl.max()
        assert xl.dtype == yl.dtype == y.dtype == np.int32
        assert y.shape == (n, yl.max())
        assert len(texts) == n and len(getattr(small, f"voices_{split}")) == n
        for i, text in enumerate(texts):
            words = text.split(" ")
            assert 1 <= len(words) <= SMALL["max_words"]
            assert set(words) <= set(asr_data.WORDS)
            assert yl[i] == len(text)
            np.testing.assert_array_equal(y[i, :yl[i]], asr_data.encode(text))
            assert (y[i, yl[i]:] == -1).all()
            assert asr_data.decode(y[i]) == text
            assert (x[i, xl[i]:] == 0).all()
            # CTC needs at least one frame per label (more with repeats).
            assert xl[i] >= 2 * yl[i]
            assert np.all(np.isfinite(x[i]))
    assert small.num_classes == len(asr_data.CHARS)
    assert small.blank_id == asr_data.BLANK_ID
    # Standardized with the training set's statistics over its valid frames.
    valid = np.concatenate([small.x_train[i, :n]
                            for i, n in enumerate(small.x_train_lengths)])
    np.testing.assert_allclose(valid.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(valid.std(0), 1.0, atol=1e-3)


def test_split_is_by_voice(small):
    assert set(small.voices_train) <= set(asr_data.TRAIN_VOICES)
    assert set(small.voices_test) <= set(asr_data.TEST_VOICES)
    assert not set(small.voices_train) & set(small.voices_test)


def test_generation_is_deterministic(small, tmp_path):
    again = asr_data.load(tmp_path / "a", **SMALL)
    _assert_same(small, again)
    other = asr_data.load(tmp_path / "b", **SMALL | dict(seed=1))
    assert other.texts_train != small.texts_train


def test_cache_hit_and_keys(tmp_path, monkeypatch):
    calls = []
    real_synthesize = asr_data.synthesize

    def counting(*args, **kwargs):
        calls.append(args)
        return real_synthesize(*args, **kwargs)

    monkeypatch.setattr(asr_data, "synthesize", counting)
    settings = dict(num_train=3, num_test=2, max_words=2, seed=0)
    first = asr_data.load(tmp_path, **settings)
    assert len(calls) == 5
    (cache,) = tmp_path.glob("*.npz")
    with np.load(cache) as f:
        meta = json.loads(str(f["meta"]))
    assert meta["num_train"] == 3 and meta["seed"] == 0
    assert "espeak" in meta["espeak"].lower()

    # A hit reads the file alone: no synthesis, not even the version query.
    def fail(*args, **kwargs):
        raise AssertionError("cache miss: espeak-ng was called")

    with monkeypatch.context() as m:
        m.setattr(asr_data, "synthesize", fail)
        m.setattr(asr_data, "espeak_binary", fail)
        _assert_same(first, asr_data.load(tmp_path, **settings))
        # The worker count changes how, not what, so it shares the cache.
        _assert_same(first, asr_data.load(tmp_path, **settings, workers=1))

    # Every setting that changes the data gets its own file.
    changes = [dict(num_train=4), dict(num_test=1), dict(max_words=3), dict(seed=1)]
    for i, change in enumerate(changes):
        calls.clear()
        data = asr_data.load(tmp_path, **settings | change)
        assert calls, change
        assert len(list(tmp_path.glob("*.npz"))) == i + 2
    assert len(data.texts_train) == 3 and data.texts_train != first.texts_train
    calls.clear()
    monkeypatch.setattr(asr_data, "TEST_VOICES", asr_data.TEST_VOICES[:2])
    asr_data.load(tmp_path, **settings)
    assert calls
    assert len(list(tmp_path.glob("*.npz"))) == len(changes) + 2
