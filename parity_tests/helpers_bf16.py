"""bf16 generation rules (issue 7, item 7), shared by ``test_generate_bf16.py`` and the ``--dtype bfloat16`` session
of ``test_generate.py`` / ``test_prompt.py``.

Greedy codes in bf16 cannot be held to equality for a whole run: a bf16 argmax flips wherever two logits come
within bf16 noise of each other, and upstream itself leaves its own fp32 path at such a point. The rule is the
referee idea applied to codes:

- ours-bf16 vs upstream-bf16 (same device, same inputs: upstream's bf16 x-vectors and ICL codes): the frames must
  be equal up to our first divergence (frame, codebook), and that frame may not come before the frame where
  upstream-bf16 leaves upstream-fp32 (its own divergence; same device, same case). Where upstream never leaves its
  fp32 within the run (or leaves it later than we leave it), our divergence passes only as a *tie*: our top1-top2
  margin there at most one bf16 ulp of the top logit (:func:`tie_threshold`).
- after the divergence, functional checks on our row: codes in ``[0, codebook size)`` (no EOS or special id inside
  a frame), no NaN margin or hidden state, stop reason ``eos`` or ``budget``, length consistent with it (EOS never
  before ``min_new_tokens``).

A sampled run has no tie exception (a top1-top2 margin says nothing about where a draw fell), and a single item's
first flip is a random event on both sides (any of its 16 draws per frame can land within bf16 noise of a CDF
boundary), so it is judged at the batch level: our earliest divergence over the items may not come before
upstream's earliest own bf16-vs-fp32 divergence; per-item numbers are still reported. (A sampled tie could be
measured on the exponential-race form of ``torch.multinomial``, argmax(p / q) with q ~ Exp(1), by replaying the
seeded generator; not done yet.)
"""

from __future__ import annotations

import math

import torch

from reports.compare import CompareResult, compare_three_way

from .helpers import load_model, run_impl, settings_from_ref

JUDGED_BY = ("bf16 codes: equal up to our first divergence, which may not come before upstream's own bf16-vs-fp32 "
             "divergence (or is a tie: margin <= 1 bf16 ulp of the top logit); functional checks after it")
CODEBOOK_SIZE = 2048  # codec codes per group; ids >= this (EOS, specials) never appear inside a frame

_BF16_RUNS: dict[tuple, tuple] = {}


def bf16_run(reference, checkpoint_dir, device: str, attn: str, case: str, variant: str, preset: str | None = None):
    """``(ref16, ref32, result, records, settings, eos)``: upstream bf16 and fp32 on ``device`` for ``case``, and impl in
    bf16 fed the bf16 reference's inputs (its ids and, for Base, its bf16 x-vectors and ICL codes). Cached."""
    key = (case, variant, preset, device, attn)
    if key not in _BF16_RUNS:
        if len(_BF16_RUNS) > 3 or preset is not None:
            _BF16_RUNS.clear()
        ref16 = reference(case, variant, preset, dtype="bfloat16")
        ref32 = reference(case, variant, preset)
        tts = load_model(checkpoint_dir(variant, preset), device, torch.bfloat16, attn)
        res, recs = run_impl(tts, ref16)
        settings, _ = settings_from_ref(tts, ref16)
        _BF16_RUNS[key] = (ref16, ref32, res, recs, settings, tts.talker.cfg.codec_eos_token_id)
    return _BF16_RUNS[key]


