"""bf16 generation rules (issue 7, item 7), shared by ``test_generate_bf16.py`` and the ``--dtype bfloat16`` session
of ``test_generate.py`` / ``test_prompt.py``.

Greedy codes in bf16 cannot be held to equality for a whole run: a bf16 argmax flips wherever two logits come
within bf16 noise of each other, and upstream itself leaves its own fp32 path at such a point. The rule is the
referee idea applied to codes:

- ours-bf16 vs upstream-bf16 (same device, same inputs: upstream's bf16 x-vectors and ICL codes): the codes must
  be equal up to our first divergence (frame, codebook), and that point may not come before the (frame, codebook)
  where upstream-bf16 leaves upstream-fp32 (its own divergence; same device, same case), in generation order
  (frame first, then codebook: ours leaving at codebook 0 of the frame where upstream leaves at codebook 15 is
  *before* it). Where upstream never leaves its fp32 within the run (or leaves it later than we leave it), our
  divergence passes only as a *tie*: our top1-top2 margin there at most one bf16 ulp of the top logit
  (:func:`tie_threshold`). The rows' notes show the three divergence points (:func:`divergence_note`).
- after the divergence, functional checks on our row: codes in ``[0, codebook size)`` (no EOS or special id inside
  a frame), no NaN margin or hidden state, stop reason ``eos`` or ``budget``, length consistent with it (EOS never
  before ``min_new_tokens``).

Weak on random weights (measured on tiny, issue 18): bf16 logits there sit so close that one ulp of the top logit
(0.125) covers many choices, and upstream itself leaves its fp32 within frames 0-2. The static decode step with the
softmax's arithmetic in bf16, or with RMSNorm's weight multiplied in fp32, still passed every item of the
custom_voice and ICL cases (each divergence a tie of margin 0 or 0.125, or not before upstream's own); the tap rows
of ``test_bf16.py`` are what catch those two. A checkpoint with realistic greedy margins does not give this rule
teeth against them either (measured, issue 18): on ``parity_tests/margins.py``'s checkpoint (tiny custom_voice
sharpened on its own greedy path) upstream bf16 stays on its fp32 for all 48 frames of every item, yet none of 13
realistic cast bugs tried turns the rule red there (no divergence from upstream bf16 at any of the 2,304 decisions:
margins are >= 9.5 bf16 ulps at the 1st percentile, a one-site cast bug moves a logit gap by 0.8-1.5 ulps RMS, as
much as a correct kernel difference does; table in ``test_generate_margins.py``). A codes-level rule cannot tell
one-rounding cast bugs from healthy kernel differences; the exact and mirror tap rows of ``test_bf16.py`` catch
them, and a logit-level bound on the eager loop is the next step (not built).

A sampled run has no tie exception (a top1-top2 margin says nothing about where a draw fell), and a single item's
first flip is a random event on both sides (any of its 16 draws per frame can land within bf16 noise of a CDF
boundary), so it is judged at the batch level: our earliest divergence (frame, codebook) over the items may not come
before upstream's earliest own bf16-vs-fp32 divergence; per-item numbers are still reported. (A sampled tie could be
measured on the exponential-race form of ``torch.multinomial``, argmax(p / q) with q ~ Exp(1), by replaying the
seeded generator; not done yet.)
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import sys

import torch
import torch.nn.functional as F

from reports.compare import CompareResult, compare, compare_three_way

from .helpers import GEN_TAPS, load_model, run_impl, settings_from_ref
from .helpers_codec import ENC
from .rows import Row, missing

JUDGED_BY = ("bf16 codes: equal up to our first divergence (frame, codebook), which may not come before upstream's "
             "own bf16-vs-fp32 divergence (frame, codebook) (or is a tie: margin <= 1 bf16 ulp of the top logit); "
             "functional checks after it")
CODEBOOK_SIZE = 2048  # codec codes per group; ids >= this (EOS, specials) never appear inside a frame

_BF16_RUNS: dict[tuple, tuple] = {}


class SoftmaxInBf16:
    """A mutation (``monkeypatch.setattr(impl.layers, "F", SoftmaxInBf16())``): ``torch.nn.functional`` with a softmax
    whose arithmetic (max subtraction, exp, sum, division) runs in the activation dtype, ``dtype=`` ignored."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def softmax(w: torch.Tensor, dim: int = -1, dtype=None) -> torch.Tensor:
        w = w - w.amax(dim, keepdim=True)
        e = w.exp()
        return e / e.sum(dim, keepdim=True)


