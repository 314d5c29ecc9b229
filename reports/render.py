"""Render ``results.json`` into ``VALIDATION.md``, a compact ``summary.json`` and plots.

Only formats ``CompareResult`` records; every number in the output comes from the run that wrote results.json.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .compare import TIERS


def _f(x: Any) -> float:
    if isinstance(x, str):
        return math.inf if "inf" in x else math.nan
    return float(x)


def group_rows(data: dict) -> list[dict]:
    """One entry per (component, row, preset): all variants and taps folded together."""
    groups: OrderedDict[tuple, dict] = OrderedDict()
    for r in data["rows"]:
        key = (r["component"], r["row"], r.get("preset", ""))
        g = groups.setdefault(key, {"component": r["component"], "row": r["row"], "preset": r.get("preset", ""),
                                    "tiers": [], "variants": [], "results": [], "notes": set()})
        g["results"].append(r["result"])
        if r["result"]["tier"] not in g["tiers"]:
            g["tiers"].append(r["result"]["tier"])
        if r["variant"] and r["variant"] not in g["variants"]:
            g["variants"].append(r["variant"])
        if r.get("notes"):
            g["notes"].add(r["notes"])
    out = []
    for g in groups.values():
        res = g["results"]
        # Mutation self-tests record the rows they must turn red, marked "expected to FAIL" in their notes.
        expect_fail = g["component"] == "Mutation self-test" or any("expected to FAIL" in n for n in g["notes"])
        passed = all(x["passed"] for x in res)
        worst = max(res, key=lambda x: _f(x["max_abs"]) if math.isfinite(_f(x["max_abs"])) else 1e300)
        g.update({
            "passed": passed, "n": len(res), "n_failed": sum(not x["passed"] for x in res),
            "max_abs": max(_f(x["max_abs"]) for x in res), "worst": worst,
            "min_cosine": min(_f(x.get("cosine", 1.0)) for x in res),
            "needed_atol": max(_f(x.get("needed_atol", 0.0)) for x in res),
            "expect_fail": expect_fail,
        })
        out.append(g)
    return out


def status(g: dict) -> str:
    if g["expect_fail"]:
        return "✅ caught" if not g["passed"] else "❌ NOT caught"
    return "✅ pass" if g["passed"] else "❌ FAIL"


def _diff(x: float) -> str:
    if x == 0:
        return "0 (bit-exact)"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2e}"


def _provenance(data: dict, source: str) -> list[str]:
    prov, summ = data["provenance"], data["summary"]
    v = prov.get("versions", {})
    rows = [
        ("results", f"`{source}`, created {data.get('created', '')}"), ("harness git sha", prov.get("git_sha", "")),
        ("qwen-tts / transformers / torch", f"{v.get('qwen-tts', '?')} / {v.get('transformers', '?')} / {v.get('torch', '?')}"),
        ("preset / checkpoint", f"{prov.get('preset')} / {prov.get('checkpoint') or 'synthetic'}"),
        ("device / dtype / attention (impl)", f"{prov.get('device')} / {prov.get('dtype')} / {prov.get('attn')}"),
        ("machine", f"{prov.get('machine')}, {prov.get('cpus')} CPUs, Python {prov.get('python')}"),
        ("pytest selection", prov.get("markexpr") or "(default)"),
        ("tests", f"{summ['passed']} passed, {summ['failed']} failed, {summ['skipped']} skipped "
                  f"of {summ['collected']} collected in {summ['duration_s']} s"),
        ("comparisons", f"{len(data['rows'])} tensor/code comparisons in {len(group_rows(data))} rows"),
    ]
    return [tabulate(rows, headers=["", ""], tablefmt="github"), ""]


def _status_table(data: dict) -> list[str]:
    prov = data["provenance"]
    table = []
    for g in group_rows(data):
        w = g["worst"]
        notes = [f"{g['n']} comparisons"]
        if g["variants"]:
            notes.append("variants: " + ", ".join(g["variants"]))
        if g["n_failed"]:
            notes.append(f"{g['n_failed']} failed; worst {w['name']}: {w['message'][:160]}")
        elif math.isfinite(g["min_cosine"]) and g["max_abs"] > 0:
            notes.append(f"min cosine {g['min_cosine']:.8f}")
        if g["preset"] and g["preset"] != prov.get("preset"):
            notes.append(f"preset {g['preset']}")
        notes += sorted(n.replace("expected to FAIL; ", "") for n in g["notes"] if n != "expected to FAIL")
        tier = "/".join(g["tiers"])
        shape_bad = any(x["shape"] != x["ref_shape"] and x["ref_shape"] for x in g["results"])
        diff = "shape ≠ ref" if shape_bad and not g["passed"] else _diff(g["max_abs"])
        table.append([g["component"] + " · " + g["row"], status(g), diff, tier, "; ".join(notes)])
    return [tabulate(table, headers=["Component", "Status", "Max diff", "Tier", "Notes"], tablefmt="github"), ""]


def render_markdown(data: dict, source: str = "reports/results.json",
                    extra: list[tuple[str, dict]] | None = None) -> str:
    lines = [
        "# VALIDATION: impl vs upstream qwen-tts",
        "",
        "Generated by `python -m reports render` from the results files named below; do not edit by hand.",
        "",
        "## Provenance",
        "",
    ]
    lines += _provenance(data, source)
    lines += ["## Status", ""]
    lines += _status_table(data)
    lines += ["Mutation rows are deliberate bugs: ✅ caught means the row turned red as it must.", ""]
    for src, d in extra or []:
        lines += [f"## Opt-in run: {d['provenance'].get('markexpr') or 'default'} "
                  f"(preset {sorted({r.get('preset') for r in d['rows']})})", ""]
        lines += _provenance(d, src)
        lines += _status_table(d)
    lines += ["## Tiers", ""]
    lines += [tabulate([[t.name, t.rtol if t.kind == "close" else "", t.atol if t.kind == "close" else "",
                         t.nmse if t.nmse else "", t.doc] for t in TIERS.values()],
                       headers=["tier", "rtol", "atol", "NMSE ≤", "meaning"], tablefmt="github"), ""]
    failed = [t for t, o in data["tests"].items() if o == "failed"]
    for _, d in extra or []:
        failed += [t for t, o in d["tests"].items() if o == "failed"]
    if failed:
        lines += ["## Failed tests", ""] + [f"- `{t}`" for t in failed] + [""]
    return "\n".join(lines)


def summary_json(data: dict) -> dict:
    return {
        "created": data.get("created"), "provenance": data["provenance"], "summary": data["summary"],
        "rows": [{"component": g["component"], "row": g["row"], "preset": g["preset"], "status": status(g),
                  "passed": g["passed"], "expect_fail": g["expect_fail"], "max_abs": g["max_abs"],
                  "needed_atol": g["needed_atol"], "tiers": g["tiers"], "n": g["n"]} for g in group_rows(data)],
    }


def plot(data: dict, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in group_rows(data) if not g["expect_fail"]]
    if not groups:
        return None
    labels = [f"{g['component']} · {g['row']}"[:60] for g in groups]
    floor = 1e-12
    vals = [max(g["max_abs"], floor) if math.isfinite(g["max_abs"]) else 1e3 for g in groups]
    # the tier's atol where the tier has one (close tiers); referee/exact/functional rows get no marker
    tol = [TIERS[g["tiers"][0]].atol if TIERS[g["tiers"][0]].kind == "close" else None for g in groups]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(groups) + 1.5))
    y = range(len(groups))
    ax.barh(y, vals, color=["tab:green" if g["passed"] else "tab:red" for g in groups])
    marks = [(t, i) for i, t in enumerate(tol) if t]
    ax.scatter([t for t, _ in marks], [i for _, i in marks], marker="|", color="k", s=120, label="tier atol")
    ax.set_xscale("log")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"max |ours − upstream| (0 drawn at {floor:g})")
    ax.set_title("Parity: worst absolute difference per row")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _shown(p: Path) -> str:
    """A path as the report shows it: relative to the working directory when inside it."""
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _load(results: Path) -> dict:
    try:
        data = json.loads(results.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{results}: no results (run the parity suite first: ./run.sh report)") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"{results}: not valid JSON ({e})") from None
    if not data.get("rows"):
        raise SystemExit(f"{results}: the run recorded no comparisons; refusing to write an empty report")
    return data


def render(results: Path, out_md: Path, also: list[Path] | None = None) -> list[Path]:
    """Render ``results`` (the main run) plus ``also`` (opt-in runs, e.g. released dimensions) as sections."""
    data = _load(results)
    extra = [(_shown(p), _load(p)) for p in also or []]
    written = []
    out_md.write_text(render_markdown(data, _shown(results), extra))
    written.append(out_md)
    sj = out_md.with_name("summary.json")
    sj.write_text(json.dumps(summary_json(data), indent=1, default=str))
    written.append(sj)
    p = plot(data, out_md.parent / "plots" / "max_abs.png")
    if p:
        written.append(p)
    return written
