"""The talker: a Qwen3 decoder stack over summed text + codec embeddings that predicts codebook 0 of every frame
(upstream ``Qwen3TTSTalkerForConditionalGeneration`` / ``Qwen3TTSTalkerModel``, M:1348-1810).

Module names equal the checkpoint keys under ``talker.``: ``model.{text_embedding, codec_embedding, layers.N,
norm}``, ``text_projection.{linear_fc1, linear_fc2}``, ``codec_head`` and ``code_predictor.*`` (the multi-token
predictor for codebooks 1..15 lives in :mod:`impl.code_predictor`; it is a child here only so one strict
``load_state_dict`` covers every ``talker.*`` key).

Positions. Upstream's talker uses interleaved M-RoPE with three position rows, but in inference always feeds
three equal rows, so the merged table equals row 0 bit for bit; we still build the three rows and merge once per
forward (``merge_mrope``), not once per layer. Left-padded batches get upstream's ``get_rope_index`` positions:
``pos = cumsum(mask) - 1`` with pads set to 1, and a per-row ``delta = max_pos + 1 - sum(mask) - num_pads``
(= ``-num_pads`` for any prompt longer than one token); a later step at cache length ``S`` sits at ``S + delta``.

Notation: B batch, T new positions, S keys (cache included), C talker hidden, V codec vocabulary (3072).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .code_predictor import CodePredictor
from .config import TalkerConfig
from .layers import KVCache, Linear, RMSNorm, RotaryEmbedding, merge_mrope, qwen3_layers
from .taps import tap


class TextProjection(nn.Module):
    """Two linear layers with biases and SiLU between, no gate (upstream ``Qwen3TTSTalkerResizeMLP``):
    text_hidden -> text_hidden -> talker hidden.

    >>> TextProjection(8, 4)(torch.zeros(1, 2, 8)).shape
    torch.Size([1, 2, 4])
    """

    def __init__(self, text_hidden: int, hidden: int):
        super().__init__()
        self.linear_fc1 = Linear(text_hidden, text_hidden, bias=True)
        self.linear_fc2 = Linear(text_hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


# ------------------------------------------------------------------------------------------- positions/mask


def rope_positions(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream ``get_rope_index`` + the ``- delta0`` correction of the talker forward (M:1700, M:1745).

    attention_mask (B, T), 1 = real token, left padding. Returns positions (3, B, T) int64 and the per-row
    ``rope_deltas`` (B, 1) such that the token at cache length ``S`` (pads included) sits at ``S + delta``.

    >>> pos, delta = rope_positions(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    >>> pos[0].tolist(), delta.tolist()
    ([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]], [[-2], [0]])
    """
    mask = attention_mask.long()
    pos = mask.float().cumsum(-1) - 1  # float cumsum as upstream (exact for any realistic length)
    pos = pos.masked_fill(mask == 0, 1)  # pads get position 1 (their outputs are never used)
    max_pos = pos.max(-1, keepdim=True)[0]  # (B, 1)
    n_real = mask.sum(-1, keepdim=True)  # (B, 1)
    n_pad = (1 - mask).sum(-1, keepdim=True)  # upstream's delta0
    deltas = (max_pos + 1 - n_real).long() - n_pad  # (B, 1); -n_pad unless a row holds a single real token
    return pos.long()[None].expand(3, -1, -1), deltas


def step_positions(past: int, deltas: torch.Tensor, T: int = 1) -> torch.Tensor:
    """Positions (3, B, T) of T new tokens after ``past`` cached positions (upstream decode branch, M:1722)."""
    ar = torch.arange(past, past + T, device=deltas.device)[None, :]  # (1, T)
    return (ar + deltas)[None].expand(3, -1, -1)  # (3, B, T)


# ------------------------------------------------------------------------------------------------ modules