def norm_weight_in_fp32(self, x: torch.Tensor) -> torch.Tensor:
    """A mutation of ``impl.layers.RMSNorm.forward``: the weight multiplied in fp32 and the product cast after
    (upstream casts back to the activation dtype first, then multiplies)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (self.weight.float() * x32).to(x.dtype)


def bf16_run(reference, checkpoint_dir, device: str, attn: str, case: str, variant: str, preset: str | None = None):
    """``(ref16, ref32, result, records, settings, eos)``: upstream bf16 and fp32 on ``device`` for ``case``, and impl in
    bf16 fed the bf16 reference's inputs (its ids and, for Base, its bf16 x-vectors and ICL codes). Cached.

    Our side runs the attention implementation the bf16 reference was captured with (its ``attn``: sdpa for the
    generation cases, upstream's loader default), not the session's ``attn``: in bf16 eager and sdpa attention round
    differently (eager rounds the softmax probabilities to bf16 before the value product), and that alone moves
    greedy codes. Measured at 0.6b (base, xvec streaming case, CPU with native bf16): our eager loop left upstream's
    sdpa bf16 at (frame 0, codebook 9) with a margin of 2 bf16 ulps, item 2 at (0, 7); our sdpa loop gave upstream's
    codes exactly for all three items (48, 48, 42 frames). Eager attention in bf16 is compared with upstream's eager
    layer by layer (``test_bf16.py``'s talker stack rows)."""
    key = (case, variant, preset, device, attn)
    if key not in _BF16_RUNS:
        if len(_BF16_RUNS) > 3 or preset is not None:
            _BF16_RUNS.clear()
        ref16 = reference(case, variant, preset, dtype="bfloat16")  # opened once per cached run, not per call
        ref32 = reference(case, variant, preset)
        tts = load_model(checkpoint_dir(variant, preset), device, torch.bfloat16, ref16.meta.get("attn") or attn)
        res, recs = run_impl(tts, ref16, include=GEN_TAPS)
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
    if sampled:  # batch level: earliest divergence points (frame, codebook), in generation order (None: never)
        fs = [divergence(o.cpu().long(), u.long()) for o, u in zip(res.codes, ups16)]
        us = [divergence(a.long(), b.long()) for a, b in zip(ups16, ups32)]
        f_min = min((d for d in fs if d), default=None)
        u_min = min((d for d in us if d), default=None)
        batch_ok = f_min is None or (u_min is not None and f_min >= u_min)
        batch_txt = (f"batch: our earliest divergence (frame, codebook) {f_min}, upstream's earliest own {u_min}: "
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
        up_txt = (f"upstream bf16 leaves its fp32 at frame {d_up[0]}, codebook {d_up[1]}" if d_up else
                  f"upstream bf16 never leaves its fp32 in {u16.shape[0]} frames")
        if d_ours is None:
            ok_div = batch_ok if sampled else True
            div_txt = f"equal to upstream bf16 ({ours.shape[0]} frames)" + (f"; {batch_txt}" if sampled else "")
        else:
            f, cb = d_ours
            r.first_diff = r.worst_index = [f, cb]
            if recs is None:  # no head logits recorded (the static decode step): no tie can be shown
                top = torch.tensor([math.nan, math.nan])
                m = float(res.margins[i][f, cb]) if f < ours.shape[0] else math.nan
                thr = 0.0
            else:
                scores = _scores_at(res, recs, settings, i, f, cb, eos)
                top = torch.topk(scores, 2)[0]
                m = float(res.margins[i][f, cb]) if f < ours.shape[0] else float(top[0] - top[1])
                thr = 0.0 if sampled else tie_threshold(float(top[0]))
            tie = abs(m) <= thr
            ex.update(margin_at_divergence=m, top1_at_divergence=float(top[0]), tie_threshold=thr, tie=tie)
            before_up = d_up is None or (f, cb) < d_up  # generation order: frame, then codebook
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


def divergence_note(r: CompareResult) -> str:
    """The three divergence points of a :func:`bf16_codes_results` result, for the row's notes."""
    ex = r.extra

    def at(key):
        d = ex.get(key)
        return f"(frame {d[0]}, codebook {d[1]})" if d else "none"

    return (f"first diff (frame, codebook): ours vs upstream bf16 {at('divergence_vs_upstream_bf16')}, upstream bf16 "
            f"vs its fp32 {at('upstream_bf16_vs_fp32_divergence')}, ours vs upstream fp32 "
            f"{at('divergence_vs_upstream_fp32')}")


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


# ------------------------------------------------------------------------------------------ bf16 tap rows

CP = "talker.code_predictor"


def tap_glob(ref, *globs: str) -> tuple[str, ...]:
    """The reference's expected taps matching any of ``globs``, in the registry's order."""
    names = ref.meta["expected_taps"]
    return tuple(n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs))


def last_layer_row(n: int) -> Row:
    return Row("Last layer and final norm", (f"talker.model.layers.{n - 1}:out", "talker.model.norm:out"), "three_way")


def cp_rows(ref) -> list[Row]:
    return [
        Row("MTP projection", (f"{CP}.small_to_mtp_projection:out",), "three_way"),
        Row("Layers", tap_glob(ref, f"{CP}.model.layers.*"), "three_way"),
        Row("Final norm", (f"{CP}.model.norm:out",), "three_way"),
        Row("LM heads", tap_glob(ref, f"{CP}.lm_head.*"), "three_way"),
        Row("Teacher logits", (f"{CP}:teacher_logits",), "three_way"),
    ]


def encoder_rows(ref) -> list[Row]:
    return [
        Row("Mimi SEANet", tap_glob(ref, f"{ENC}.encoder.layers.*:out", f"{ENC}.encoder:out"), "three_way"),
        Row("Mimi transformer", tap_glob(ref, f"{ENC}.encoder_transformer.layers.*"), "three_way"),
        Row("Mimi quantizer inputs", tap_glob(ref, f"{ENC}.downsample:out", f"{ENC}.quantizer.*.input_proj:out"),
            "three_way"),
    ]

#
# The bf16 tap rows of test_bf16.py (issue 18, item 1): every tap judged three ways (reports.compare
# .compare_three_way) with two per-row bounds measured on tiny, so that the judgement bites where the exact
# ours-bf16 == upstream-bf16 rows cannot run (CUDA: kernels may accumulate in another order than upstream's call):
#
# - mirror: RMS(ours - upstream bf16) <= mirror_k x upstream's own RMS error against the fp64 truth. Ours runs
#   upstream's op sequence, so on one device the two differ only where a kernel accumulates in another order. That
#   difference was measured on CPU by running ours with every bf16 Linear and Conv1d replaced by another correct
#   kernel (:func:`other_kernels`: fp32 accumulation over 2 or 4 reversed K chunks, bias added in the fp32 epilogue,
#   one rounding to bf16; as a CUDA GEMM/cuDNN call with another algorithm or a fused bias would): "sim" below, the
#   larger ratio of the two chunkings over the row's taps. Margin: mirror_k = 1.5 x sim + 0.1 (x1.5 for a kernel
#   that reorders more than the simulation; +0.1 so that a handful of flipped roundings in rows where the simulation
#   changed nothing still pass), rounded up to two decimals. For scale, upstream's own error is the unit, and the
#   old three-way direct bar is 2.
# - floor: SNR of ours against the fp64 truth >= the row's measured healthy SNR (its lowest tap; ours == upstream on
#   CPU there) minus 3 dB (twice the error power), rounded down to 0.5 dB; the cosine floor is the one that SNR
#   gives for uncorrelated error, 1/sqrt(1 + 10^(-SNR/10)). Replaces the global 20 dB (THREE_WAY_FLOORS), which
#   sat 18-35 dB under every row but the codec's audio-rate stages.
#
# Measured on the working tree of 9e01835 (issue 18 work) on tiny (synthetic weights, each case's stored inputs), CPU,
# torch 2.13: the run of test_bf16.py's row functions healthy and under other_kernels(2) and other_kernels(4).
# Presets other than tiny and real checkpoints keep the generic rule (2x / 3x / 20 dB) until measured there; the
# first CUDA run measures the real kernel difference: a healthy row above its mirror bound there means the bound
# must be re-derived from that run (say so with the numbers), not that the row may be loosened silently.
#
#    component / row                   healthy SNR dB  sim ratio  ->  mirror_k  floor dB
BF16_ROW_BOUNDS: dict[tuple[str, str], tuple[float, float]] = {
    ("talker", "Text Embedding"): (0.10, 52.0),             # 55.4   0.000
    ("talker", "Text Projection"): (0.10, 44.5),            # 47.5   0.000
    ("talker", "RMS Norm"): (0.10, 39.5),                   # 42.9   0.000
    ("talker", "QKV Projections"): (0.10, 42.0),            # 45.1   0.000
    ("talker", "QK Norm"): (0.10, 41.0),                    # 44.0   0.000
    ("talker", "RoPE"): (0.10, 40.5),                       # 43.5   0.000
    ("talker", "Attention (probabilities)"): (0.10, 41.0),  # 44.0   0.000
    ("talker", "Attention (output)"): (0.10, 39.5),         # 42.9   0.000
    ("talker", "O Projection"): (0.10, 38.5),               # 41.7   0.000
    ("talker", "MLP"): (0.10, 36.5),                        # 39.6   0.000
    ("talker", "Full Layer 0"): (0.10, 38.0),               # 41.2   0.000
    ("talker", "Last layer and final norm"): (0.45, 35.0),  # 38.1   0.228
    ("code_predictor", "MTP projection"): (0.10, 47.5),     # 50.8   0.000
    ("code_predictor", "Layers"): (0.12, 35.0),             # 38.0   0.008
    ("code_predictor", "Final norm"): (0.11, 37.5),         # 40.8   0.002
    ("code_predictor", "LM heads"): (0.17, 36.0),           # 39.1   0.044
    ("code_predictor", "Teacher logits"): (0.12, 37.0),     # 40.4   0.011
    ("codec_decoder", "Quantizer decode"): (0.10, 41.0),    # 44.2   0.000
    ("codec_decoder", "Causal Conv1d"): (1.33, 21.0),       # 24.4   0.818  (bias in the epilogue: 1 rounding less)
    ("codec_decoder", "SnakeBeta"): (1.33, 21.5),           # 24.6   0.818
    ("codec_decoder", "CausalTransConv1d"): (1.32, 24.5),   # 27.6   0.810
    ("codec_decoder", "ConvNeXtBlock"): (0.97, 37.0),       # 40.0   0.579
    ("codec_decoder", "ResidualUnit"): (1.33, 23.0),        # 26.3   0.816
    ("codec_decoder", "DecoderBlock"): (1.33, 23.0),        # 26.3   0.816
    ("codec_decoder", "Pre-transformer"): (1.11, 34.0),     # 37.4   0.673
    ("codec_decoder", "Full decoder"): (1.33, 21.0),        # 24.4   0.818
    ("codec_encoder", "Mimi SEANet"): (0.19, 36.5),         # 39.5   0.057
    ("codec_encoder", "Mimi transformer"): (0.62, 33.0),    # 36.4   0.343
    ("codec_encoder", "Mimi quantizer inputs"): (0.60, 35.0),  # 38.0   0.332
    ("speaker_encoder", "Speaker encoder blocks"): (0.16, 41.0),  # 44.1   0.039
    ("speaker_encoder", "x-vector"): (0.10, 41.0),          # 44.1   0.000
}
BOUNDS_PRESET = "tiny"  # where BF16_ROW_BOUNDS was measured

# The switch for the simulated CUDA judgement: QWEN3TTS_BF16_JUDGE=cuda runs test_bf16.py on the CPU as a CUDA run
# is judged there (the exact ours == upstream rows skip) and runs ours through :func:`other_kernels`, the stand-in
# for a CUDA kernel that accumulates in another order than upstream's call.
JUDGE_ENV = "QWEN3TTS_BF16_JUDGE"


def simulated_cuda() -> bool:
    v = os.environ.get(JUDGE_ENV, "")
    if v not in ("", "cpu", "cuda"):
        raise ValueError(f"{JUDGE_ENV}={v!r} is not one of 'cpu', 'cuda'")
    return v == "cuda"


def cosine_floor(snr_db: float) -> float:
    """The cosine that uncorrelated error at ``snr_db`` gives: 1 / sqrt(1 + 10^(-SNR/10))."""
    return 1.0 / math.sqrt(1.0 + 10.0 ** (-snr_db / 10.0))


def row_bounds(component: str, row: str, preset: str) -> tuple[float | None, tuple[float, float] | None]:
    """``(mirror_k, (snr floor, cosine floor))`` measured for this row, or ``(None, None)`` where none was
    measured (another preset or a real checkpoint: the generic three-way rule judges alone)."""
    b = BF16_ROW_BOUNDS.get((component, row)) if preset == BOUNDS_PRESET else None
    if b is None:
        return None, None
    return b[0], (b[1], cosine_floor(b[1]))


def _called_from_impl() -> bool:
    """Whether the innermost caller that belongs to either side is ``impl`` (and not upstream's ``qwen_tts`` /
    ``transformers``): both sides call the same ``torch.nn.Conv1d``, so the stack decides whose op it is."""
    f = sys._getframe(2)
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if mod == "impl" or mod.startswith("impl."):
            return True
        if mod.startswith(("qwen_tts", "transformers", "reference_export")):
            return False
        f = f.f_back
    return False


@contextlib.contextmanager
def other_kernels(chunks: int = 2):
    """Ours with another correct kernel for every bf16 ``F.linear`` and ``F.conv1d``: fp32 accumulation over
    ``chunks`` reversed input-channel chunks, the bias added in fp32 before the one rounding to bf16 (a split-K GEMM
    or a cuDNN convolution with a fused bias). A CPU stand-in for "same op sequence, another kernel" on CUDA.

    Only ``impl``'s calls are replaced: an upstream reference captured inside the context (a fixture that builds one
    on first use) keeps upstream's own kernels, so no cached reference is ever computed with these."""
    lin, conv = F.linear, F.conv1d

    def linear(x, w, b=None):
        if x.dtype != torch.bfloat16 or not _called_from_impl():
            return lin(x, w, b)
        y = None
        for i in reversed(torch.arange(x.shape[-1]).chunk(chunks)):
            p = x[..., i].float() @ w[:, i].float().T
            y = p if y is None else y + p
        return (y if b is None else y + b.float()).to(torch.bfloat16)

    def conv1d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        if x.dtype != torch.bfloat16 or not _called_from_impl():
            return conv(x, w, b, stride, padding, dilation, groups)
        if groups == 1 and w.shape[1] >= chunks:
            y = None
            for i in reversed(torch.arange(w.shape[1]).chunk(chunks)):
                p = conv(x[:, i].float(), w[:, i].float(), None, stride, padding, dilation)
                y = p if y is None else y + p
        else:  # depthwise: nothing to split; fp32 accumulation, one rounding
            y = conv(x.float(), w.float(), None, stride, padding, dilation, groups)
        return (y if b is None else y + b.float()[None, :, None]).to(torch.bfloat16)

    F.linear, F.conv1d = linear, conv1d
    try:
        yield
    finally:
        F.linear, F.conv1d = lin, conv


def judge_bf16_row(row: Row, got: dict, ref16, truth, component: str, preset: str, where: str) -> list:
    """Every tap of ``row``: float taps three ways with the row's measured mirror bound and floor
    (:func:`row_bounds`), integer taps exactly against upstream bf16; a tap missing anywhere fails."""
    mirror_k, floors = row_bounds(component, row.name, preset)
    out = []
    for name in row.taps:
        absent = [w for w, ok in ((f"the reference {ref16.path.name}", ref16.has(name)),
                                  (f"the truth {truth.path.name}", truth.has(name)), ("impl", name in got)) if not ok]
        if absent:
            out.append(missing(name, absent[0], "three_way"))
            continue
        up = ref16.tap(name)
        if not up.is_floating_point():
            out.append(compare(name, got[name], up, "exact"))
            continue
        out.append(compare_three_way(name, got[name], up, truth.tap(name), "bfloat16", where, mirror_k=mirror_k,
                                     floors=floors))
    if not out:
        raise AssertionError(f"row {row.name!r} compares nothing")
    return out


def judgements(results) -> dict[str, bool]:
    """Which judgement of a bf16 row set turned red: ``{"direct 2x", "mirror", "referee 3x", "floor"}`` -> caught."""
    keys = {"direct": "direct 2x", "mirror": "mirror", "referee": "referee 3x", "absolute floor": "floor"}
    caught = dict.fromkeys(keys.values(), False)
    for r in results:
        for k, ok in (r.extra.get("ok") or {}).items():
            caught[keys[k]] |= not ok
    return caught
