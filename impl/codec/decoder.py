"""Speech-tokenizer decoder: 16 codes per 12.5 Hz frame -> 24 kHz audio, 1920 samples per frame.

Reproduces upstream ``Qwen3TTSTokenizerV2Decoder`` (and its ``Qwen3TTSTokenizerV2DecoderTransformerModel``), with
the checkpoint's module names (``quantizer``, ``pre_conv``, ``pre_transformer``, ``upsample.N.{0,1}``,
``decoder.N``), so ``speech_tokenizer/model.safetensors`` ``decoder.*`` loads strictly.

    codes (B, Q, F)
      quantizer        split RVQ dequantisation                        -> (B, codebook_dim, F)
      pre_conv         causal conv k3                                   -> (B, latent, F)
      pre_transformer  in-proj, N layers (72-frame sliding window), out-proj  (B, F, latent)
      upsample         2 × [causal trans conv ×2, ConvNeXt]             -> (B, latent, 4F)
      decoder.0        causal conv k7                                   -> (B, decoder_dim, 4F)
      decoder.1..4     DecoderBlock ×8, ×5, ×4, ×3 (channels halve)     -> (B, decoder_dim/16, 1920F)
      decoder.5, .6    SnakeBeta, causal conv k7 -> 1 channel; clamp(-1, 1)    (B, 1, 1920F)

Every stage is causal with no look-ahead, so ``_step(codes, state)`` on consecutive chunks equals ``forward`` on
all frames up to rounding (the transposed convs add their bias after the overlap-add on a later chunk, fused as
upstream's on the first; see ``streaming.py``); ``forward(codes)`` is ``_step(codes, None).y``, and ``stream()`` returns the
``DecoderStream`` that carries the state between pushes (the codec's one streaming entry point).
``chunked_decode`` and ``decode_padded`` reproduce what upstream's ``decode()`` hands users (300-frame chunks,
25 frames of recomputed left context), which is NOT the one-shot decode after frame 300.

Deliberate difference: upstream always builds the quantizer with one semantic codebook whatever
``num_semantic_quantizers`` says; so does this (the released config says 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import CodecDecoderConfig
from ..kv_cache import SlidingKVCache
from ..layers import DecoderLayer, RMSNorm, RotaryEmbedding, causal_mask
from .conv import (
    CausalConv1d,
    CausalTransConv1d,
    ConvNeXtBlock,
    ConvNeXtState,
    ConvState,
    DecoderBlock,
    SnakeBeta,
    Streamed,
    TransConvState,
)
from .quantizer import SplitResidualVectorQuantizer
from .streaming import DecoderStream

# Upstream ``chunked_decode``'s defaults (what its ``decode()`` uses): 300-frame chunks, 25 frames of left context.
DECODE_CHUNK_FRAMES = 300
DECODE_LEFT_CONTEXT = 25


@dataclass
class PreTransformerState:
    """The pre-transformer's past: a sliding-window KV cache (``cache.length`` = frames consumed so far)."""

    cache: SlidingKVCache


@dataclass
class DecoderState:
    """Everything the decoder carries between chunks; one entry per stateful module, in module order."""

    pre_conv: ConvState
    pre_transformer: PreTransformerState
    upsample: tuple[tuple[TransConvState, ConvNeXtState], ...]
    decoder: tuple[object, ...]  # decoder.N: ConvState | DecoderBlockState | None (the stateless SnakeBeta)
    frames: int


