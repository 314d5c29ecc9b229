"""ECAPA-TDNN speaker encoder of the Base checkpoints (upstream ``Qwen3TTSSpeakerEncoder``, M:95-395) and the
x-vector extraction around it (upstream ``Qwen3TTSForConditionalGeneration.extract_speaker_embedding``, M:1941).

Module names equal the checkpoint keys under ``speaker_encoder.``::

    blocks.0                      TDNN  mel_dim -> C0, k5                       (B, C0, F)
    blocks.{1,2,3}                SE-Res2Net: tdnn1 (k1) -> res2net_block (scale s, k3, dilation 2/3/4)
                                  -> tdnn2 (k1) -> se_block, plus the residual    (B, Ci, F)
    mfa                           TDNN over cat(blocks 1..3) -> C4, k1            (B, C4, F)
    asp                           attentive statistics pooling                   (B, 2*C4, 1)
    fc                            Conv1d 2*C4 -> enc_dim, k1                      (B, enc_dim)

Every Conv1d is ``padding="same", padding_mode="reflect"`` with a bias, exactly as upstream (torch's own
``nn.Conv1d`` padding modes: left ``d*(k-1)//2``, right the rest). Reflect padding needs more input frames than
the pad, which is what bounds the shortest usable clip (:func:`min_samples`).

Notation: B batch, F mel frames, C channels.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .audio import check_min_length
from .config import SpeakerEncoderConfig
from .mel import HOP as MEL_HOP
from .mel import N_FFT as MEL_N_FFT
from .mel import frame_padding, mel_spectrogram

STAT_EPS = 1e-12  # variance floor in the pooling statistics (upstream AttentiveStatisticsPooling.eps)


def same_conv(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Conv1d:
    """Conv1d with reflect "same" padding and a bias (every conv of upstream's ECAPA-TDNN)."""
    return nn.Conv1d(cin, cout, kernel, dilation=dilation, padding="same", padding_mode="reflect")


class TimeDelayNetBlock(nn.Module):
    """``relu(conv(x))`` (upstream ``TimeDelayNetBlock``).

    >>> TimeDelayNetBlock(8, 4, 3, 2)(torch.zeros(1, 8, 10)).shape
    torch.Size([1, 4, 10])
    """

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int):
        super().__init__()
        self.conv = same_conv(cin, cout, kernel, dilation)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x))


class Res2NetBlock(nn.Module):
    """Split channels into ``scale`` chunks; ``y0 = x0``, ``y1 = tdnn(x1)``, ``yi = tdnn(xi + y_{i-1})``; concat
    (upstream ``Res2NetBlock``).

    >>> Res2NetBlock(8, 8, scale=4, kernel=3, dilation=2)(torch.zeros(1, 8, 10)).shape
    torch.Size([1, 8, 10])
    """

    def __init__(self, cin: int, cout: int, scale: int, kernel: int, dilation: int):
        super().__init__()
        self.scale = scale
        self.blocks = nn.ModuleList(
            [TimeDelayNetBlock(cin // scale, cout // scale, kernel, dilation) for _ in range(scale - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        y = x
        for i, part in enumerate(torch.chunk(x, self.scale, dim=1)):  # scale x (B, C/scale, F)
            if i == 0:
                y = part
            elif i == 1:
                y = self.blocks[0](part)
            else:
                y = self.blocks[i - 1](part + y)
            outs.append(y)
        return torch.cat(outs, dim=1)  # (B, C, F)


class SqueezeExcitationBlock(nn.Module):
    """``x * sigmoid(conv2(relu(conv1(mean_t(x)))))`` (upstream ``SqueezeExcitationBlock``).

    >>> SqueezeExcitationBlock(8, 4, 8)(torch.zeros(1, 8, 10)).shape
    torch.Size([1, 8, 10])
    """

    def __init__(self, cin: int, se_channels: int, cout: int):
        super().__init__()
        self.conv1 = same_conv(cin, se_channels, 1)
        self.relu = nn.ReLU()
        self.conv2 = same_conv(se_channels, cout, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=2, keepdim=True)  # (B, C, 1)
        s = self.sigmoid(self.conv2(self.relu(self.conv1(s))))
        return x * s


class SqueezeExcitationRes2NetBlock(nn.Module):
    """``se(tdnn2(res2net(tdnn1(x)))) + x`` (upstream ``SqueezeExcitationRes2NetBlock``)."""

    def __init__(self, cin: int, cout: int, scale: int, se_channels: int, kernel: int, dilation: int):
        super().__init__()
        self.tdnn1 = TimeDelayNetBlock(cin, cout, 1, 1)
        self.res2net_block = Res2NetBlock(cout, cout, scale, kernel, dilation)
        self.tdnn2 = TimeDelayNetBlock(cout, cout, 1, 1)
        self.se_block = SqueezeExcitationBlock(cout, se_channels, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x)))) + x


