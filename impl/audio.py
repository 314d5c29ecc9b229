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

URL and base64 inputs, which upstream also accepts, are not handled here (``impl`` does no network I/O): a URL
gets a one-line refusal.

Bad input is refused with one ``ValueError`` line naming the source (``AudioInputError``): NaN/Inf samples (they
would become a NaN speaker embedding and NaN codes), sample rates below ``MIN_SR`` (soxr takes forever to upsample
1 Hz) or not positive, arrays of more than two dimensions, empty clips. Deliberate differences from upstream, which
casts any array with ``astype(np.float32)`` and averages the last axis: integer PCM arrays are scaled to [-1, 1]
as soundfile reads integer files (int16 / 32768), and a 2-D array whose first axis is the short one (at most
``MAX_CHANNELS``) is taken as channels-first ``(C, T)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

TARGET_SR = 24000
# Shortest clip the released (and tiny) speaker encoder accepts at 24 kHz; see impl.speaker_encoder.min_samples.
MIN_SAMPLES_24K = 1280


# Lowest sample rate accepted: below it no speech band survives, and soxr's upsampling to 24 kHz takes minutes
# (1 Hz never finishes in practice).
MIN_SR = 1000
MAX_CHANNELS = 8  # a 2-D array's short axis up to this size is its channel axis


class AudioInputError(ValueError):
    """Reference audio that cannot be used: unreadable, non-finite, an impossible sample rate or shape."""


class AudioTooShortError(AudioInputError):
    """A reference clip shorter than the speaker encoder's reflect padding allows."""


def to_mono(wav: np.ndarray, name: str = "reference array") -> np.ndarray:
    """(T,), (T, C) or (C, T) -> (T,) float32; channels averaged in float32 (as ``np.mean`` in upstream and
    librosa). Integer PCM is scaled to [-1, 1] (int16 / 32768, as soundfile reads integer files). A torch tensor
    may be on any device and in any dtype (bf16 has no numpy twin: it is read as float32)."""
    if hasattr(wav, "detach") and hasattr(wav, "cpu"):  # torch.Tensor, without importing torch here
        wav = wav.detach().cpu()
        wav = wav.float() if str(wav.dtype) == "torch.bfloat16" else wav
        wav = wav.numpy()
    wav = np.asarray(wav)
    if wav.dtype.kind in "iu":
        info = np.iinfo(wav.dtype)
        # Unsigned PCM (uint8 WAV) is centred on its midpoint; signed is centred on 0.
        mid = (int(info.max) + 1) // 2 if wav.dtype.kind == "u" else 0
        wav = ((wav.astype(np.float64) - mid) / float(-info.min if info.min < 0 else mid)).astype(np.float32)
    elif wav.dtype.kind == "b" or wav.dtype.kind not in "f":
        raise AudioInputError(f"{name}: samples of dtype {wav.dtype} are not audio (expected float or int PCM)")
    if wav.ndim == 2:
        channels_first = wav.shape[0] <= MAX_CHANNELS < wav.shape[1]
        wav = np.mean(wav, axis=0 if channels_first else -1)
    elif wav.ndim != 1:
        raise AudioInputError(f"{name}: expected a (T,), (T, C) or (C, T) array, got shape {wav.shape}")
    return wav.astype(np.float32)


def check_sample_rate(sr: object, name: str) -> int:
    """``sr`` as an int >= ``MIN_SR``, or one line naming the source."""
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer, float)) or sr != sr or int(sr) != sr:
        raise AudioInputError(f"{name}: sample rate {sr!r} is not a whole number of Hz")
    if int(sr) < MIN_SR:
        raise AudioInputError(f"{name}: sample rate {int(sr)} Hz is below {MIN_SR} Hz (nothing of speech survives; "
                              "a wrong value?)")
    return int(sr)


def check_finite(wav: np.ndarray, name: str) -> None:
    """Refuse NaN/Inf samples (they would become a NaN speaker embedding and NaN reference codes)."""
    if wav.size and not np.isfinite(wav).all():
        bad = int((~np.isfinite(wav)).sum())
        raise AudioInputError(f"{name}: {bad} of {wav.size} samples are NaN or Inf")


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a file with soundfile as float32 and mix it down: -> ((T,) float32, native sample rate)."""
    import soundfile as sf

    s = str(path)
    if s.split("://", 1)[0].lower() in ("http", "https", "ftp", "s3", "gs") and "://" in s:
        raise AudioInputError(f"{s}: a URL; impl does no network I/O, download the file and pass its path")
    p = Path(s)
    if not p.exists():
        raise AudioInputError(f"{s}: file not found")
    if p.is_dir():
        raise AudioInputError(f"{s}: is a directory, not an audio file")
    try:
        wav, sr = sf.read(s, dtype="float32", always_2d=False)
    except (RuntimeError, sf.LibsndfileError, OSError) as e:  # soundfile raises LibsndfileError (a RuntimeError)
        raise AudioInputError(f"{s}: cannot read audio ({str(e).strip().splitlines()[0] if str(e).strip() else e})") \
            from None
    return to_mono(wav, s), int(sr)


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
    if isinstance(src, (tuple, list)):
        if len(src) != 2:
            raise AudioInputError(f"reference audio: expected a path or a (wav, sample_rate) pair, got a "
                                  f"{type(src).__name__} of {len(src)} items")
        wav, sr = src
        name = f"reference array ({sr!r} Hz)"
        sr = check_sample_rate(sr, name)
        wav = to_mono(wav, name)
    elif isinstance(src, (str, Path)):
        name = str(src)
        wav, sr = load_audio(src)
        sr = check_sample_rate(sr, name)
    else:
        raise AudioInputError(f"reference audio: expected a path or a (wav, sample_rate) pair, got "
                              f"{type(src).__name__}")
    check_finite(wav, name)
    out = resample(wav, sr, target_sr).astype(np.float32)
    check_min_length(out, name, min_samples, target_sr)
    return out


__all__ = ["TARGET_SR", "MIN_SAMPLES_24K", "MIN_SR", "AudioInputError", "AudioTooShortError", "to_mono",
           "check_sample_rate", "check_finite", "load_audio", "resample",
           "check_min_length", "load_reference_audio"]
