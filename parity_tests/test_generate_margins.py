"""The bf16 generation rule on a checkpoint with realistic greedy margins (issue 18, item 1).

The checkpoint is the tiny ``custom_voice`` one sharpened on its own greedy path (``parity_tests/margins.py``).
Upstream runs its own ``generate`` on it in fp32 and in bf16 (the ``lm_gen_custom_voice_stream`` case, captured
like every other reference); ours runs in bf16, on the eager loop and on the static decode step
(``impl/fast_decode.py``), judged by ``helpers_bf16.bf16_codes_results``.

- ``test_margins_bf16``: rows ``Greedy codes custom_voice/custom_voice (streaming text, bf16, realistic margins
  [, static decode step])``. The notes say where upstream bf16 leaves its fp32 per item here and on the
  random-weight checkpoint (measured: never in 48 frames here, in any item; (frame 0, codebook 15), (1, 13),
  (2, 9) on random weights). Asserts the checkpoint does what it is for (upstream stays on its fp32 for at least
  ``MIN_FRAMES_ON_FP32`` frames in every item) and that ours passes the rule.
- ``test_cast_bug_margins`` (``mutation``): the static decode step with a bf16 cast bug the rule misses on random
  weights (the softmax's arithmetic in bf16; RMSNorm's weight multiplied in fp32). Asserts it passes on random
  weights (the gap) and that it fails the rule here. Measured: it does not (no item leaves upstream bf16 at
  all), so the test is a strict ``xfail``; it fails (XPASS) the day the rule catches the bug.
- ``test_logit_gap_shift`` (``slow``, ``mutation``): why, on the head logits. Along the path ours and upstream
  bf16 share, the RMS shift of upstream's top1-top2 gap in our logits, in bf16 ulps of the top logit (upstream
  captures, CPU, torch 2.13):

  ========================================  ==============  =========
  ours (bf16)                               random weights  realistic
  ========================================  ==============  =========
  eager loop, SDPA (upstream's kernels)     0               0
  same, other GEMM order (2 / 4 chunks)     0.26 / 0.08     0.09 / 0.08
  norm-weight-in-fp32                       0.72            0.97
  static decode step (healthy)              0.68            0.72
  norm-weight-in-fp32, static decode step   0.81            0.93
  explicit attention (healthy)              0.96            0.87
  softmax-in-bf16, explicit attention       0.81            0.88
  ========================================  ==============  =========

  A one-rounding cast bug moves the logits by about one ulp: as far as upstream's own bf16 error does (0.90-0.96
  ulp RMS against fp32; impl teacher-forced along its fp32 path), and as far as two *correct* kernels do (the
  static step's masked full-capacity attention; the explicit attention against upstream's SDPA). So where margins
  keep upstream on its fp32 they keep the bugged step on upstream bf16 too, and where a margin is small enough for
  the bug to flip a token, upstream's own bf16 flips at the same decision or the flip is within the one-ulp tie.
  Sharper or flatter margins move both sides alike; a codes rule that caught these bugs would flag the healthy
  static step about as often. The realistic checkpoint does separate the bugs from GEMM accumulation order
  (0.93-0.97 vs 0.09 ulp: 10x; 2.8x on random weights): what a logit-level bound on the eager loop could use.

Search for a bug the rule catches here but misses on random weights (issue 18, item 1; not found). Each candidate
was run on the static decode step and on the eager loop (ours with explicit attention, as the default run; the two
loops gave the same codes in every case). The verdict is ``bf16_codes_results``'s, against upstream captures (CPU,
torch 2.13). Random weights: per item, our first divergence from upstream bf16 and our margin there (tie threshold
0.125 everywhere). Upstream's own divergences are (0, 15), (1, 13), (2, 9). Gap shift: the RMS of
``margins.gap_shifts`` in bf16 ulps of the top logit, random / realistic, eager loop.

==========================================  ===========================================  =========  ===========
bug (ours, bf16)                            random weights                               realistic  gap shift
==========================================  ===========================================  =========  ===========
none (explicit attention, healthy)          (see ``test_margins_bf16``) pass             pass       0.96 / 0.87
softmax-in-bf16                             pass: (0,15) .25, (1,13) .25, (2,9) 0        pass       0.81 / 0.88
norm-weight-in-fp32                         pass: (0,15) .25, (8,0) 0, (1,6) 0           pass       1.00 / 0.97
rope-angles-in-bf16 (bf16 pos x inv_freq)   pass: (0,15) .125, (1,13) .125, (1,6) 0      pass       1.14 / 0.90
rope-inv-freq-in-bf16 (``.to(bf16)`` buf)   pass: (0,15) .125, (1,13) .125, (0,1) .125   pass       1.30 / 0.88
rope angle rounded to bf16 before cos/sin   pass: (0,15) .125, (0,11) 0, (2,9) .125     pass       0.80 / 0.87
RoPE applied in fp32, cast after            pass: (0,15) .125, (1,13) .125, (2,9) .125   pass       0.77 / 0.87
frame embedding: chain of 15 bf16 adds      pass: (0,15) .25, (1,13) .125, (1,6) 0       pass       0.96 / 0.92
residual stream fp32 through every layer    pass: (0,15) .25, (0,11) 0, (1,6) 0          pass       0.73 / 0.87
RMSNorm wholly in bf16 (mean, rsqrt)        pass: (0,15) .375, (2,12) .125, (0,3) .125   pass       1.32 / 1.03
SwiGLU product in fp32, cast after          pass: (0,15) .125, (1,13) .125, (1,6) 0      pass       1.06 / 0.88
heads (talker, predictor) in fp32           pass: (0,15) .175, (1,13) .164, (0,3) .07    pass       1.04 / 0.78
every Linear accumulates in bf16, 8-wide K  pass: (0,15) .375, (0,2) 0, (0,3) .125       pass       n/a / --
every Linear accumulates in bf16, 4-wide K  RED: item 2 (1,6) .25, before (2,9)          pass       1.73 / 1.51
==========================================  ===========================================  =========  ===========

No candidate leaves upstream bf16 at all on the realistic checkpoint. Its greedy margins are at least 9.5 ulps at
the 1st percentile. The largest single gap shift of any candidate is 3-6 ulps (RMS 0.8-1.5), so no decision can
flip. The RoPE bugs are no stronger here than a healthy kernel. The reasons are in the tiny config: rope_theta
1e6 and head dims 32/16 mean only the first one or two frequency pairs turn by more than a radian over the ~67
positions, and positions below 256 are exact in bf16. Sharpening the attention does not help. Multiplying the
q/k-norm weights by 2 before sharpening (an in-process build, impl's bf16 SDPA loop standing in for upstream,
which it equals bit for bit on the CPU) still leaves the RoPE bugs at 1.07-1.14 against the healthy explicit
attention's 1.06. Multiplying them by 4 makes upstream leave its fp32 within frames 0-1 again. The one candidate
strong enough to turn a row red (bf16 accumulation, 4-wide K) turns it red on random weights, where the window is
short but the margins are small. It misses on the realistic checkpoint, where the window is long but the margins
are wide.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import impl.layers as layers
from impl.fast_decode import clear_decoders
from impl.generate import generate
from impl.prompt import build
from impl.taps import recording

from .helpers import load_model, requests_from_ref, settings_from_ref
from .helpers_bf16 import SoftmaxInBf16, bf16_codes_results, divergence, divergence_note, norm_weight_in_fp32
from .margins import CASE, VARIANT, margins_checkpoint

MIN_FRAMES_ON_FP32 = 24  # realistic: upstream bf16 equals its fp32 for at least this many frames per item
COMPONENT = "Generation, bf16"
BF16 = torch.bfloat16


@pytest.fixture(autouse=True, scope="module")
def _tiny_only(preset, request):
    """Module-scoped and autouse, so it runs before the module-scoped ``sides``: on a 0.6b run that fixture, set up
    ahead of a function-scoped skip, captured four references and built a sharpened 0.6b checkpoint (5.8 min, 21 GB
    peak RSS) for tests that then skipped."""
    if preset != "tiny" or request.config.getoption("--checkpoint"):
        pytest.skip("the realistic-margin checkpoint is built from the tiny custom_voice one")


@pytest.fixture(scope="module")
def sides(checkpoint_dir, reference, device):
    """``{"random": (ckpt, ref16, ref32), "margins": (ckpt, ref16, ref32)}``: upstream's bf16 and fp32 captures of
    the case on the random-weight tiny checkpoint and on the realistic-margin one made from it."""
    from conftest import reference_file

    rnd = checkpoint_dir(VARIANT)
    out = {"random": (rnd, reference(CASE, VARIANT, dtype="bfloat16"), reference(CASE, VARIANT))}
    ckpt = margins_checkpoint(rnd, out["random"][2])
    # No --refs lookup here: pre-captured reference sets hold no capture of this checkpoint.
    opened = [reference_file(CASE, ckpt, dtype="bfloat16", device=device), reference_file(CASE, ckpt, device=device)]
    out["margins"] = (ckpt, *opened)
    yield out
    for r in opened:
        r.close()


def upstream_leaves(ref16, ref32) -> list[tuple[int, int] | None]:
    """Per item, the (frame, codebook) where upstream bf16 first leaves upstream fp32 (None: never)."""
    return [divergence(a.long(), b.long()) for a, b in zip(ref16.tap_steps("generate:codes"),
                                                           ref32.tap_steps("generate:codes"))]


def _shown(ds) -> str:
    return ", ".join(f"item {i} {'never' if d is None else f'(frame {d[0]}, codebook {d[1]})'}" for i, d in enumerate(ds))


def run_ours(ckpt, ref16, device: str, attn: str, fast: str | None):
    """Ours in bf16 on the case's inputs (upstream bf16's ids), eager loop (``fast=None``) or static decode step
    (``fast="eager"``): (result, head-logit records, settings, eos)."""
    tts = load_model(ckpt, device, BF16, attn)
    settings, _ = settings_from_ref(tts, ref16)
    try:
        with torch.inference_mode(), recording(tts.talker, prefix="talker") as rec:
            prompt = build(tts.talker, tts.config, requests_from_ref(ref16))
            res = generate(tts.talker, prompt, settings, None, fast=fast)
    finally:
        clear_decoders()
    return res, rec.records, settings, tts.talker.cfg.codec_eos_token_id


def judge(side, device, attn, fast):
    ckpt, ref16, ref32 = side
    res, recs, settings, eos = run_ours(ckpt, ref16, device, attn, fast)
    return res, bf16_codes_results(res, recs, ref16, ref32, settings, eos)


@pytest.mark.parametrize("fast", [None, "eager"], ids=["eager-loop", "static-step"])
def test_margins_bf16(fast, sides, device, attn, record):
    up_rnd, up_mar = upstream_leaves(*sides["random"][1:]), upstream_leaves(*sides["margins"][1:])
    res, results = judge(sides["margins"], device, attn, fast)
    where = "eager loop" if fast is None else "static decode step"
    row = f"Greedy codes custom_voice/{VARIANT} (streaming text, bf16, realistic margins" + \
        ("" if fast is None else ", static decode step") + ")"
    for i, r in enumerate(results):
        record(r, row=row, component=COMPONENT, variant=VARIANT, compares="ours vs upstream",
               notes=f"item {i}: {res.codes[i].shape[0]} frames, stop={res.stop_reason[i]}; {where}, attn {attn}, on "
                     f"{device}; checkpoint: tiny {VARIANT} sharpened on its greedy path (parity_tests/margins.py); "
                     f"{divergence_note(r)}; upstream bf16 leaves its fp32 here: {_shown(up_mar)}; on the "
                     f"random-weight tiny checkpoint: {_shown(up_rnd)}")
    early = [i for i, d in enumerate(up_mar) if d is not None and d[0] < MIN_FRAMES_ON_FP32]
    assert not early, (f"the realistic-margin checkpoint lets upstream bf16 leave its fp32 before frame "
                       f"{MIN_FRAMES_ON_FP32} in items {early}: {_shown(up_mar)}")
    assert all(results), " | ".join(r.message for r in results if not r)


BUGS = {"softmax-in-bf16": (layers, "F", SoftmaxInBf16()),
        "norm-weight-in-fp32": (layers.RMSNorm, "forward", norm_weight_in_fp32)}


def _verdict(res, results) -> str:
    parts = []
    for i, r in enumerate(results):
        ex = r.extra
        d = ex["divergence_vs_upstream_bf16"]
        parts.append(f"item {i} " + ("no divergence" if d is None else
                                     f"diverges at (frame {d[0]}, codebook {d[1]}), margin "
                                     f"{ex['margin_at_divergence']:.3g} (tie <= {ex['tie_threshold']:.3g})")
                     + (" RED" if not r else ""))
    return "; ".join(parts)


@pytest.mark.mutation
@pytest.mark.xfail(strict=True, reason="measured: the bf16 generation rule misses these one-rounding cast bugs on "
                   "the realistic-margin checkpoint too (no divergence from upstream bf16 in any item); see the "
                   "module docstring")
@pytest.mark.parametrize("bug", list(BUGS))
def test_cast_bug_margins(bug, sides, device, attn, monkeypatch):
    """The static decode step with ``bug``: passes the rule on random weights (asserted: that is the gap), and
    should turn it red on the realistic-margin checkpoint (asserted; measured not to: strict xfail)."""
    owner, name, value = BUGS[bug]
    with monkeypatch.context() as m:
        m.setattr(owner, name, value)
        res_r, rnd = judge(sides["random"], device, attn, "eager")
        res_m, mar = judge(sides["margins"], device, attn, "eager")
    assert all(rnd), f"{bug} is caught on random weights already: {_verdict(res_r, rnd)}"
    assert not all(mar), (f"{bug} in the static decode step passes the rule on the realistic-margin checkpoint: "
                          f"{_verdict(res_m, mar)} (random weights: {_verdict(res_r, rnd)})")


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt()) if x.numel() else 0.0


# (label, our attention, our loop, other_kernels chunks, bug). The lm_gen cases capture upstream with SDPA attention:
# ours on the eager loop with SDPA is upstream's bit for bit on the CPU. Ours with the explicit (eager) attention, and
# the static decode step (SDPA over the whole fixed capacity under a mask), are other correct kernels; the softmax bug
# lives only in the explicit attention.
GAP_RUNS = [
    ("healthy", "sdpa", None, None, None),
    ("other GEMM order (2 chunks)", "sdpa", None, 2, None),
    ("other GEMM order (4 chunks)", "sdpa", None, 4, None),
    ("norm-weight-in-fp32", "sdpa", None, None, "norm-weight-in-fp32"),
    ("healthy static decode step", "sdpa", "eager", None, None),
    ("norm-weight-in-fp32 static decode step", "sdpa", "eager", None, "norm-weight-in-fp32"),
    ("healthy, explicit attention", "eager", None, None, None),
    ("softmax-in-bf16, explicit attention", "eager", None, None, "softmax-in-bf16"),
]


@pytest.mark.slow
@pytest.mark.mutation
def test_logit_gap_shift(sides, device, monkeypatch):
    """What the codes rule cannot see, measured on the head logits: along the path ours and upstream bf16 share, the
    RMS shift of upstream's top1-top2 gap in our logits, in bf16 ulps of the top logit
    (``margins.gap_shifts``), on both checkpoints, for the runs of ``GAP_RUNS``: the healthy loop, the healthy loop
    under another correct GEMM accumulation order (``helpers_bf16.other_kernels``, the CPU stand-in for CUDA
    kernels), the static decode step and the explicit attention (other correct kernels), and the two cast bugs.
    Asserts, on the CPU, that the healthy eager loop with SDPA is upstream's bit for bit (shift 0), and that on the
    realistic-margin checkpoint norm-weight-in-fp32 moves the gaps at least 3x as far as either GEMM order does.
    The table is printed and in the assertion message (see the module docstring for what it shows)."""
    from .helpers_bf16 import other_kernels
    from .margins import gap_shifts

    rms: dict[str, dict[str, float]] = {}
    for side in ("random", "margins"):
        ckpt, ref16, _ = sides[side]
        ups = ref16.tap_steps("generate:codes")
        rms[side] = {}
        for label, attn, loop, chunks, bug in GAP_RUNS:
            with monkeypatch.context() as m, (other_kernels(chunks) if chunks else contextlib.nullcontext()):
                if bug:
                    m.setattr(*BUGS[bug])
                res, recs, _, _ = run_ours(ckpt, ref16, device, attn, loop)
            frames = []
            for i, u in enumerate(ups):
                d = divergence(res.codes[i], u.long())
                frames.append(min(u.shape[0], d[0] if d else u.shape[0]))
            rms[side][label] = _rms(gap_shifts(recs, ref16, frames))
    table = "RMS top1-top2 gap shift, bf16 ulps of the top logit: " + "; ".join(
        f"{side}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()) for side, r in rms.items())
    m = rms["margins"]
    if device == "cpu":
        assert m["healthy"] == 0.0 and rms["random"]["healthy"] == 0.0, f"healthy is not upstream's: {table}"
    kernel = max(m["other GEMM order (2 chunks)"], m["other GEMM order (4 chunks)"])
    assert m["norm-weight-in-fp32"] >= 3 * kernel, table
    print(table)
