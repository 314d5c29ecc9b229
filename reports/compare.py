"""The comparison engine: metrics, the tier table, per-tap overrides, ``CompareResult``.

Imported by ``parity_tests`` (to judge) and ``reports`` (to format); holds no test-only logic.

Every comparison records max_abs, max_rel, mean_abs, NMSE (Σ(a−b)²/Σb²), cosine, SNR (dB), the worst index with
both values, and the smallest atol (at the tier's rtol) and rtol (at the tier's atol) that would have passed —
whether it passed or not, so tiers can be tuned from measured data.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Tier:
    name: str
    rtol: float = 0.0
    atol: float = 0.0
    nmse: float | None = None  # additionally required: NMSE ≤ this (stack tier)
    kind: str = "close"  # close | exact | referee | functional
    referee_k: float = 3.0  # referee: our error ≤ k × upstream's own error (+ floor)
    referee_floor: float = 1e-6
    doc: str = ""


# One table. rtol and atol always together. Tuned from the recorded "smallest passing tolerance".
TIERS: dict[str, Tier] = {
    "exact": Tier("exact", kind="exact", doc="ids, codes, argmax, lengths, shapes: equality"),
    "op": Tier("op", rtol=1.3e-6, atol=1e-5, doc="one fp32 op: torch.testing fp32 defaults"),
    "block": Tier("block", rtol=1e-5, atol=1e-5, doc="one layer/block in fp32"),
    "stack": Tier("stack", rtol=1e-4, atol=1e-4, nmse=1e-8,
                  doc="many layers, whole components, waveforms in fp32 (+ NMSE ≤ 1e-8)"),
    "referee": Tier("referee", kind="referee", referee_k=3.0, referee_floor=1e-6,
                    doc="bf16/kernels/CUDA: our RMS error vs upstream fp32 ≤ 3 × upstream's own RMS error "
                        "in that precision vs its fp32, + 1e-6"),
    "functional": Tier("functional", kind="functional",
                       doc="sampled generation: EOS behaviour, code ranges, lengths, no NaN"),
}


def tier_for(name: str, default: str, overrides: dict[str, str] | None = None) -> Tier:
    """Tier for tap ``name``: the first glob in ``overrides`` that matches, else ``default``."""
    for glob, tier in (overrides or {}).items():
        if fnmatch.fnmatchcase(name, glob):
            return TIERS[tier]
    return TIERS[default]


@dataclass
class CompareResult:
    name: str
    tier: str
    passed: bool
    shape: list[int]
    ref_shape: list[int]
    dtype: str
    n: int = 0
    n_mismatch: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    mean_abs: float = 0.0
    nmse: float = 0.0
    cosine: float = 1.0
    snr_db: float = math.inf
    worst_index: list[int] = field(default_factory=list)
    worst_got: float = 0.0
    worst_ref: float = 0.0
    needed_atol: float = 0.0
    needed_rtol: float = 0.0
    rtol: float = 0.0
    atol: float = 0.0
    first_diff: list[int] | None = None  # exact tier: first differing index
    extra: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    # How a result was judged when it is not a numeric comparison (a functional check, a loader refusal, a missing
    # tap): the report then shows "n/a" for its difference instead of a 0 it never measured.
    judged_by: str = ""

    def __bool__(self) -> bool:
        return self.passed

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = str(v)
        return d


def _fail_shape(name, tier, got, ref) -> CompareResult:
    r = CompareResult(name, tier.name, False, list(got.shape), list(ref.shape), str(got.dtype))
    r.message = f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    r.judged_by = "shape mismatch"
    return r


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, tier: str | Tier = "block",
            referee_ref_err: float | None = None) -> CompareResult:
    """Compare ``got`` (ours) with ``ref`` (upstream). Floats by rtol/atol (+NMSE), integers exactly.

    ``referee`` tier: pass ``referee_ref_err`` = RMS error of upstream in the low precision vs upstream fp32;
    ``ref`` is then upstream fp32 and ``got`` ours in the low precision.
    """
    tier = TIERS[tier] if isinstance(tier, str) else tier
    got, ref = got.detach().cpu(), ref.detach().cpu()
    if not got.is_floating_point() and not ref.is_floating_point() and tier.kind != "exact":
        tier = TIERS["exact"]
    if tier.kind == "exact":
        return compare_exact(name, got, ref)
    if tuple(got.shape) != tuple(ref.shape):
        return _fail_shape(name, tier, got, ref)
    n = ref.numel()
    r = CompareResult(name, tier.name, False, list(got.shape), list(ref.shape), str(got.dtype).replace("torch.", ""),
                      n=n, rtol=tier.rtol, atol=tier.atol)
    if n == 0:
        r.message = f"{name}: zero elements compared (a comparison that compares nothing fails)"
        return r
    a, b = got.double(), ref.double()
    fin_a, fin_b = torch.isfinite(a), torch.isfinite(b)
    if not bool(fin_a.all()) or not bool(fin_b.all()):
        bad = (~fin_a).sum().item(), (~fin_b).sum().item()
        r.message = f"{name}: non-finite values (ours {bad[0]}, reference {bad[1]}): NaN/Inf is a failure"
        r.n_mismatch = int(bad[0] + bad[1])
        r.max_abs = r.max_rel = math.inf
        return r
    d = (a - b).abs()
    absb = b.abs()
    r.max_abs = float(d.max())
    r.mean_abs = float(d.mean())
    rel = d / absb.clamp_min(1e-30)
    r.max_rel = float(torch.where(absb > 0, rel, torch.where(d > 0, torch.inf, 0.0)).max())
    sb = float((b * b).sum())
    se = float((d * d).sum())
    r.nmse = se / sb if sb > 0 else (0.0 if se == 0 else math.inf)
    r.snr_db = 10 * math.log10(sb / se) if se > 0 and sb > 0 else math.inf
    na, nb = float(a.norm()), float(b.norm())
    r.cosine = float((a.flatten() @ b.flatten()) / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    worst = int(d.flatten().argmax())
    r.worst_index = [int(i) for i in torch.unravel_index(torch.tensor(worst), d.shape)] if d.ndim else []
    r.worst_got, r.worst_ref = float(a.flatten()[worst]), float(b.flatten()[worst])
    r.needed_atol = float((d - tier.rtol * absb).clamp_min(0).max())
    r.needed_rtol = float(((d - tier.atol).clamp_min(0) / absb.clamp_min(1e-30)).max()) if r.max_abs > tier.atol else 0.0
    if tier.kind == "referee":
        if referee_ref_err is None:
            r.message = f"{name}: referee tier needs upstream's own low-precision error"
            return r
        ours = math.sqrt(se / n)
        bar = tier.referee_k * referee_ref_err + tier.referee_floor
        r.extra = {"ours_rms_err": ours, "upstream_rms_err": referee_ref_err, "bar": bar,
                   "ratio": ours / referee_ref_err if referee_ref_err > 0 else math.inf}
        r.passed = ours <= bar
        r.message = (f"{name}: referee {'ok' if r.passed else 'FAILED'}: our RMS error {ours:.3g} vs bar {bar:.3g} "
                     f"(= {tier.referee_k} × upstream bf16 error {referee_ref_err:.3g} + {tier.referee_floor:g}); "
                     f"cosine {r.cosine:.6f}, SNR {r.snr_db:.1f} dB")
        return r
    bad = d > (tier.atol + tier.rtol * absb)
    r.n_mismatch = int(bad.sum())
    r.passed = r.n_mismatch == 0 and (tier.nmse is None or r.nmse <= tier.nmse)
    if r.passed:
        r.message = f"{name}: ok ({tier.name}): max_abs {r.max_abs:.3g}, max_rel {r.max_rel:.3g}, NMSE {r.nmse:.3g}"
    else:
        nm = "" if tier.nmse is None or r.nmse <= tier.nmse else f" NMSE {r.nmse:.3g} > {tier.nmse:g};"
        r.message = (f"{name}: {r.n_mismatch}/{n} ({100 * r.n_mismatch / n:.2f}%) elements outside "
                     f"rtol={tier.rtol:g} atol={tier.atol:g};{nm} max_abs {r.max_abs:.3g} at {tuple(r.worst_index)} "
                     f"(ours {r.worst_got:.8g}, reference {r.worst_ref:.8g}); would pass at atol {r.needed_atol:.3g} "
                     f"or rtol {r.needed_rtol:.3g}; cosine {r.cosine:.8f}")
    return r


def compare_exact(name: str, got: torch.Tensor, ref: torch.Tensor, axes: tuple[str, ...] = ()) -> CompareResult:
    """Equality; on mismatch report the first differing index (named by ``axes``, e.g. ("frame", "codebook"))."""
    got, ref = got.detach().cpu(), ref.detach().cpu()
    r = CompareResult(name, "exact", False, list(got.shape), list(ref.shape), str(got.dtype).replace("torch.", ""),
                      n=ref.numel())
    if tuple(got.shape) != tuple(ref.shape):
        r.message = f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
        r.judged_by = "shape mismatch"
        return r
    if r.n == 0:
        r.message = f"{name}: zero elements compared (a comparison that compares nothing fails)"
        return r
    if got.is_floating_point() or ref.is_floating_point():
        # NaN/Inf is a failure in every tier: NaN == NaN or inf == inf on both sides is no evidence of parity.
        bad = int((~torch.isfinite(got.double())).sum()), int((~torch.isfinite(ref.double())).sum())
        if bad[0] or bad[1]:
            r.n_mismatch = bad[0] + bad[1]
            r.max_abs = math.inf
            r.message = f"{name}: non-finite values (ours {bad[0]}, reference {bad[1]}): NaN/Inf is a failure"
            return r
    neq = got != ref
    r.n_mismatch = int(neq.sum())
    r.passed = r.n_mismatch == 0
    if r.passed:
        r.message = f"{name}: exact ({r.n} elements equal)"
        return r
    first = int(neq.flatten().nonzero()[0])
    idx = [int(i) for i in torch.unravel_index(torch.tensor(first), neq.shape)]
    r.first_diff = r.worst_index = idx
    r.worst_got, r.worst_ref = float(got.flatten()[first]), float(ref.flatten()[first])
    r.max_abs = float((got.double() - ref.double()).abs().max())
    named = ", ".join(f"{a}={i}" for a, i in zip(axes, idx)) if axes else str(tuple(idx))
    r.message = (f"{name}: {r.n_mismatch}/{r.n} differ; first at {named}: ours {r.worst_got:g}, "
                 f"reference {r.worst_ref:g}")
    return r
