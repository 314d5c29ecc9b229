"""Logits processing and token choice, reproducing what upstream gets from transformers 4.57.3 ``generate``.

Upstream drives both loops with HF ``GenerationMixin.generate`` (upstream-notes §2.3). The processors HF builds
(``_get_logits_processor``), in its order, for the talker (codebook 0):

1. ``RepetitionPenaltyLogitsProcessor(p)`` (if p != 1): over HF's ``input_ids``, which hold only the group-0 codes
   generated so far (the prompt went in as embeddings) — never the prompt. ``s < 0 ? s * p : s / p``, once per
   distinct id (gather/scatter).
2. ``MinNewTokensLengthLogitsProcessor(0, 2, eos)``: EOS -> -inf while fewer than 2 tokens were generated.
3. ``SuppressTokensLogitsProcessor``: ids ``[vocab-1024, vocab)`` except EOS -> -inf.
4. only when sampling: ``Temperature`` (if != 1), ``TopK`` (if not 0/None; ties with the k-th kept),
   ``TopP`` (if < 1; ascending sort, remove cumulative prob <= 1-p, always keep the largest).
5. softmax -> ``torch.multinomial``, or argmax when not sampling.

The code predictor gets only step 4 (no penalty, no EOS, exactly 15 tokens). Scores are fp32 (HF upcasts the
logits before the processors). Every function here takes and returns (B, V) tensors and never syncs to the host.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------ processors


def repetition_penalty(scores: torch.Tensor, prev_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores (B, V); prev_ids (B, N) previously generated ids (N may be 0). HF ``RepetitionPenaltyLogitsProcessor``."""
    if penalty == 1.0 or prev_ids.shape[-1] == 0:
        return scores
    s = torch.gather(scores, 1, prev_ids)  # (B, N)
    s = torch.where(s < 0, s * penalty, s / penalty)
    return scores.scatter(1, prev_ids, s)


def min_new_tokens(scores: torch.Tensor, n_generated: int, minimum: int, eos: int) -> torch.Tensor:
    """EOS -> -inf while ``n_generated < minimum`` (HF ``MinNewTokensLengthLogitsProcessor``, prompt length 0)."""
    if n_generated >= minimum:
        return scores
    out = scores.clone()
    out[:, eos] = NEG_INF
    return out


