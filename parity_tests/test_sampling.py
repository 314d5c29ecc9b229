"""Logits processing (``impl/sampling.py``) against transformers 4.57.3's own processors.

Row ``Logits processors``: for logits drawn by hypothesis (ties, -inf entries, real vocab sizes, every knob on and
off), impl's group-0 chain equals the list HF's ``GenerationMixin._get_logits_processor`` builds from the
``generate`` kwargs upstream passes (repetition penalty over the generated ids, ``min_new_tokens=2``,
``suppress_tokens``, temperature, top-k, top-p), bit for bit, and so does the predictor's (warpers only); the
chosen token (argmax, or multinomial under one seeded generator) is the same.
"""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from impl.sampling import (
    SamplingConfig,
    choose,
    margin,
    min_new_tokens,
    process_talker,
    repetition_penalty,
    suppress_mask,
    top_k,
    top_p,
    warp,
)
from reports.compare import CompareResult

EOS = 2150
STATS = {"examples": 0, "mismatches": 0, "first": ""}


def hf_processors(cfg: SamplingConfig, vocab: int, eos: int | None, talker: bool):
    """The processor list HF builds for upstream's generate kwargs (talker) or the predictor's."""
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    kw = dict(do_sample=cfg.do_sample, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    if talker:
        kw.update(repetition_penalty=cfg.repetition_penalty, min_new_tokens=2, eos_token_id=eos,
                  suppress_tokens=[i for i in range(vocab - 1024, vocab) if i != eos])
    gc = GenerationConfig(**kw)
    gc._eos_token_tensor = torch.tensor([eos]) if talker else None
    dummy = types.SimpleNamespace(_merge_criteria_processor_list=lambda p, extra: p, config=None)
    return GenerationMixin._get_logits_processor(dummy, gc, input_ids_seq_length=0, device="cpu", model_kwargs={})


@st.composite
def logits_case(draw):
    talker = draw(st.booleans())
    vocab = 3072 if talker else 2048
    B = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, vocab, generator=g) * draw(st.sampled_from([0.5, 3.0, 8.0]))
    grid = draw(st.sampled_from([None, 1.0, 4.0]))  # coarse rounding: many exact ties
    if grid is not None:
        x = torch.round(x * grid) / grid
    n_inf = draw(st.integers(0, vocab // 2))
    if n_inf:
        x[torch.rand(B, vocab, generator=g).argsort(-1) < n_inf] = float("-inf")
    n_prev = draw(st.integers(0, 6))
    prev = torch.randint(0, 2048 if draw(st.booleans()) else vocab, (B, n_prev), generator=g)
    if n_prev and draw(st.booleans()):
        prev[:, -1] = EOS if talker else 0  # finished rows keep feeding EOS
    cfg = SamplingConfig(
        do_sample=draw(st.booleans()),
        temperature=draw(st.sampled_from([0.3, 0.9, 1.0, 1.7])),
        top_k=draw(st.sampled_from([None, 0, 1, 2, 50, 5000])),
        top_p=draw(st.sampled_from([1.0, 0.95, 0.8, 0.3, 0.001])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.05, 1.3, 0.7])) if talker else 1.0,
        min_new_tokens=2 if talker else 0,
    )
    return talker, x, prev, cfg, seed


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logits_case())
def test_chain_equals_hf(case):
    talker, x, prev, cfg, seed = case
    vocab = x.shape[1]
    procs = hf_processors(cfg, vocab, EOS, talker)
    want = procs(prev, x.clone())
    if talker:
        got = process_talker(x.clone(), cfg, prev, prev.shape[1], EOS, suppress_mask(vocab, EOS))
    else:
        got = warp(x.clone(), cfg)
    STATS["examples"] += 1
    same = torch.equal(got, want)
    if same and cfg.do_sample and bool(torch.isfinite(got).any(-1).all()):
        a = choose(got, True, torch.Generator().manual_seed(seed))
        b = torch.multinomial(torch.softmax(want, -1), 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
        same = torch.equal(a, b)
    elif same and bool(torch.isfinite(got).any(-1).all()):
        same = torch.equal(choose(got, False, None), torch.argmax(want, -1))
    if not same:
        STATS["mismatches"] += 1
        STATS["first"] = STATS["first"] or f"talker={talker} cfg={cfg} n_prev={prev.shape[1]}"
    assert same, f"chain differs from HF for {cfg} (talker={talker}, n_prev={prev.shape[1]})"


def test_chain_row(record):
    """Records the hypothesis run as one row (runs after test_chain_equals_hf in file order)."""
    n, bad = STATS["examples"], STATS["mismatches"]
    if n == 0:
        pytest.skip("test_chain_equals_hf did not run in this session (select it too)")
    r = CompareResult("logits processors (hypothesis)", "exact", bad == 0, [n], [n], "float32", n=n, n_mismatch=bad)
    r.message = f"{n} drawn examples, {bad} differ from transformers' processors" + (
        f"; first: {STATS['first']}" if bad else "")
    r.extra = {"examples": n}
    # a count of drawn examples whose chosen tokens agree, not a tensor difference: the report shows n/a, not 0
    r.judged_by = "chosen tokens equal to transformers' processors on every drawn example"
    record(r, row="Logits processors", component="Sampling")
    assert r, r.message


# ------------------------------------------------------------------------------------------ unit tests


def test_penalty_only_on_given_ids():
    x = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    y = repetition_penalty(x, torch.tensor([[0, 1, 1]]), 2.0)  # id 1 twice: penalised once
    assert y.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert repetition_penalty(x, torch.zeros(1, 0, dtype=torch.long), 2.0) is x


def test_min_new_tokens_and_suppress():
    x = torch.zeros(1, 3072)
    assert min_new_tokens(x, 0, 2, EOS)[0, EOS] == float("-inf")
    assert min_new_tokens(x, 1, 2, EOS)[0, EOS] == float("-inf")
    assert min_new_tokens(x, 2, 2, EOS)[0, EOS] == 0
    m = suppress_mask(3072, EOS)
    assert m[2048:].sum() == 1023 and not m[EOS] and not m[:2048].any()


def test_top_k_keeps_ties_and_top_p_keeps_best():
    x = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    assert torch.isfinite(top_k(x, 2)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p(x, 0.001)).sum() == 1


def test_margin_and_greedy():
    s = torch.tensor([[0.0, 5.0, 4.5], [1.0, float("-inf"), float("-inf")]])
    assert margin(s).tolist() == [0.5, float("inf")]
    assert choose(s, False, None).tolist() == [1, 0]


def test_seeded_generator_is_reproducible():
    s = torch.randn(2, 2048)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(choose(s, True, g1), choose(s, True, g2))