def divergence(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """First (frame, codebook) where two code rows (F, 16) differ; a length difference on an equal common prefix is
    a divergence at (shorter length, 0) (one side chose EOS for codebook 0 there); None when identical."""
    a, b = a.cpu(), b.cpu()
    n = min(a.shape[0], b.shape[0])
    neq = a[:n] != b[:n]
    if bool(neq.any()):
        first = int(neq.flatten().nonzero()[0])
        return first // neq.shape[1], first % neq.shape[1]
    if a.shape[0] != b.shape[0]:
        return n, 0
    return None


def bf16_ulp(x: float) -> float:
    """One bf16 ulp at magnitude ``|x|`` (8 significant bits: 2^(floor(log2|x|) - 7))."""
    x = abs(float(x))
    if x == 0 or not math.isfinite(x):
        return 0.0
    return 2.0 ** (math.floor(math.log2(x)) - 7)


def tie_threshold(top1: float) -> float:
    """The margin at or below which a bf16 greedy choice is a tie.

    Our logits are bf16 numbers (the heads run in bf16; the processors upcast to fp32 afterwards), each rounded
    once at the head's output to the nearest bf16 value, i.e. by up to half an ulp. Two logits whose exact values
    lie less than one ulp apart can therefore come out equal or in either order by that last rounding alone: no
    bf16 implementation can be held to the order of such a pair. One ulp at the top logit's magnitude is the
    bound (the repetition penalty's /1.05 keeps the scale)."""
    return bf16_ulp(top1)


def _scores_at(res, recs, settings, item: int, frame: int, cb: int, eos: int) -> torch.Tensor:
    """Our processed scores (V,) behind code (frame, cb) of ``item``, rebuilt from the recorded head logits."""
    from impl.sampling import process_talker, suppress_mask, warp

    if cb == 0:  # talker call ``frame`` (0 = prefill) chose frame ``frame``'s codebook-0 token
        logits = recs["talker.codec_head:out"][frame]
        V = logits.shape[-1]
        row = logits.reshape(logits.shape[0], -1, V)[item, -1:].float()
        prev = res.codes[item][:frame, 0][None].to(row.device)
        return process_talker(row, settings.talker, prev, frame, eos, suppress_mask(V, eos, row.device))[0]
    logits = recs[f"talker.code_predictor.lm_head.{cb - 1}:out"][frame]
    V = logits.shape[-1]
    return warp(logits.reshape(logits.shape[0], -1, V)[item, -1:].float(), settings.predictor)[0]


def _functional(res, item: int, settings) -> tuple[bool, str]:
    c, reason = res.codes[item], res.stop_reason[item]
    budget = settings.max_new_tokens - 1
    min_new = settings.talker.min_new_tokens
    checks = {
        "codes in range": bool((c >= 0).all()) and bool((c < CODEBOOK_SIZE).all()),
        "no NaN margin": not bool(torch.isnan(res.margins[item]).any()),
        "finite hidden": bool(torch.isfinite(res.hidden[item].float()).all()),
        "stop reason": reason in ("eos", "budget"),
        "length vs stop": (c.shape[0] == budget) if reason == "budget" else (min_new <= c.shape[0] <= budget),
    }
    bad = [k for k, ok in checks.items() if not ok]
    return not bad, ("functional ok" if not bad else "functional FAILED: " + ", ".join(bad))


def bf16_codes_results(res, recs, ref16, ref32, settings, eos: int, sampled: bool = False) -> list[CompareResult]:
    """One result per batch item, judged by the module's rule; numbers in ``extra`` and the message."""
    ups16, ups32 = ref16.tap_steps("generate:codes"), ref32.tap_steps("generate:codes")
    assert len(ups16) == len(ups32) == len(res.codes), "batch sizes differ between the runs"
    out = []
    if sampled:  # batch level: earliest divergence frames (None: never)
        fs = [divergence(o.cpu().long(), u.long()) for o, u in zip(res.codes, ups16)]
        us = [divergence(a.long(), b.long()) for a, b in zip(ups16, ups32)]
        f_min = min((d[0] for d in fs if d), default=None)
        u_min = min((d[0] for d in us if d), default=None)
        batch_ok = f_min is None or (u_min is not None and f_min >= u_min)
        batch_txt = (f"batch: our earliest divergence frame {f_min}, upstream's earliest own {u_min}: "
                     f"{'ok' if batch_ok else 'ours BEFORE upstream'}")
    for i, (ours, u16, u32) in enumerate(zip(res.codes, ups16, ups32)):
        ours, u16, u32 = ours.cpu().long(), u16.long(), u32.long()
        d_ours = divergence(ours, u16)
        d_up = divergence(u16, u32)
        d_vs32 = divergence(ours, u32)
        r = CompareResult(f"generate:codes[{i}] (bf16)", "exact", False, list(ours.shape), list(u16.shape), "int64",
                          n=u16.numel())
        r.judged_by = JUDGED_BY
        ex = {"frames_ours": int(ours.shape[0]), "frames_upstream_bf16": int(u16.shape[0]),
              "frames_upstream_fp32": int(u32.shape[0]), "stop_reason": res.stop_reason[i],
              "divergence_vs_upstream_bf16": list(d_ours) if d_ours else None,
              "upstream_bf16_vs_fp32_divergence": list(d_up) if d_up else None,
              "divergence_vs_upstream_fp32": list(d_vs32) if d_vs32 else None}
        f_up = d_up[0] if d_up else None
        up_txt = (f"upstream bf16 leaves its fp32 at frame {d_up[0]}, codebook {d_up[1]}" if d_up else
                  f"upstream bf16 never leaves its fp32 in {u16.shape[0]} frames")
        if d_ours is None:
            ok_div = batch_ok if sampled else True
            div_txt = f"equal to upstream bf16 ({ours.shape[0]} frames)" + (f"; {batch_txt}" if sampled else "")
        else:
            f, cb = d_ours
            r.first_diff = r.worst_index = [f, cb]
            scores = _scores_at(res, recs, settings, i, f, cb, eos)
            top = torch.topk(scores, 2)[0]
            m = float(res.margins[i][f, cb]) if f < ours.shape[0] else float(top[0] - top[1])
            thr = 0.0 if sampled else tie_threshold(float(top[0]))
            tie = abs(m) <= thr
            ex.update(margin_at_divergence=m, top1_at_divergence=float(top[0]), tie_threshold=thr, tie=tie)
            before_up = f_up is None or f < f_up
            ok_div = batch_ok if sampled else (not before_up or tie)
            how = (batch_txt if sampled else "not before upstream's own divergence" if not before_up else
                   "a tie" if tie else "BEFORE upstream's own divergence and not a tie")
            div_txt = (f"equal to upstream bf16 up to frame {f}, first diff at frame={f}, codebook={cb} "
                       f"(our margin {m:.3g}, tie threshold {thr:.3g}): {how}")
        ok_fun, fun_txt = _functional(res, i, settings)
        ex["functional"] = fun_txt
        r.extra = ex
        r.passed = ok_div and ok_fun
        r.message = f"item {i}: {div_txt}; {up_txt}; after it {fun_txt}"
        out.append(r)
    return out


def bf16_call_limits(res, ref16, ref32) -> list[int]:
    """Per batch item, the talker calls whose inputs agree across ours-bf16, upstream-bf16 and upstream-fp32 (for
    the three-way tap rows): call k consumes frame k-1, so a divergence at frame f leaves calls 0..f equal."""
    out = []
    for ours, u16, u32 in zip(res.codes, ref16.tap_steps("generate:codes"), ref32.tap_steps("generate:codes")):
        n = res.n_tokens
        for a, b in ((ours, u16), (u16, u32)):
            d = divergence(a.long(), b.long())
            if d is not None:
                n = min(n, d[0] + 1)
        out.append(n)
    return out


def three_way(name: str, ours: torch.Tensor, up16: torch.Tensor, up32: torch.Tensor, where: str) -> CompareResult:
    return compare_three_way(name, ours.float(), up16.float(), up32.float(), "bfloat16", where)