class TalkerModel(nn.Module):
    """Embedding tables, decoder layers and final norm (upstream ``Qwen3TTSTalkerModel``).

    The forward takes embeddings (the caller sums text and codec embeddings; see :mod:`impl.prompt`), so the two
    tables here are only looked up by :class:`Talker` and the prompt builder.
    """

    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        rs = cfg.rope_scaling
        self.mrope_section = list(rs["mrope_section"])
        self.mrope_interleaved = bool(rs["interleaved"])
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.text_embedding = nn.Embedding(cfg.text_vocab_size, cfg.text_hidden_size)
        # Layers use plain 1D RoPE on the merged table (merged once per forward below).
        self.layers = qwen3_layers(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """inputs_embeds (B, T, C); positions (3, B, T) or (B, T); mask from :func:`impl.layers.causal_mask` over the
        S = cache.length + T keys. Writes the T new keys/values into ``cache`` and advances it. -> (B, T, C),
        final-normed."""
        B, T, _ = inputs_embeds.shape
        if positions.ndim == 2:
            positions = positions[None].expand(3, B, T)  # (3, B, T)
        cos, sin = self.rotary_emb(inputs_embeds, positions)  # (3, B, T, D) each, in the activation dtype
        # Merge the M-RoPE rows once (upstream merges inside every layer; same values).
        cos = merge_mrope(cos, self.mrope_section, self.mrope_interleaved)  # (B, T, D)
        sin = merge_mrope(sin, self.mrope_section, self.mrope_interleaved)
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.norm(h)


class TalkerOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, C) final-normed hidden states (upstream ``past_hidden`` = hidden[:, -1:])
    logits: torch.Tensor  # (B, 1, V) codebook-0 logits of the last position (or (B, T, V) with all_logits)


class Talker(nn.Module):
    """Talker stack, text projection, codec head and the code predictor (upstream
    ``Qwen3TTSTalkerForConditionalGeneration``). Deliberate differences: the KV cache and the rope deltas are
    passed in by the caller instead of living on the module (upstream stores ``self.rope_deltas``), and the code
    predictor is run by :mod:`impl.generate`, not from inside the talker's forward."""

    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TalkerModel(cfg)
        self.text_projection = TextProjection(cfg.text_hidden_size, cfg.hidden_size)
        self.codec_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.code_predictor = CodePredictor(cfg.code_predictor_config, cfg.hidden_size)

    # -- embeddings ------------------------------------------------------------------------------------------

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """``text_projection(text_embedding(ids))``: (B, T) ids -> (B, T, C)."""
        return self.text_projection(self.model.text_embedding(ids))

    def embed_codec(self, ids: torch.Tensor) -> torch.Tensor:
        """Talker codec table (group 0 codes and all special codec ids): (...) -> (..., C)."""
        return self.model.codec_embedding(ids)

    def frame_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the 16 per-group embeddings of a frame: codes (B, 16) -> (B, 1, C).

        Group 0 comes from the talker table, groups 1..15 from the code predictor's (talker-width) tables.
        Stacked then summed in one reduction, as upstream (M:1707); in bf16 a chain of adds rounds differently.
        """
        parts = [self.model.codec_embedding(codes[:, :1])]  # (B, 1, C)
        parts += [emb(codes[:, g + 1 : g + 2]) for g, emb in enumerate(self.code_predictor.model.codec_embedding)]
        return torch.cat(parts, dim=1).sum(1, keepdim=True)  # (B, 16, C) -> (B, 1, C)

    # -- forward ---------------------------------------------------------------------------------------------

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return tap(self, "logits", self.codec_head(hidden))

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, *, all_logits: bool = False) -> TalkerOutput:
        """One prefill or decode step. inputs_embeds (B, T, C) -> hidden (B, T, C), logits (B, 1|T, V)."""
        hidden = self.model(inputs_embeds, positions, mask, cache)
        # Upstream applies codec_head to every position and HF keeps the last; the last row is the same.
        logits = self.logits(hidden if all_logits else hidden[:, -1:])
        return TalkerOutput(hidden, logits)

    def allocate_cache(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype,
                       initial: int | None = None) -> KVCache:
        """A KV cache for ``max_len`` positions (``initial`` allocated now, grown on demand; see ``KVCache``)."""
        c = self.cfg
        return KVCache.allocate(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim, device, dtype,
                                initial=initial)