class PreTransformer(nn.Module):
    """``output_proj(norm(layers(input_proj(x))))`` with sliding-window causal attention (upstream
    ``Qwen3TTSTokenizerV2DecoderTransformerModel``).

    Layers are the shared ``impl.layers.DecoderLayer`` with layer scales and no QK-norm: RMSNorm eps from the
    config (1e-5), 1D RoPE θ=1e4 on absolute frame positions, window ``sliding_window`` (72): the query at frame
    i sees keys i-71 .. i, 72 keys including itself. Input/output projections have biases. The attention kernel
    is the layers' module setting (:func:`impl.layers.set_attention`, called by ``SpeechTokenizer.from_dir``).
    """

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        self.window = cfg.sliding_window
        self.layers = nn.ModuleList([
            DecoderLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.head_dim, eps=cfg.rms_norm_eps, qk_norm=False,
                         layer_scale=cfg.layer_scale_initial_scale, bias=cfg.attention_bias)
            for _ in range(cfg.num_hidden_layers)
        ])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.input_proj = nn.Linear(cfg.latent_dim, cfg.hidden_size)
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.latent_dim)

    def forward(self, x: torch.Tensor, state: PreTransformerState | None = None) -> Streamed:
        """x (B, T, latent) -> y (B, T, latent). With a state, x continues the frames already seen."""
        B, T, _ = x.shape
        cache = state.cache.copy() if state is not None else SlidingKVCache.empty(len(self.layers), self.window)
        past, kept = cache.length, cache.kept
        h = self.input_proj(x)  # (B, T, hidden)
        positions = torch.arange(past, past + T, device=x.device)[None].expand(B, T)  # absolute frame index
        cos, sin = self.rotary_emb(h, positions)  # (B, T, head_dim), fp32 angles cast to h.dtype
        # Keys are [kept past, T new]; relative offsets are what the window compares, so the mask is built on
        # that local axis. None when nothing is masked (one frame with a short past).
        mask = causal_mask(T, kept + T, h.dtype, h.device, window=self.window)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, i)
        cache.advance(T)
        return Streamed(self.output_proj(self.norm(h)), PreTransformerState(cache))