def _weighted_stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and std over time: x (B, C, F), w (B, 1|C, F) summing to 1 -> (B, C) each.

    ``sum(w * x)``, not ``x.mean()``: upstream forms the uniform weights ``1/F`` and sums, which rounds
    differently. The variance is floored at ``STAT_EPS`` before the sqrt.
    """
    mean = (w * x).sum(2)
    std = torch.sqrt((w * (x - mean.unsqueeze(2)).pow(2)).sum(2).clamp(STAT_EPS))
    return mean, std


class AttentiveStatisticsPooling(nn.Module):
    """Channel-wise attentive mean and std (upstream ``AttentiveStatisticsPooling``): (B, C, F) -> (B, 2C, 1).

    Upstream builds an all-ones length mask (every item is full length), so the "masked" steps are no-ops:
    the global stats use uniform weights ``1/F``, the attention softmax runs over all frames in the activation
    dtype (no fp32 upcast).

    >>> AttentiveStatisticsPooling(8, 4)(torch.zeros(2, 8, 10)).shape
    torch.Size([2, 16, 1])
    """

    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TimeDelayNetBlock(channels * 3, attention_channels, 1, 1)
        self.tanh = nn.Tanh()
        self.conv = same_conv(attention_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T = x.shape
        ones = torch.ones(B, 1, T, dtype=x.dtype, device=x.device)
        uniform = ones / ones.sum(dim=2, keepdim=True)  # (B, 1, F): 1/F, as upstream's mask / total
        mean, std = _weighted_stats(x, uniform)
        context = torch.cat([x, mean.unsqueeze(2).expand(B, C, T), std.unsqueeze(2).expand(B, C, T)], dim=1)  # (B, 3C, F)
        att = self.conv(self.tanh(self.tdnn(context)))  # (B, C, F)
        att = torch.softmax(att, dim=2)
        mean, std = _weighted_stats(x, att)
        return torch.cat((mean, std), dim=1).unsqueeze(2)  # (B, 2C, 1)


class SpeakerEncoderOutput(NamedTuple):
    embedding: torch.Tensor  # (B, enc_dim)


class SpeakerEncoder(nn.Module):
    """ECAPA-TDNN (upstream ``Qwen3TTSSpeakerEncoder``): mel (B, F, mel_dim) -> x-vector (B, enc_dim)."""

    def __init__(self, cfg: SpeakerEncoderConfig):
        super().__init__()
        ch, ks, dl = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        if not len(ch) == len(ks) == len(dl):
            raise ValueError("enc_channels, enc_kernel_sizes and enc_dilations must have the same length")
        self.cfg = cfg
        self.blocks = nn.ModuleList([TimeDelayNetBlock(cfg.mel_dim, ch[0], ks[0], dl[0])])
        for i in range(1, len(ch) - 1):
            self.blocks.append(SqueezeExcitationRes2NetBlock(
                ch[i - 1], ch[i], cfg.enc_res2net_scale, cfg.enc_se_channels, ks[i], dl[i]))
        self.mfa = TimeDelayNetBlock(ch[-1], ch[-1], ks[-1], dl[-1])
        self.asp = AttentiveStatisticsPooling(ch[-1], cfg.enc_attention_channels)
        self.fc = same_conv(ch[-1] * 2, cfg.enc_dim, 1)

    def forward(self, mels: torch.Tensor) -> SpeakerEncoderOutput:
        """mels (B, F, mel_dim) -> embedding (B, enc_dim). Needs F >= :func:`min_frames`."""
        x = mels.transpose(1, 2)  # (B, mel_dim, F)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        x = self.mfa(torch.cat(outs[1:], dim=1))  # (B, sum(C1..C3), F) -> (B, C4, F)
        x = self.asp(x)  # (B, 2*C4, 1)
        return SpeakerEncoderOutput(self.fc(x).squeeze(-1))  # (B, enc_dim)


def min_frames(cfg: SpeakerEncoderConfig) -> int:
    """Fewest mel frames every reflect "same" conv accepts: reflect needs input > pad, and the right pad of a
    dilated conv is ``d*(k-1) - d*(k-1)//2`` (4 for k3, d4 -> 5 frames)."""
    pads = [d * (k - 1) - d * (k - 1) // 2 for k, d in zip(cfg.enc_kernel_sizes, cfg.enc_dilations)]
    return max(pads) + 1


def min_samples(cfg: SpeakerEncoderConfig) -> int:
    """Fewest 24 kHz samples that give ``min_frames`` mel frames (1280 for the released kernels/dilations)."""
    need = min_frames(cfg)
    n = (need - 1) * MEL_HOP + MEL_N_FFT - 2 * frame_padding()  # invert F = (N + 2*pad - n_fft)//hop + 1
    return max(n, frame_padding() + 1)


@torch.no_grad()
def extract_xvector(encoder: SpeakerEncoder, wav: np.ndarray, sr: int) -> torch.Tensor:
    """x-vector (D,) of a mono 24 kHz clip (upstream ``extract_speaker_embedding``).

    As upstream: the mel is built from the float32 numpy clip on CPU, transposed to (1, F, 128), then cast to
    the encoder's device and dtype (bf16 in typical use) before the network. Resampling belongs to the intake
    (``impl.audio.load_reference_audio``); a clip that is not 24 kHz here is an error, as upstream's assert.
    """
    if sr != encoder.cfg.sample_rate:
        raise ValueError(f"extract_xvector: expected {encoder.cfg.sample_rate} Hz audio, got {sr} Hz "
                         "(resample with impl.audio.resample first)")
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"extract_xvector: expected a mono (T,) clip, got shape {wav.shape}")
    check_min_length(wav, "speaker-encoder input", min_samples(encoder.cfg), sr)
    mels = mel_spectrogram(torch.from_numpy(wav)[None]).transpose(1, 2)  # (1, F, 128) fp32, CPU
    p = next(encoder.parameters())
    return encoder(mels.to(p.device).to(p.dtype)).embedding[0]  # (D,)


__all__ = ["SpeakerEncoder", "SpeakerEncoderOutput", "TimeDelayNetBlock", "Res2NetBlock", "SqueezeExcitationBlock",
           "SqueezeExcitationRes2NetBlock", "AttentiveStatisticsPooling", "extract_xvector", "min_frames",
           "min_samples"]
