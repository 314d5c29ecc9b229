"""Reference-audio intake: read a file, mix down to mono, resample to 24 kHz, refuse clips that are too short.

Mirrors what upstream's wrappers do before the speaker encoder and the speech-tokenizer encoder see a reference
(``Qwen3TTSModel._load_audio_to_np`` / ``_normalize_audio_inputs`` and ``Qwen3TTSTokenizer.load_audio`` in
``qwen_tts/inference/``):

- files: upstream calls ``librosa.load(path, sr=None, mono=True)``, which reads float32 through soundfile and
  averages the channels; we read with soundfile directly and average the channels (same float32 mean);
- arrays ``(wav, sr)``: cast to float32, channels (last axis) averaged;
- resampling: ``librosa.resample(y, orig_sr=sr, target_sr=24000)`` with its default ``res_type="soxr_hq"``,
  i.e. ``soxr.resample(y, sr, 24000, quality="HQ")`` followed by ``fix_length`` to ``ceil(N * 24000 / sr)``
  samples (zero-pad or trim at the end) and a cast back to the input dtype. We call soxr the same way, so the
  result equals librosa's bit for bit (``parity_tests/test_audio.py`` measures it). No loudness normalisation.
- length guard: upstream crashes deep inside the speaker encoder's reflect padding for clips under ~1280 samples
  at 24 kHz (5 mel frames; the widest "same" conv needs 4 frames of reflect padding on each side). We raise a
  one-line ``AudioTooShortError`` naming the source and its length instead.

URL and base64 inputs, which upstream also accepts, are not handled here (``impl`` does no network I/O).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

TARGET_SR = 24000
# Shortest clip the released (and tiny) speaker encoder accepts at 24 kHz; see impl.speaker_encoder.min_samples.
MIN_SAMPLES_24K = 1280


class AudioTooShortError(ValueError):
    """A reference clip shorter than the speaker encoder's reflect padding allows."""


def to_mono(wav: np.ndarray) -> np.ndarray:
    """(T,) or (T, C) -> (T,) float32; channels averaged in float32 (as ``np.mean`` in upstream and librosa)."""
    wav = np.asarray(wav)
    if wav.ndim > 1:
        wav = np.mean(wav, axis=-1)
    return wav.astype(np.float32)


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a file with soundfile as float32 and mix it down: -> ((T,) float32, native sample rate)."""
    import soundfile as sf

    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except (RuntimeError, sf.LibsndfileError) as e:  # soundfile raises LibsndfileError (a RuntimeError)
        raise ValueError(f"{path}: cannot read audio ({e})") from None
    return to_mono(wav), int(sr)


def resample(wav: np.ndarray, orig_sr: int, target_sr: int = TARGET_SR) -> np.ndarray:
    """soxr "HQ" resampling with librosa's length fix: (T,) -> (ceil(T * target/orig),), dtype kept.

    Equal sample rates return the input unchanged (librosa returns it as is, too).
    """
    if orig_sr == target_sr:
        return wav
    import soxr

    n_out = int(math.ceil(wav.shape[-1] * (float(target_sr) / orig_sr)))  # librosa: int(np.ceil(n * ratio))
    y = soxr.resample(wav, orig_sr, target_sr, quality="HQ")
    if y.shape[-1] > n_out:
        y = y[..., :n_out]
    elif y.shape[-1] < n_out:
        y = np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, n_out - y.shape[-1])])
    return np.asarray(y, dtype=wav.dtype)


def check_min_length(wav: np.ndarray, name: str = "reference audio", min_samples: int = MIN_SAMPLES_24K,
                     sr: int = TARGET_SR) -> None:
    """Raise ``AudioTooShortError`` (one line, naming ``name``) if ``wav`` has fewer than ``min_samples``."""
    n = int(wav.shape[-1])
    if n < min_samples:
        raise AudioTooShortError(
            f"{name}: {n} samples ({n / sr * 1000:.1f} ms at {sr} Hz) is too short for the speaker encoder; "
            f"need at least {min_samples} samples ({min_samples / sr * 1000:.1f} ms)")


def load_reference_audio(src: str | Path | tuple[np.ndarray, int], target_sr: int = TARGET_SR,
                         min_samples: int = MIN_SAMPLES_24K) -> np.ndarray:
    """A path or a ``(wav, sr)`` pair -> mono float32 (T,) at ``target_sr``, length-checked.

    >>> load_reference_audio((np.zeros((48000, 2), np.float32), 48000)).shape
    (24000,)
    """
    if isinstance(src, tuple):
        wav, sr = src
        name = f"reference array ({sr} Hz)"
        wav, sr = to_mono(wav), int(sr)
    else:
        name = str(src)
        wav, sr = load_audio(src)
    out = resample(wav, sr, target_sr).astype(np.float32)
    check_min_length(out, name, min_samples, target_sr)
    return out


__all__ = ["TARGET_SR", "MIN_SAMPLES_24K", "AudioTooShortError", "to_mono", "load_audio", "resample",
           "check_min_length", "load_reference_audio"]
