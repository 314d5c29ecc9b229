"""The talker: Qwen3 decoder stack over summed text + codec embeddings (upstream
``Qwen3TTSTalkerForConditionalGeneration`` / ``Qwen3TTSTalkerModel``).

Module names equal the checkpoint keys under ``talker.``: ``model.{text_embedding, codec_embedding, layers.N,
norm}``, ``text_projection.{linear_fc1, linear_fc2}``, ``codec_head``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import TalkerConfig
from .layers import DecoderLayer, KVCache, RMSNorm, RotaryEmbedding, causal_mask, mrope_applier
from .taps import tap


class TextProjection(nn.Module):
    """Two linear layers with biases and SiLU between, no gate (upstream ``Qwen3TTSTalkerResizeMLP``):
    text_hidden -> text_hidden -> talker hidden.

    >>> TextProjection(8, 4)(torch.zeros(1, 2, 8)).shape
    torch.Size([1, 2, 4])
    """

    def __init__(self, text_hidden: int, hidden: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(text_hidden, text_hidden, bias=True)
        self.linear_fc2 = nn.Linear(text_hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class TalkerStackOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, C) after the final norm
    positions: torch.Tensor  # (3, B, T) positions used


class TalkerModel(nn.Module):
    """Embeddings + decoder layers + final norm. The three M-RoPE position rows are kept (upstream feeds three
    equal rows in inference, where interleaved M-RoPE equals plain RoPE; tests also feed distinct rows)."""

    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        rs = cfg.rope_scaling
        rope = mrope_applier(list(rs["mrope_section"]), bool(rs["interleaved"]))
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.text_embedding = nn.Embedding(cfg.text_vocab_size, cfg.text_hidden_size)
        self.layers = nn.ModuleList([
            DecoderLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.head_dim, eps=cfg.rms_norm_eps, qk_norm=True, rope=rope, bias=cfg.attention_bias)
            for _ in range(cfg.num_hidden_layers)
        ])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                impl: str = "sdpa") -> TalkerStackOutput:
        """inputs_embeds (B, T, C); positions (3, B, T) or (B, T) (expanded to 3 equal rows) or None
        (cache offset + arange); attention_mask (B, S) over all keys (cache included), 1 = real token."""
        B, T, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=inputs_embeds.device).expand(3, B, T)
        elif positions.ndim == 2:
            positions = positions[None].expand(3, B, T)  # (3, B, T)
        cos, sin = self.rotary_emb(inputs_embeds, positions)  # (3, B, T, D) each
        mask = causal_mask(T, past + T, inputs_embeds.dtype, inputs_embeds.device, key_padding=attention_mask)
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, i, impl)
        if cache is not None:
            cache.advance(T)
        return TalkerStackOutput(self.norm(h), positions)


class Talker(nn.Module):
    """Talker stack, text projection and codec head (group-0 logits over the 3072-entry codec vocabulary)."""

    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TalkerModel(cfg)
        self.text_projection = TextProjection(cfg.text_hidden_size, cfg.hidden_size)
        self.codec_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """``text_projection(text_embedding(ids))``: (B, T) ids -> (B, T, C)."""
        return self.text_projection(self.model.text_embedding(ids))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return tap(self, "logits", self.codec_head(hidden))
