"""Compare any two reference-schema HDF5 files tap by tap: how an outside port (Rust, C++, ONNX, MLX …) checks
itself against upstream. The port writes its activations under our tap names into the schema of
``reference_export/h5io.py``; this reports every common tap at a tier and names the first tap, in upstream's
execution order, that fails.
"""

from __future__ import annotations

import json
from pathlib import Path

from tabulate import tabulate

from reference_export.h5io import RefFile

from .compare import compare, tier_for


def compare_files(ours: Path, ref: Path, default_tier: str = "stack", overrides: dict[str, str] | None = None,
                  include_missing: bool = True) -> tuple[list, list[str]]:
    a, b = RefFile(ours), RefFile(ref)
    names = sorted(b.names(), key=lambda n: (b.order(n), n))
    results, missing = [], []
    for name in names:
        if not a.has(name):
            missing.append(name)
            continue
        tier = tier_for(name, default_tier, overrides)
        ra, rb = a.tap_steps(name), b.tap_steps(name)
        if len(ra) != len(rb):
            from .compare import CompareResult

            r = CompareResult(name, tier.name, False, [], [], "")
            r.message = f"{name}: {len(ra)} recorded calls, reference has {len(rb)}"
            results.append(r)
            continue
        for i, (x, y) in enumerate(zip(ra, rb)):
            label = name if len(rb) == 1 else f"{name}[step {i}]"
            results.append(compare(label, x.float() if x.is_floating_point() else x,
                                   y.float() if y.is_floating_point() else y, tier))
    a.close()
    b.close()
    return results, missing if include_missing else []


def main_compare(ours: str, ref: str, default_tier: str, overrides: list[str], out: str | None) -> int:
    ov = dict(o.split("=", 1) for o in overrides)
    results, missing = compare_files(Path(ours), Path(ref), default_tier, ov)
    rows = [[r.name, "pass" if r else "FAIL", r.tier, f"{r.max_abs:.3g}", f"{r.cosine:.6f}", f"{r.needed_atol:.3g}"]
            for r in results]
    print(tabulate(rows, headers=["tap", "status", "tier", "max_abs", "cosine", "needed atol"], tablefmt="github"))
    first = next((r for r in results if not r), None)
    print(f"\n{sum(bool(r) for r in results)}/{len(results)} comparisons pass; {len(missing)} reference taps "
          f"absent from {ours}" + (f" (first: {missing[0]})" if missing else ""))
    if first:
        print(f"first divergence (upstream execution order): {first.message}")
    if out:
        Path(out).write_text(json.dumps({"results": [r.to_json() for r in results], "missing": missing}, indent=1))
    return 0 if first is None and not missing and results else 1
