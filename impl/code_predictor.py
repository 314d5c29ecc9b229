"""The code predictor ("sub-talker", MTP): predicts codebooks 1..15 of a frame from the talker's hidden state
(upstream ``Qwen3TTSTalkerCodePredictorModelForConditionalGeneration`` / ``Qwen3TTSTalkerCodePredictorModel``,
M:960-1300). Checkpoint prefix ``talker.code_predictor.``.

Per frame it runs a fresh 16-position sequence (positions restart at 0 every frame; upstream gives each frame a
new ``DynamicCache`` through its own HF ``generate`` call; we reset one small preallocated :class:`KVCache`):

    position 0: h_t         talker final-normed hidden of the position that produced c0      ┐ prefill (T=2)
    position 1: E_0(c0)     talker codec embedding of the group-0 code                        ┘ -> lm_head[0] -> c1
    position j: E_j'(c_j)   ``model.codec_embedding[j-1]`` (talker width), j = 2..15, one step each -> lm_head[j-1]

Every input first goes through ``small_to_mtp_projection`` (Linear talker C -> predictor H when they differ, as
in the 1.7B; Identity when equal, as in the 0.6B). ``lm_head[j]`` predicts group j+1; ``codec_embedding[j]``
embeds group j+1.

Notation: B batch, T new positions, C talker hidden, H predictor hidden, V group vocabulary (2048), G groups (16).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .config import CodePredictorConfig
from .layers import KVCache, Linear, RMSNorm, RotaryEmbedding, qwen3_layers
from .taps import tap


class CodePredictorModel(nn.Module):
    """Stack of ``DecoderLayer`` (QK-norm, plain 1D RoPE) + final norm, and the 15 talker-width group embeddings
    (upstream ``Qwen3TTSTalkerCodePredictorModel``)."""

    def __init__(self, cfg: CodePredictorConfig, talker_hidden: int):
        super().__init__()
        if cfg.use_sliding_window or any(t != "full_attention" for t in (cfg.layer_types or [])):
            raise NotImplementedError("code predictor with sliding-window layers (no released checkpoint has one)")
        self.layers = qwen3_layers(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        # Talker width, not predictor width: these also build the talker's next input (sum of 16 embeddings).
        self.codec_embedding = nn.ModuleList(
            [nn.Embedding(cfg.vocab_size, talker_hidden) for _ in range(cfg.num_code_groups - 1)])

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, H) already projected; positions (B, T). -> (B, T, H) final-normed; advances ``cache``."""
        cos, sin = self.rotary_emb(x, positions)  # (B, T, D)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(h)


class FrameCodes(NamedTuple):
    codes: torch.Tensor  # (B, G-1) int64: groups 1..15
    margins: torch.Tensor  # (B, G-1) top1 - top2 of the processed scores each code was chosen from


def frame_positions(past: int, T: int, B: int, device: torch.device) -> torch.Tensor:
    """Positions (B, T) of T new predictor inputs after ``past`` of this frame's: they restart at 0 every frame
    (upstream starts a fresh ``DynamicCache`` per frame), so they are just the offset in the 16-long sequence."""
    return torch.arange(past, past + T, device=device)[None].expand(B, T)


