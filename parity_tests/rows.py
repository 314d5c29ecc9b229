"""Shared machinery for parity rows: a row is a named group of taps judged at one tier.

``compare_row`` compares every tap of a row between ``impl``'s recording and a reference file and returns the
``CompareResult``s; a tap the reference lacks or ``impl`` did not emit is a failed result (never skipped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from reports.compare import CompareResult, compare, compare_three_way, tier_for


@dataclass(frozen=True)
class Row:
    """A parity row: a name, the taps it compares (or, for rows computed by a component's own driver, the modules
    it drives), its tier, and per-tap tier overrides keyed by glob (``reports.compare.tier_for``; give the reason
    where the row is defined). One type for every component."""

    name: str
    taps: tuple[str, ...]
    tier: str
    overrides: dict[str, str] = field(default_factory=dict)  # tap glob -> tier
    driver: str = "taps"  # "taps": compare_row over ``taps``; else how the component computes it (codec decoder)
    modules: tuple[str, ...] = ()  # module paths a driver feeds one by one (codec decoder "fed" rows)

    def tier_of(self, tap: str) -> str:
        return tier_for(tap, self.tier, self.overrides).name


def missing(name: str, where: str, tier: str) -> CompareResult:
    r = CompareResult(name, tier, False, [], [], "")
    r.message = f"{name}: not recorded by {where} (a missing tap is a failure)"
    r.judged_by = "missing tap"
    return r


def compare_row(row: Row, got: dict[str, torch.Tensor], ref, step: int | None = None) -> list[CompareResult]:
    out = []
    for name in row.taps:
        tier = row.tier_of(name)
        if not ref.has(name):
            out.append(missing(name, f"the reference {ref.path.name}", tier))
            continue
        if name not in got:
            out.append(missing(name, "impl", tier))
            continue
        r = ref.tap(name) if step is None else ref.tap_steps(name)[step]
        out.append(compare(name, got[name].float(), r.float(), tier))
    if not out:
        raise AssertionError(f"row {row.name!r} compares nothing")
    return out


def compare_row_three_way(row: Row, got: dict[str, torch.Tensor], ref_dev, truth, precision: str,
                          where: str = "") -> list[CompareResult]:
    """A CUDA/bf16 row: every float tap of ``row`` judged three ways (``reports.compare.compare_three_way``): ours
    (``got``) against upstream on the same device/dtype (``ref_dev``) and both against ``truth`` (upstream fp32 on
    CPU, or fp64). Integer taps are compared exactly with ``ref_dev``. A tap missing from any of the three fails."""
    out = []
    for name in row.taps:
        absent = [w for w, ok in ((f"the reference {ref_dev.path.name}", ref_dev.has(name)),
                                  (f"the truth {truth.path.name}", truth.has(name)), ("impl", name in got)) if not ok]
        if absent:
            out.append(missing(name, absent[0], "three_way"))
            continue
        dev_t, tru_t = ref_dev.tap(name), truth.tap(name)
        if not dev_t.is_floating_point():
            out.append(compare(name, got[name], dev_t, "exact"))
            continue
        out.append(compare_three_way(name, got[name], dev_t, tru_t, precision, where))
    if not out:
        raise AssertionError(f"row {row.name!r} compares nothing")
    return out


def assert_row(row: str, results: list[CompareResult]) -> None:
    bad = [r for r in results if not r]
    assert not bad, f"{row}: " + " | ".join(r.message for r in bad)
