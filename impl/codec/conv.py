"""Causal convolutional layers of the speech-tokenizer decoder, each with an explicit streaming state.

One convention everywhere: ``y, state = layer(x, state)`` (a ``Streamed`` NamedTuple). ``state=None`` is the
fresh state (zero history, exactly upstream's zero left-padding), so ``layer(x).y`` *is* the one-shot computation,
not a second code path. Children are called through ``__call__`` on both paths, so forward hooks (taps) see every
module whether the decoder runs one-shot or streaming; ``first_tensor`` picks ``y`` out of the NamedTuple.
Feeding a sequence in pieces, carrying the state, gives the same samples as feeding it whole: every layer here is
causal, and every state is the part of the past that the next output still needs. States are never mutated.

Notation: B batch, C channels, T time steps (frames or samples at this layer's rate).

Layers and the upstream classes they reproduce (``qwen_tts/core/tokenizer_12hz/modeling_qwen3_tts_tokenizer_v2``):

- ``CausalConv1d``       ``Qwen3TTSTokenizerV2CausalConvNet``       state: the last ``(k-1)*d`` input steps
- ``CausalTransConv1d``  ``Qwen3TTSTokenizerV2CausalTransConvNet``  state: the ``k-s`` overlap-add tail
- ``SnakeBeta``          ``SnakeBeta``                              stateless (pointwise): ``forward(x) -> Tensor``
- ``ConvNeXtBlock``      ``Qwen3TTSTokenizerV2ConvNeXtBlock``       state: its depthwise conv's
- ``ResidualUnit``       ``Qwen3TTSTokenizerV2DecoderDecoderResidualUnit``  state: its two convs'
- ``DecoderBlock``       ``Qwen3TTSTokenizerV2DecoderDecoderBlock`` state: trans conv + three residual units
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------ states


@dataclass
class ConvState:
    """History of a causal conv: the last ``(k-1)*d`` input steps, (B, C_in, (k-1)*d)."""

    history: torch.Tensor


@dataclass
class TransConvState:
    """Overlap-add tail of a transposed conv: the ``k-s`` output steps that the *next* input frame still adds
    to, without bias, (B, C_out, k-s). Upstream's one-shot trims exactly these from the right."""

    tail: torch.Tensor


@dataclass
class ConvNeXtState:
    dwconv: ConvState


@dataclass
class ResidualUnitState:
    conv1: ConvState
    conv2: ConvState


@dataclass
class DecoderBlockState:
    upsample: TransConvState  # block.1
    residuals: tuple[ResidualUnitState, ...]  # block.2, block.3, block.4


class Streamed(NamedTuple):
    """What every stateful layer (and ``CodecDecoder._step``) returns: the output chunk and the state to pass with
    the next chunk."""

    y: torch.Tensor
    state: object


# ------------------------------------------------------------------------------------------ layers


class CausalConv1d(nn.Module):
    """Causal Conv1d: zero left padding of ``(k-1)*d + 1 - stride``, plus upstream's right ``extra_padding`` so
    the last window is complete (zero for stride 1, the only stride the decoder uses). Upstream
    ``Qwen3TTSTokenizerV2CausalConvNet``; the weights live in ``.conv`` as upstream's do.

    >>> y, state = CausalConv1d(4, 6, 7, dilation=3)(torch.zeros(2, 4, 10))
    >>> y.shape, state.history.shape
    (torch.Size([2, 6, 10]), torch.Size([2, 4, 18]))
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation,
                              groups=groups)
        self.stride = stride
        self.eff_kernel = (kernel_size - 1) * dilation + 1  # receptive field of one output step
        self.padding = self.eff_kernel - stride  # all on the left: output t sees inputs <= t

    def _extra_right(self, length: int) -> int:
        """Upstream ``_get_extra_padding_for_conv1d``: right zeros so ceil(frames) windows fit."""
        n_frames = (length - self.eff_kernel + self.padding) / self.stride + 1
        ideal = (math.ceil(n_frames) - 1) * self.stride + (self.eff_kernel - self.padding)
        return ideal - length

    def forward(self, x: torch.Tensor, state: ConvState | None = None) -> Streamed:
        """x (B, C_in, T) -> y (B, C_out, T) and the new history: the last (k-1)*d steps of [history, x], so
        chunks shorter than the kernel carry older history forward correctly. ``state=None`` = zero history,
        which is exactly upstream's zero left padding."""
        if self.stride != 1:
            # Only strided (encoder-style) convs need upstream's end padding; they have no streaming state here.
            if state is not None:
                raise NotImplementedError("streaming is implemented for stride-1 causal convs (all the decoder has)")
            return Streamed(self.conv(F.pad(x, (self.padding, self._extra_right(x.shape[-1])))), None)
        if state is None:
            state = ConvState(x.new_zeros(x.shape[0], x.shape[1], self.padding))
        xp = torch.cat((state.history, x), dim=-1)  # (B, C_in, (k-1)*d + T)
        y = self.conv(xp)  # (B, C_out, T): a valid conv over the left-padded sequence
        # clone: a view would keep the whole padded input alive as long as the state (GBs at audio rate).
        return Streamed(y, ConvState(xp[..., xp.shape[-1] - self.padding:].clone()))


