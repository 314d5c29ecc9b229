"""Reference-audio intake (``impl/audio.py``) against what upstream's wrappers call: ``librosa.load(path, sr=None,
mono=True)`` and ``librosa.resample(y, orig_sr, target_sr=24000)`` (default ``res_type="soxr_hq"``).

Row "Resampler (soxr HQ vs librosa.resample)": our soxr call against librosa's on a 16 kHz and a 44.1 kHz signal,
judged exactly, with the measured max difference recorded. Row "Audio intake": a stereo 44.1 kHz file through
our loader + resampler against librosa's load + resample of the same file.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from impl.audio import AudioTooShortError, load_audio, load_reference_audio, resample, to_mono
from reports.compare import compare_exact
from reports.results import LIBROSA

librosa = pytest.importorskip("librosa")
sf = pytest.importorskip("soundfile")


def _signal(sr: int, seconds: float, seed: int, channels: int = 1) -> np.ndarray:
    """A chirp (50 Hz -> 0.45 sr) plus noise: exercises the whole band, including near Nyquist."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    f1 = 0.45 * sr
    chirp = np.sin(2 * np.pi * (50 * t + (f1 - 50) * t**2 / (2 * seconds)))
    y = 0.5 * chirp[:, None] + 0.1 * rng.standard_normal((t.size, channels))
    y = y.astype(np.float32)
    return y[:, 0] if channels == 1 else y


@pytest.mark.parametrize("sr", [16000, 44100])
def test_resampler_matches_librosa(sr, record):
    y = _signal(sr, 2.3, sr)
    ours = resample(y, sr, 24000)
    ref = librosa.resample(y=y, orig_sr=sr, target_sr=24000)
    r = compare_exact(f"resample {sr} -> 24000", torch.from_numpy(ours), torch.from_numpy(ref), axes=("sample",))
    r.extra["max_abs_diff"] = float(np.abs(ours.astype(np.float64) - ref).max()) if ours.shape == ref.shape else None
    r.extra["n_out"] = int(ours.shape[0])
    record(r, row="Resampler (soxr HQ vs librosa.resample)", component="Audio intake",
           notes=f"{sr} Hz, {y.size} samples -> {ours.size}; max |diff| {r.extra['max_abs_diff']}", compares=LIBROSA)
    assert ours.dtype == np.float32 and ours.size == math.ceil(y.size * 24000 / sr)
    assert r, r.message


def test_resample_same_rate_is_identity():
    y = _signal(24000, 0.2, 0)
    assert resample(y, 24000) is y


def test_file_intake_matches_librosa(tmp_path, record):
    """Stereo 44.1 kHz file: our soundfile read + channel mean + soxr against librosa.load + librosa.resample."""
    path = tmp_path / "ref_stereo.wav"
    sf.write(path, _signal(44100, 1.7, 3, channels=2), 44100, subtype="PCM_16")
    wav, sr = load_audio(path)
    ref_wav, ref_sr = librosa.load(path, sr=None, mono=True)
    r1 = compare_exact("load + mono mixdown", torch.from_numpy(wav), torch.from_numpy(ref_wav), axes=("sample",))
    ours = load_reference_audio(path)
    ref = librosa.resample(y=ref_wav.astype(np.float32), orig_sr=ref_sr, target_sr=24000).astype(np.float32)
    r2 = compare_exact("load + mono + resample to 24 kHz", torch.from_numpy(ours), torch.from_numpy(ref),
                       axes=("sample",))
    for r in (r1, r2):
        record(r, row="Audio intake", component="Audio intake", notes="stereo 44.1 kHz PCM_16 wav", compares=LIBROSA)
    assert sr == ref_sr == 44100
    assert r1 and r2, f"{r1.message} | {r2.message}"


def test_mono_mixdown_is_channel_mean():
    y = np.stack([np.ones(10, np.float32), 3 * np.ones(10, np.float32)], axis=-1)  # (T, 2)
    assert np.array_equal(to_mono(y), np.full(10, 2.0, np.float32))


def test_too_short_names_the_file(tmp_path):
    path = tmp_path / "tiny_clip.wav"
    sf.write(path, np.zeros(800, np.float32), 16000)  # 800 samples at 16 kHz -> 1200 at 24 kHz < 1280
    with pytest.raises(AudioTooShortError, match=r"tiny_clip\.wav: 1200 samples .*need at least 1280"):
        load_reference_audio(path)


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "not_audio.wav"
    path.write_bytes(b"this is not a wav file")
    with pytest.raises(ValueError, match="not_audio.wav: cannot read audio"):
        load_audio(path)