def _causal(T: int, S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, T, S) additive causal mask for T queries ending at key S-1 (finfo.min where masked)."""
    q = torch.arange(S - T, S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    return torch.zeros(T, S, dtype=dtype, device=device).masked_fill(k > q, torch.finfo(dtype).min)[None, None]


class CodePredictor(nn.Module):
    """Projection, stack and the 15 heads (upstream ``Qwen3TTSTalkerCodePredictorModelForConditionalGeneration``).

    ``choose(scores (B, V) fp32) -> (codes (B,), margin (B,))`` is injected by the caller (:mod:`impl.sampling`):
    greedy or the temperature/top-k/top-p chain; the predictor has no repetition penalty and no EOS.
    """

    def __init__(self, cfg: CodePredictorConfig, talker_hidden: int):
        super().__init__()
        self.cfg = cfg
        self.model = CodePredictorModel(cfg, talker_hidden)
        self.lm_head = nn.ModuleList(
            [Linear(cfg.hidden_size, cfg.vocab_size, bias=False) for _ in range(cfg.num_code_groups - 1)])
        if cfg.hidden_size != talker_hidden:
            self.small_to_mtp_projection: nn.Module = Linear(talker_hidden, cfg.hidden_size, bias=True)
        else:
            self.small_to_mtp_projection = nn.Identity()

    def allocate_cache(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        c = self.cfg
        return KVCache.allocate(c.num_hidden_layers, batch, c.num_key_value_heads, c.num_code_groups, c.head_dim,
                                device, dtype)

    def step(self, embeds: torch.Tensor, head: int, cache: KVCache) -> torch.Tensor:
        """One prefill (T=2) or decode (T=1) step at the cache's current length.

        embeds (B, T, C) talker-width inputs -> logits (B, V) of ``lm_head[head]`` at the last position.
        """
        B, T, _ = embeds.shape
        past = cache.length
        x = self.small_to_mtp_projection(embeds)  # (B, T, H)
        positions = frame_positions(past, T, B, embeds.device)  # (B, T), restarting at 0 every frame
        mask = _causal(T, past + T, x.dtype, x.device) if T > 1 else None  # no padding inside the predictor
        h = self.model(x, positions, mask, cache)  # (B, T, H)
        return tap(self, f"logits_{head}", self.lm_head[head](h[:, -1]))  # (B, V)

    def generate_frame(self, past_hidden: torch.Tensor, c0_embed: torch.Tensor, cache: KVCache,
                       choose: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> FrameCodes:
        """Groups 1..15 of one frame for every row.

        past_hidden (B, 1, C) talker final-normed hidden; c0_embed (B, 1, C) = talker ``codec_embedding(c0)``.
        ``cache`` is reset here (fresh positions 0..15). Logits are upcast to fp32 before ``choose``, as HF's
        sampling loop does.
        """
        cache.reset()
        n = self.cfg.num_code_groups - 1
        codes, margins = [], []
        x = torch.cat((past_hidden, c0_embed), dim=1)  # (B, 2, C)
        for j in range(n):
            logits = self.step(x, j, cache)
            code, margin = choose(logits.float())  # (B,), (B,)
            codes.append(code)
            margins.append(margin)
            if j + 1 < n:
                x = self.model.codec_embedding[j](code[:, None])  # (B, 1, C): embeds group j+1
        return FrameCodes(torch.stack(codes, dim=1), torch.stack(margins, dim=1))

    def forward_teacher(self, past_hidden: torch.Tensor, codes: torch.Tensor, c0_embed: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for groups 1..15 (upstream ``forward_finetune`` via ``forward_sub_talker_finetune``).

        past_hidden (B, C); codes (B, G) all 16 codes; c0_embed (B, 1, C) = talker ``codec_embedding(codes[:, :1])``.
        Input sequence ``[h, E_0(c0), E_1'(c1), ..., E_14'(c14)]`` (16 positions, no cache) -> logits (B, 15, V)
        with ``logits[:, j] = lm_head[j](hidden[:, j + 1])``.
        """
        B = codes.shape[0]
        parts = [past_hidden[:, None], c0_embed]
        parts += [self.model.codec_embedding[i - 1](codes[:, i : i + 1]) for i in range(1, self.cfg.num_code_groups - 1)]
        x = self.small_to_mtp_projection(torch.cat(parts, dim=1))  # (B, 16, H)
        T = x.shape[1]
        positions = torch.arange(T, device=x.device)[None].expand(B, T)
        h = self.model(x, positions, _causal(T, T, x.dtype, x.device), None)  # (B, 16, H)
        logits = torch.stack([self.lm_head[i - 1](h[:, i]) for i in range(1, self.cfg.num_code_groups)], dim=1)
        return tap(self, "teacher_logits", logits)  # (B, 15, V)