def suppress_mask(vocab_size: int, eos: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(V,) bool: the special tail ``[V-1024, V)`` except EOS (upstream's ``suppress_tokens``)."""
    m = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    m[max(vocab_size - 1024, 0):] = True
    m[eos] = False
    return m


def suppress(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF ``SuppressTokensLogitsProcessor``: masked ids -> -inf."""
    return torch.where(mask, NEG_INF, scores)


def temperature(scores: torch.Tensor, t: float) -> torch.Tensor:
    return scores / t


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """HF ``TopKLogitsWarper`` (min_tokens_to_keep 1): keep every score >= the k-th largest (ties kept)."""
    k = min(max(k, 1), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]  # (B, 1)
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p(scores: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """HF ``TopPLogitsWarper``: remove the low tail whose cumulative probability is <= 1 - p."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - p)
    remove[..., -min_keep:] = False
    remove = remove.scatter(1, sorted_idx, remove)
    return scores.masked_fill(remove, NEG_INF)


# ------------------------------------------------------------------------------------------------ chains


@dataclass(frozen=True)
class SamplingConfig:
    """One sampling setting (talker or predictor). ``do_sample=False`` is greedy; temperature/top-k/top-p only act
    when sampling, as in HF. ``repetition_penalty``/``min_new_tokens``/suppression are talker-only (the
    predictor's config keeps them neutral)."""

    do_sample: bool = True
    temperature: float = 0.9
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0


def warp(scores: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The sampling warpers (HF order: temperature, top-k, top-p); identity when greedy."""
    if not cfg.do_sample:
        return scores
    if cfg.temperature is not None and cfg.temperature != 1.0:
        scores = temperature(scores, cfg.temperature)
    if cfg.top_k is not None and cfg.top_k != 0:
        scores = top_k(scores, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        scores = top_p(scores, cfg.top_p)
    return scores


def process_talker(scores: torch.Tensor, cfg: SamplingConfig, prev_ids: torch.Tensor, n_generated: int,
                   eos: int, mask: torch.Tensor) -> torch.Tensor:
    """The full group-0 chain. scores (B, V) fp32; prev_ids (B, n_generated) generated group-0 ids."""
    scores = repetition_penalty(scores, prev_ids, cfg.repetition_penalty)
    if cfg.min_new_tokens > 0:
        scores = min_new_tokens(scores, n_generated, cfg.min_new_tokens, eos)
    scores = suppress(scores, mask)
    return warp(scores, cfg)


# name -> (kind, test, the valid range in words). Checked once, where a value enters (argument or
# generation_config.json), so a bad one fails before any generation with the range in the message.
# Upstream (HF 4.57.3) differs at two edges, on purpose here: HF accepts top_p = 0 (it then keeps only the top
# token, i.e. greedy) and treats top_k = 0 as "off"; we keep top_k = 0 as off but refuse top_p = 0 (say greedy).
_RANGES: dict[str, tuple[str, object, str]] = {
    "temperature": ("number", lambda v: v > 0, "> 0 (use greedy for argmax)"),
    "subtalker_temperature": ("number", lambda v: v > 0, "> 0 (use greedy for argmax)"),
    "top_p": ("number", lambda v: 0 < v <= 1, "in (0, 1]"),
    "subtalker_top_p": ("number", lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": ("int", lambda v: v >= 0, ">= 0 (0 turns top-k off)"),
    "subtalker_top_k": ("int", lambda v: v >= 0, ">= 0 (0 turns top-k off)"),
    "repetition_penalty": ("number", lambda v: v > 0, "> 0 (1 turns it off)"),
    "max_new_tokens": ("int", lambda v: v >= 2, ">= 2 (one frame needs two sampled tokens)"),
    "do_sample": ("bool", lambda v: True, "true or false"),
    "subtalker_dosample": ("bool", lambda v: True, "true or false"),
}


def check_sampling_value(name: str, value: object, where: str = "") -> None:
    """Raise one ``ValueError`` line (prefixed by ``where``, e.g. a file) if ``value`` is not valid for ``name``.

    ``None`` passes for top_k (HF: off)."""
    if name not in _RANGES:
        return
    kind, ok, words = _RANGES[name]
    if value is None and name.endswith("top_k"):
        return
    if kind == "bool":
        good_type = isinstance(value, bool)
    elif kind == "int":
        good_type = isinstance(value, int) and not isinstance(value, bool)
    else:
        good_type = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not good_type or not ok(value):
        raise ValueError(f"{where}{name} {value!r} is not valid: must be {'an integer ' if kind == 'int' else ''}"
                         f"{words}")


def margin(scores: torch.Tensor) -> torch.Tensor:
    """top1 - top2 of the processed scores, (B,) (inf when only one candidate survives)."""
    two = torch.topk(scores, 2, dim=-1)[0]
    return two[:, 0] - two[:, 1]


def choose(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    """softmax + multinomial (HF ``_sample``) or argmax. scores (B, V) -> (B,) int64."""
    if do_sample:
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    return torch.argmax(scores, dim=-1)


def check_seed(seed: object) -> int | None:
    """``seed`` as an int torch can seed with (``[-2**63, 2**64)``, as ``torch.manual_seed``), or None; one
    ``ValueError`` line naming the seed otherwise (not ``int()``'s "invalid literal")."""
    if seed is None:
        return None
    try:
        if isinstance(seed, bool):
            raise TypeError
        value = operator.index(seed)  # int and numpy integers; not floats, strings, bools
    except TypeError:
        raise ValueError(f"seed {seed!r} is not an integer") from None
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"seed {value} is out of range: must be in [-2**63, 2**64)")
    return value


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A seeded generator on ``device`` (None: torch's global RNG, as upstream uses).

    With the same seed, ``torch.manual_seed(seed)`` before upstream's generate consumes the CPU RNG in the same
    order as this generator (one multinomial per talker token, then 15 per frame for the predictor)."""
    seed = check_seed(seed)
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class PredictorChooser:
    """``choose`` callable for :meth:`impl.code_predictor.CodePredictor.generate_frame`: warp, pick, margin."""

    def __init__(self, cfg: SamplingConfig, generator: torch.Generator | None):
        self.cfg, self.generator = cfg, generator

    def __call__(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = warp(scores, self.cfg)
        return choose(s, self.cfg.do_sample, self.generator), margin(s)
