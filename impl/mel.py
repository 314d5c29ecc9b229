"""The 128-bin log-mel front end of the speaker encoder (upstream ``mel_spectrogram`` in
``qwen_tts/core/models/modeling_qwen3_tts.py``, called by ``extract_speaker_embedding`` with
``n_fft=1024, num_mels=128, sampling_rate=24000, hop_size=256, win_size=1024, fmin=0, fmax=12000``).

Pipeline for a waveform ``y`` (B, N), float in [-1, 1] at 24 kHz::

    y   = reflect_pad(y, (n_fft - hop) // 2 = 384 each side)              # (B, N + 768)
    S   = stft(y, n_fft 1024, hop 256, periodic Hann 1024, center=False)   # (B, 513, F) complex
    mag = sqrt(re^2 + im^2 + 1e-9)                                         # (B, 513, F)
    mel = log(clamp(M @ mag, min=1e-5))                                    # (B, 128, F), natural log

    F = (N + 768 - 1024) // 256 + 1

``M`` is the Slaney-scale, Slaney-normalised filterbank that ``librosa.filters.mel(sr=24000, n_fft=1024,
n_mels=128, fmin=0, fmax=12000)`` returns (librosa defaults ``htk=False, norm="slaney", dtype=float32``). It is
computed here in numpy, following librosa's float64 arithmetic and its float32 rounding points, so it matches
librosa bit for bit; ``parity_tests/test_mel.py`` checks that against real librosa (used only in tests).

Deliberate differences from upstream: none in the numbers. Upstream prints a warning when |y| > 1; we do not.
The function runs on ``y``'s device; the STFT is always computed in fp32 (``torch.stft`` has no bf16 kernels and
upstream computes the mel in fp32 on CPU before casting to the model dtype).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

# The speaker encoder's front-end settings (upstream passes them literally at M:1943).
SAMPLE_RATE = 24000
N_FFT = 1024
HOP = 256
WIN = 1024
N_MELS = 128
FMIN = 0.0
FMAX = 12000.0
MAG_EPS = 1e-9  # added under the sqrt of |S|^2 (keeps the gradient finite at 0; changes values ~1e-5 near 0)
LOG_CLAMP = 1e-5  # floor before the natural log (upstream ``dynamic_range_compression_torch``)


# ------------------------------------------------------------------------------------------- filterbank


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (step log(6.4)/27)."""
    f = np.asanyarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-300) / min_log_hz) / logstep, mels)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS, fmin: float = FMIN,
                   fmax: float = FMAX) -> np.ndarray:
    """Slaney mel filterbank, (n_mels, n_fft // 2 + 1) float32, equal to ``librosa.filters.mel`` defaults.

    Triangles are computed in float64 and stored in float32 (librosa writes them into a float32 array), then
    scaled in place by the float64 Slaney norm ``2 / (f[i+2] - f[i])`` and rounded to float32 again: both rounding
    points are kept so the result is bit-identical, not merely close.

    >>> mel_filterbank().shape
    (128, 513)
    """
    fftfreqs = np.arange(0, n_fft // 2 + 1, dtype=int) * (1.0 / (n_fft * (1.0 / sr)))  # (n_fft/2+1,) Hz
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))  # (n_mels+2,) band edges, Hz
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)  # (n_mels+2, n_fft/2+1)
    weights = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))  # float64 -> float32 store
    enorm = 2.0 / (mel_f[2: n_mels + 2] - mel_f[:n_mels])  # float64
    weights *= enorm[:, np.newaxis]  # float32 * float64 computed in float64, stored back as float32
    return weights


# --------------------------------------------------------------------------------------------- the mel


def frame_padding(n_fft: int = N_FFT, hop: int = HOP) -> int:
    """Reflect padding on each side: ``(n_fft - hop) // 2`` (384), so frames are centred without ``center=True``."""
    return (n_fft - hop) // 2


def num_frames(n_samples: int, n_fft: int = N_FFT, hop: int = HOP) -> int:
    """Mel frames for ``n_samples`` input samples: ``(N + 2*pad - n_fft) // hop + 1`` (24000 -> 93)."""
    return (n_samples + 2 * frame_padding(n_fft, hop) - n_fft) // hop + 1


def mel_spectrogram(y: torch.Tensor, *, n_fft: int = N_FFT, n_mels: int = N_MELS, sr: int = SAMPLE_RATE,
                    hop: int = HOP, win: int = WIN, fmin: float = FMIN, fmax: float = FMAX,
                    center: bool = False) -> torch.Tensor:
    """Log-mel spectrogram (upstream ``mel_spectrogram``): y (B, N) or (N,) -> (B, n_mels, F) fp32.

    Needs ``N > (n_fft - hop) // 2`` (reflect padding); the speaker encoder needs more (see
    ``impl.speaker_encoder.min_samples``).

    >>> mel_spectrogram(torch.zeros(2, 24000)).shape
    torch.Size([2, 128, 93])
    """
    if y.ndim == 1:
        y = y[None]
    B, N = y.shape
    pad = frame_padding(n_fft, hop)
    if N <= pad:
        raise ValueError(f"mel_spectrogram: {N} samples is too short for the {pad}-sample reflect padding")
    # Always fp32: torch.stft has no bf16 kernel, and upstream builds the mel in fp32 before any cast.
    y = y.to(torch.float32)
    basis = torch.from_numpy(mel_filterbank(sr, n_fft, n_mels, float(fmin), float(fmax))).to(y.device)  # (M, K)
    window = torch.hann_window(win, device=y.device, dtype=torch.float32)  # periodic Hann (torch default)
    y = F.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)  # (B, N + 2*pad)
    spec = torch.stft(y, n_fft, hop_length=hop, win_length=win, window=window, center=center, pad_mode="reflect",
                      normalized=False, onesided=True, return_complex=True)  # (B, K, F) complex
    # |S| as sqrt(re^2 + im^2 + eps), summed in this order (not torch.abs, which rounds differently).
    mag = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + MAG_EPS)  # (B, K, F)
    mel = torch.matmul(basis, mag)  # (B, M, F)
    return torch.log(torch.clamp(mel, min=LOG_CLAMP))


__all__ = ["mel_filterbank", "mel_spectrogram", "frame_padding", "num_frames", "SAMPLE_RATE", "N_FFT", "HOP",
           "N_MELS"]