class CausalTransConv1d(nn.Module):
    """ConvTranspose1d trimmed by ``k - s`` on the RIGHT only (upstream ``Qwen3TTSTokenizerV2CausalTransConvNet``
    as of qwen-tts 0.1.0; earlier releases split the trim between both ends). T frames in, exactly ``T*s`` out.

    The trimmed right samples are partial sums still waiting for the next input frame's contribution: in
    streaming they are carried as the state (without bias) and added to the next chunk's first ``k-s`` samples.

    Without a state (a one-shot decode, or a stream's first chunk) the output is upstream's op exactly: the
    transposed conv with its bias fused. A kernel that accumulates in fp32 adds a fused bias before its one
    rounding; adding it afterwards rounds twice, which in bf16 differs from upstream wherever the CPU has native
    bf16 convolutions (AVX512-BF16, AMX) or on a GPU (measured: 30 % of the outputs of a bf16 transposed conv,
    one bf16 ulp each). The tail is then the bias-free partial sums of the last ``k-s`` samples, from the
    ``ceil(k/s)`` last frames, the only ones that reach them. With a state (a later chunk) the bias is added after
    the overlap-add, so streaming equals one-shot up to rounding.

    >>> y, state = CausalTransConv1d(4, 2, kernel_size=10, stride=5)(torch.zeros(1, 4, 3))
    >>> y.shape, state.tail.shape
    (torch.Size([1, 2, 15]), torch.Size([1, 2, 5]))
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.stride = stride
        self.right_pad = kernel_size - stride  # trimmed from the right in one-shot; the tail in streaming
        self.reach = -(-kernel_size // stride)  # frames that reach one output sample, at most: ceil(k/s)

    def forward(self, x: torch.Tensor, state: TransConvState | None = None) -> Streamed:
        """x (B, C_in, T) -> y (B, C_out, T*s) and the tail (B, C_out, k-s)."""
        T = x.shape[-1]
        n = T * self.stride
        w = self.conv.weight
        if state is None:
            y = F.conv_transpose1d(x, w, self.conv.bias, stride=self.stride)[..., :n]  # upstream's op, fused bias
            last = x[..., T - min(T, self.reach):]
            tail = F.conv_transpose1d(last, w, None, stride=self.stride)[..., last.shape[-1] * self.stride:]
            return Streamed(y, TransConvState(tail))
        # (B, C_out, (T-1)*s + k) = (B, C_out, T*s + k-s); no bias yet, so the tail is a pure partial sum.
        full = F.conv_transpose1d(x, w, None, stride=self.stride)
        if self.right_pad > 0:
            full = torch.cat((full[..., : self.right_pad] + state.tail, full[..., self.right_pad:]), dim=-1)
        y = full[..., :n]  # (B, C_out, T*s): the complete samples only
        if self.conv.bias is not None:
            y = y + self.conv.bias[None, :, None]
        return Streamed(y, TransConvState(full[..., n:].clone()))  # clone: do not pin `full`


class SnakeBeta(nn.Module):
    """``x + 1/(exp(beta) + 1e-9) * sin(x * exp(alpha))^2`` per channel (upstream ``SnakeBeta``).

    ``alpha``/``beta`` are stored in log scale (upstream initialises them to zero = frequency and magnitude 1);
    exp is taken here, in the parameter dtype, as upstream does (no upcast, so bf16 matches upstream's bf16).
    The 1e-9 guards the division if exp(beta) underflows. Pointwise, hence stateless: ``forward(x) -> Tensor``.

    >>> SnakeBeta(3)(torch.zeros(2, 3, 5)).shape
    torch.Size([2, 3, 5])
    """

    eps = 1e-9

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) -> (B, C, T)."""
        alpha = torch.exp(self.alpha)[None, :, None]  # (1, C, 1): log-scale parameter -> frequency
        beta = torch.exp(self.beta)[None, :, None]  # (1, C, 1): log-scale parameter -> magnitude
        return x + (1.0 / (beta + self.eps)) * torch.pow(torch.sin(x * alpha), 2)


class ConvNeXtBlock(nn.Module):
    """``x + gamma * pwconv2(gelu(pwconv1(LayerNorm(dwconv(x)))))`` with a causal depthwise k7 conv (upstream
    ``Qwen3TTSTokenizerV2ConvNeXtBlock``). LayerNorm eps 1e-6 over channels (channels-last); exact erf GELU.
    Only the depthwise conv looks back in time, so its history is the whole state.

    >>> ConvNeXtBlock(8)(torch.zeros(1, 8, 4)).y.shape
    torch.Size([1, 8, 4])
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel_size=7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x: torch.Tensor, state: ConvNeXtState | None = None) -> Streamed:
        """x (B, C, T) -> (B, C, T)."""
        h, dw = self.dwconv(x, state.dwconv if state is not None else None)  # (B, C, T)
        h = h.permute(0, 2, 1)  # (B, T, C): the norm and the pointwise linears act on channels
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        h = (self.gamma * h).permute(0, 2, 1)  # (B, C, T)
        return Streamed(x + h, ConvNeXtState(dw))


class ResidualUnit(nn.Module):
    """``x + conv2_k1(snake(conv1_k7_dilated(snake(x))))`` (upstream
    ``Qwen3TTSTokenizerV2DecoderDecoderResidualUnit``).

    >>> ResidualUnit(4, dilation=9)(torch.zeros(1, 4, 30)).y.shape
    torch.Size([1, 4, 30])
    """

    def __init__(self, dim: int, dilation: int = 1):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv1d(dim, dim, kernel_size=7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv1d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor, state: ResidualUnitState | None = None) -> Streamed:
        """x (B, C, T) -> (B, C, T)."""
        s1, s2 = (state.conv1, state.conv2) if state is not None else (None, None)
        h, s1 = self.conv1(self.act1(x), s1)
        h, s2 = self.conv2(self.act2(h), s2)
        return Streamed(h + x, ResidualUnitState(s1, s2))


class DecoderBlock(nn.Module):
    """SnakeBeta, transposed conv ×rate (kernel 2·rate), residual units with dilations 1, 3, 9 (upstream
    ``Qwen3TTSTokenizerV2DecoderDecoderBlock``). Kept as ``block`` (a ModuleList) so paths and keys are
    upstream's: ``block.0`` snake, ``block.1`` trans conv, ``block.2..4`` residual units.

    >>> DecoderBlock(8, 4, rate=3)(torch.zeros(1, 8, 5)).y.shape
    torch.Size([1, 4, 15])
    """

    def __init__(self, in_dim: int, out_dim: int, rate: int):
        super().__init__()
        self.block = nn.ModuleList([
            SnakeBeta(in_dim),
            CausalTransConv1d(in_dim, out_dim, 2 * rate, rate),
            *(ResidualUnit(out_dim, d) for d in (1, 3, 9)),
        ])

    def forward(self, x: torch.Tensor, state: DecoderBlockState | None = None) -> Streamed:
        """x (B, C_in, T) -> (B, C_out, T*rate)."""
        snake, up, *units = self.block
        h, up_state = up(snake(x), state.upsample if state is not None else None)
        unit_states = []
        for i, unit in enumerate(units):
            h, s = unit(h, state.residuals[i] if state is not None else None)
            unit_states.append(s)
        return Streamed(h, DecoderBlockState(up_state, tuple(unit_states)))


__all__ = [
    "ConvState", "TransConvState", "ConvNeXtState", "ResidualUnitState", "DecoderBlockState", "Streamed",
    "CausalConv1d", "CausalTransConv1d", "SnakeBeta", "ConvNeXtBlock", "ResidualUnit", "DecoderBlock",
]