class CodecDecoder(nn.Module):
    """The whole decoder (upstream ``Qwen3TTSTokenizerV2Decoder``); see the module docstring for the stages."""

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.total_upsample = math.prod(cfg.upsample_rates + cfg.upsampling_ratios)  # 1920 samples per frame
        self.pre_transformer = PreTransformer(cfg)
        self.quantizer = SplitResidualVectorQuantizer(n_q=cfg.num_quantizers, dim=cfg.codebook_dim // 2,
                                                      io_dim=cfg.codebook_dim, codebook_size=cfg.codebook_size)
        self.pre_conv = CausalConv1d(cfg.codebook_dim, cfg.latent_dim, kernel_size=3)
        self.upsample = nn.ModuleList([
            nn.ModuleList([CausalTransConv1d(cfg.latent_dim, cfg.latent_dim, f, f), ConvNeXtBlock(cfg.latent_dim)])
            for f in cfg.upsampling_ratios
        ])
        n_blocks = len(cfg.upsample_rates)
        out_dim = cfg.decoder_dim // 2**n_blocks
        self.decoder = nn.ModuleList([
            CausalConv1d(cfg.latent_dim, cfg.decoder_dim, 7),
            *(DecoderBlock(cfg.decoder_dim // 2**i, cfg.decoder_dim // 2 ** (i + 1), r)
              for i, r in enumerate(cfg.upsample_rates)),
            SnakeBeta(out_dim),
            CausalConv1d(out_dim, 1, 7),
        ])

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, Q, F) long -> wav (B, 1, F*1920), clamped to [-1, 1]. The one-shot decode."""
        return self._step(codes, None).y

    def stream(self) -> DecoderStream:
        """A fresh :class:`~impl.codec.streaming.DecoderStream` on this decoder: ``s.push(codes (f, Q) or
        (B, f, Q))`` -> audio (B, f*1920) at once; the pushes join to the one-shot ``self(codes)``."""
        return DecoderStream(self)

    def _step(self, codes: torch.Tensor, state: DecoderState | None) -> Streamed:
        """codes (B, Q, f) continuing ``state`` -> (wav (B, 1, f*1920), new state). ``state=None`` starts fresh;
        ``state`` itself is never mutated. ``DecoderStream.push`` holds the state between calls."""
        B, Q, F = codes.shape
        if Q != self.cfg.num_quantizers:
            raise ValueError(f"Expected {self.cfg.num_quantizers} layer of codes, got {Q}")
        p = next(self.parameters())
        if F == 0:  # nothing to add; upstream would fail on an empty concatenation
            return Streamed(p.new_zeros(B, 1, 0), state)
        s = state
        h = self.quantizer(codes)  # (B, codebook_dim, F)
        h, pre_conv = self.pre_conv(h, s.pre_conv if s is not None else None)  # (B, latent, F)
        h, pre_tf = self.pre_transformer(h.transpose(1, 2), s.pre_transformer if s is not None else None)  # (B, F, latent)
        h = h.permute(0, 2, 1)  # (B, latent, F)
        ups = []
        for i, (trans, cnx) in enumerate(self.upsample):
            st, sc = s.upsample[i] if s is not None else (None, None)
            h, st = trans(h, st)  # (B, latent, F * prod(ratios[:i+1]))
            h, sc = cnx(h, sc)
            ups.append((st, sc))
        decs = []
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, SnakeBeta):
                h = layer(h)  # pointwise: no state
                decs.append(None)
            else:
                h, sd = layer(h, s.decoder[i] if s is not None else None)
                decs.append(sd)
        wav = h.clamp(min=-1, max=1)  # (B, 1, F*1920)
        frames = (s.frames if s is not None else 0) + F
        return Streamed(wav, DecoderState(pre_conv, pre_tf, tuple(ups), tuple(decs), frames))

    def chunked_decode(self, codes: torch.Tensor, chunk_size: int | None = None,
                       left_context_size: int | None = None, start: int = 0) -> torch.Tensor:
        """Upstream ``chunked_decode``: codes (B, Q, F) -> (B, 1, F*1920) decoded in ``chunk_size`` chunks (default
        ``DECODE_CHUNK_FRAMES``), each from scratch with ``left_context_size`` (``DECODE_LEFT_CONTEXT``) frames of
        recomputed left context whose audio is dropped.

        The first chunk equals the one-shot decode; later chunks differ, because the receptive field is longer
        than the context. Kept because it is what upstream users get from ``decode()``.
        ``start`` (a multiple of ``chunk_size``): begin at that chunk, returning the audio of frames ``start..F``,
        equal bit for bit to the full call's ``[..., start * 1920:]`` (no state crosses a chunk boundary)."""
        chunk_size = DECODE_CHUNK_FRAMES if chunk_size is None else chunk_size  # read at call time
        left_context_size = DECODE_LEFT_CONTEXT if left_context_size is None else left_context_size
        if start % chunk_size:
            raise ValueError(f"start {start} is not a multiple of chunk_size {chunk_size}")
        wavs = []
        F = codes.shape[-1]
        while start < F:
            end = min(start + chunk_size, F)
            # Upstream's condition, including its quirk: exactly `left_context_size` frames in gives no context.
            ctx = left_context_size if start - left_context_size > 0 else start
            wav = self(codes[..., start - ctx:end])
            wavs.append(wav[..., ctx * self.total_upsample:])
            start = end
        if not wavs:
            return codes.new_zeros(codes.shape[0], 1, 0, dtype=next(self.parameters()).dtype)
        return torch.cat(wavs, dim=-1)

    def decode_padded(self, codes: torch.Tensor, skip_frames: int = 0) -> list[torch.Tensor]:
        """Upstream ``Qwen3TTSTokenizerV2Model.decode``: codes (B, F, Q) right-padded with -1 -> one (n_i,) wav
        per row, n_i = 1920 × (frames whose first code is > -1). Padding is decoded as code 0 (clamp) and cut.

        ``skip_frames``: the rows' audio from frame ``skip_frames`` on, bit for bit the full result's
        ``[skip_frames * 1920:]``; the 300-frame chunks that end at or before it are not decoded."""
        up = self.total_upsample
        lengths = (codes[..., 0] > -1).sum(1) * up  # (B,)
        first = skip_frames - skip_frames % DECODE_CHUNK_FRAMES  # start of the chunk holding frame skip_frames
        wav = self.chunked_decode(codes.clamp(min=0).transpose(1, 2), start=first).squeeze(1)  # (B, (F-first)*1920)
        return [w[(skip_frames - first) * up: int(n) - first * up] for w, n in zip(wav, lengths)]


__all__ = ["PreTransformer", "PreTransformerState", "CodecDecoder", "DecoderState"]
