"""Render ``results.json`` into ``VALIDATION.md``, a compact ``summary.json`` and plots.

Only formats the typed results of ``reports.results``; every number in the output comes from the run that wrote
results.json. The main results must carry the hash of the code in this working tree (``check_fresh``): stale
results are refused with one line, never re-rendered as if they were current. Recorded sections (the opt-in
released-size runs, ``--also``) are shown as what they are: recorded at a commit on a date, not re-run, and flagged
when the code they measure changed after that commit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tabulate import tabulate

from impl.outfile import atomic_path, check_folder, check_free_space, check_output, write_text

from .bad_input import bad_input_section, faults_section
from .capture_perf import capture_perf_section
from .compare import TIERS
from .mutation_score import mutation_score_section
from .perf import performance_section
from .results import (
    ROOT,
    ResultsError,
    RowResult,
    RunResults,
    check_fresh,
    freshness,
    load,
    marker_not_run,
    read_json,
)

PLOT = "plots/max_abs.png"  # relative to VALIDATION.md
# provenance keys that make two runs the same kind of run (so a baseline row missing from one is a vanished row)
SAME_RUN = ("preset", "checkpoint", "device", "dtype", "attn", "markexpr")


def _diff(g: RowResult) -> str:
    """The row's worst difference; "n/a" when none of its comparisons measured one."""
    x = g.max_abs
    if x is None:
        return "n/a"
    if x == 0:
        return "0 (bit-exact)"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2e}"


def _provenance(run: RunResults, source: str) -> list[str]:
    prov, summ = run.provenance, run.summary
    v = prov.get("versions", {})
    presets = run.presets
    rows = [
        ("results", f"`{source}`, created {run.created}"), ("harness git sha", prov.get("git_sha", "")),
        ("code hash", run.code_hash or "(not recorded)"),
        ("qwen-tts / transformers / torch", f"{v.get('qwen-tts', '?')} / {v.get('transformers', '?')} / {v.get('torch', '?')}"),
        ("preset / checkpoint", f"{', '.join(presets)} / {prov.get('checkpoint') or 'synthetic'}"),
        ("device / dtype / attention (impl)", f"{prov.get('device')} / {prov.get('dtype')} / {prov.get('attn')}"),
        ("machine", f"{prov.get('machine')}, {prov.get('cpus')} CPUs, Python {prov.get('python')}"),
        ("pytest selection", prov.get("markexpr") or "(default)"),
        ("tests", f"{summ['passed']} passed, {summ['failed']} failed, {summ.get('errors', 0)} errors, "
                  f"{summ['skipped']} skipped of {summ['collected']} collected in {summ.get('duration_s', '?')} s"
                  + (f" (summed over {len(prov['shards'])} shards)" if prov.get("shards") else "")),
        ("comparisons", f"{len(run.records)} tensor/code comparisons in {len(run.rows())} rows"),
    ]
    if (mem := memory_line(prov.get("memory"))):
        rows.append(("peak memory", mem))
    rows += _spread(prov)
    return [tabulate(rows, headers=["", ""], tablefmt="github"), ""]


def memory_line(mem: Any) -> str:
    """The provenance's memory record in words: the pytest processes' peak RSS against the weights of the largest
    checkpoint the run used, and the upstream captures run in child processes."""
    if not isinstance(mem, dict) or not mem.get("peak_rss_gb"):
        return ""
    out = f"pytest {mem['peak_rss_gb']:.2f} GB peak RSS"
    if mem.get("weights_gb"):
        out += (f" = {mem.get('peak_over_weights', 0):.2f}× the weights of the largest checkpoint used "
                f"({mem['weights_gb']:.2f} GB)")
    if mem.get("peak_rss_test"):
        out += f", reached in `{mem['peak_rss_test']}`"
    if mem.get("capture_children"):
        out += (f"; upstream references captured in {mem['capture_children']} child processes, peak "
                f"{mem['capture_children_peak_rss_gb']:.2f} GB, {mem['capture_children_wall_s']:.0f} s in all")
    return out


def _spread(prov: dict) -> list[tuple[str, str]]:
    """How the run was spread over processes and machines: xdist workers, the shard a file is, or one line per
    shard of a merged run (``python -m reports merge``), each with its own machine, device, sha and wall time."""
    out = []
    if prov.get("workers"):
        out.append(("processes", f"pytest-xdist, {prov['workers']} workers"))
    if isinstance(prov.get("shard"), dict):
        out.append(("shard", f"{prov['shard'].get('group')}/{prov['shard'].get('splits')} (pytest --splits)"))
    for s in prov.get("shards") or []:
        dev = f"{s.get('device')} / {s.get('dtype')}"
        out.append((f"shard {s.get('group')}/{s.get('splits')}",
                    f"`{s.get('source')}`, created {s.get('created')}, git {short_sha(str(s.get('git_sha', '')))}, "
                    f"code {s.get('code_hash')}; {_on_what(s)}, {dev}"
                    f"{', ' + str(s['workers']) + ' xdist workers' if s.get('workers') else ''}; "
                    f"{s.get('passed')} passed, {s.get('failed')} failed, {s.get('errors', 0)} errors, "
                    f"{s.get('skipped')} skipped of {s.get('collected')} in {s.get('duration_s', '?')} s"
                    + (f"; {mem}" if (mem := memory_line(s.get("memory"))) else "")))
    return out


def short_sha(sha: str) -> str:
    """A commit shown short, keeping the ``+dirty`` mark (recorded from a tree that differed from the commit)."""
    commit = sha.removesuffix("+dirty")
    return (commit[:10] or "?") + ("+dirty" if sha.endswith("+dirty") else "")


def _notes(g: RowResult, default_preset: str) -> str:
    w = g.worst
    notes = [f"{g.n} comparisons"]
    if g.variants:
        notes.append("variants: " + ", ".join(g.variants))
    if g.max_abs is None:
        notes.append("judged by: " + "; ".join(g.judged_by))
    if g.tests_failed:
        notes.append("test " + ", ".join(f"{t} {g.tests[t]}" for t in g.tests_failed))
    if g.n_failed:
        notes.append(f"{g.n_failed} failed; worst {w.name}: {w.message[:160]}")
    elif g.max_abs and math.isfinite(g.min_cosine):
        notes.append(f"min cosine {g.min_cosine:.8f}")
    if g.preset and g.preset != default_preset:
        notes.append(f"preset {g.preset}")
    notes += sorted(g.notes)
    return "; ".join(notes)


def _status_table(run: RunResults, missing: list[str] | None = None) -> list[str]:
    default_preset = str(run.provenance.get("preset", ""))
    table = []
    for g in run.rows():
        shape_bad = any(x.shape != x.ref_shape and x.ref_shape for x in g.results)
        diff = "shape ≠ ref" if shape_bad and not g.comparisons_passed else _diff(g)
        table.append([f"{g.component} · {g.row}", g.status, diff, g.compares, "/".join(g.tiers),
                      _notes(g, default_preset)])
    for key in missing or []:
        table.append([key.rsplit(" · ", 1)[0], "❌ missing", "n/a", "", "",
                      "in the baseline, not measured in this run (its test failed before recording, or was not run)"])
    return [tabulate(table, headers=["Component", "Status", "Max diff", "Compares", "Tier", "Notes"],
                     tablefmt="github"), ""]


def _tests_lists(run: RunResults) -> list[str]:
    lines: list[str] = []
    failed = [(t, o) for t, o in run.tests.items() if o not in ("passed", "skipped")]
    if failed:
        lines += [f"Failed or errored tests in `{run.source}`:", ""] + [f"- `{t}`: {o}" for t, o in failed] + [""]
    skipped = [t for t, o in run.tests.items() if o == "skipped"]
    if skipped:
        lines += [f"Skipped tests in `{run.source}`:", ""]
        lines += [f"- `{t}`: {run.skipped.get(t) or '(reason not recorded by this results file)'}" for t in skipped]
        lines += [""]
    return lines


def _device_kind(prov: dict) -> tuple[str, str]:
    dev = str(prov.get("device") or "cpu")
    return ("cuda" if dev.startswith("cuda") else dev), str(prov.get("dtype") or "float32")


def _on_what(prov: dict) -> str:
    """Where a run ran: the GPU with its driver, CUDA and TF32 flags, or the CPU."""
    info = prov.get("device_info") or {}
    if not info.get("gpu"):
        return f"{prov.get('machine') or 'CPU'}, {prov.get('cpus', '?')} CPUs"
    return (f"{info['gpu']} (driver {info.get('driver', '?')}, CUDA {info.get('cuda', '?')}, cuDNN "
            f"{info.get('cudnn', '?')}, torch {info.get('torch', '?')}, TF32 matmul "
            f"{'on' if info.get('tf32_matmul') else 'off'} / cuDNN {'on' if info.get('tf32_cudnn') else 'off'})")


def _section_header(run: RunResults, source: str, root: Path | None) -> list[str]:
    prov = run.provenance
    sha = str(prov.get("git_sha", ""))
    f = freshness(sha, run.created, root or ROOT)
    dev, dt = _device_kind(prov)
    what = "" if (dev, dt) == ("cpu", "float32") else f"{dev} {dt}, "
    lines = [f"## Recorded run: {what}preset {', '.join(run.presets)} ({prov.get('markexpr') or 'default selection'})",
             "", f"Recorded at `{short_sha(sha)}` on {run.created or '?'}, on {_on_what(prov)}; not re-run for this "
             f"report (from `{source}`)."]
    if f.stale:
        lines.append(f"**⚠️ Possibly stale:** recorded at `{short_sha(sha)}`, but {f.stale}; these rows measure "
                     f"the code as it was then.")
    if dev == "cuda" and (why := marker_not_run(run, "cuda")):
        lines.append(f"**⚠️ CUDA not shown:** {why}; this run is no evidence about CUDA.")
    return lines + [""]


# The device/dtype runs the report expects besides the CPU fp32 main run (issue: CUDA and bf16).
DEVICE_RUNS = (("cuda", "float32"), ("cuda", "bfloat16"))


def device_runs_section(sections: list[RunResults]) -> list[str]:
    """One line per expected CUDA run: where its recorded section is, or that it was not measured (never a pass)."""
    lines = ["## CUDA runs", "",
             "The whole default selection on a CUDA machine, ours and upstream on the same device "
             "(`./run.sh test --device cuda [--dtype bfloat16]`, which writes `reports/results-cuda*.json`; "
             "commit that file and it is rendered below as its own section).", ""]
    table = []
    for dev, dt in DEVICE_RUNS:
        got = [s for s in sections if _device_kind(s.provenance) == (dev, dt)]
        if not got:
            table.append([f"{dev} {dt}", "not measured on this machine", "no recorded results file"])
            continue
        for s in got:
            summ = s.summary
            # ✅ needs evidence: no failure and no red row, *and* rows measured and CUDA-marked tests that passed
            # (a run whose CUDA tests all skipped, or that recorded nothing, has shown nothing about CUDA).
            why = marker_not_run(s, "cuda") or ("" if s.records else "no comparisons recorded")
            if summ.get("failed", 0) or summ.get("errors", 0) or not all(g.ok for g in s.rows()):
                status = "❌"
            elif why:
                status = f"⚠️ not shown ({why}):"
            else:
                status = "✅"
            table.append([f"{dev} {dt}", f"{status} {summ.get('passed')} passed, {summ.get('failed')} failed, "
                          f"{summ.get('skipped')} skipped",
                          f"`{s.source}`, recorded at `{short_sha(str(s.provenance.get('git_sha', '')))}`, on "
                          f"{_on_what(s.provenance)}"])
    return lines + [tabulate(table, headers=["run", "outcome", "recorded"], tablefmt="github"), ""]


def missing_baseline_rows(run: RunResults, baseline: dict | None) -> list[str]:
    """Baseline rows of the main run that this run did not produce: a row that vanished is red, not absent."""
    if not baseline or not isinstance(baseline.get("rows"), dict):
        return []
    bp = baseline.get("provenance") or {}
    if any(bp.get(k) != run.provenance.get(k) for k in SAME_RUN):
        return []  # a different kind of run (preset, selection, device …): its rows are not this run's to miss
    now = {g.key for g in run.rows()}
    return [k for k in baseline["rows"] if k not in now]


def render_markdown(data: dict, source: str = "reports/results.json",
                    extra: list[tuple[str, dict]] | None = None, baseline: dict | None = None,
                    root: Path | None = None) -> str:
    """``data``: the main results (as JSON); ``extra``: recorded sections (source, JSON); ``baseline``: the
    committed baseline, whose rows missing from ``data`` are listed red."""
    run = RunResults.from_json(data, source)
    sections = [(src, RunResults.from_json(d, src)) for src, d in extra or []]
    lines = [
        "# VALIDATION: impl vs upstream qwen-tts",
        "",
        "Generated by `python -m reports render` from the results files named below; do not edit by hand.",
        "",
        "## Provenance",
        "",
    ]
    lines += _provenance(run, source)
    lines += ["## Status", ""]
    lines += _status_table(run, missing_baseline_rows(run, baseline))
    lines += ["A row is ✅ only when its comparisons passed *and* the tests that recorded them passed. "
              "**Compares** says what a row judges: *ours vs upstream* (impl against the upstream qwen-tts "
              "package on the same checkpoint), *ours vs ours* (self-consistency: streaming vs one-shot, "
              "incremental vs prefill; no claim about upstream), *ours vs a formula* or *ours vs librosa*. "
              "Mutation rows are deliberate bugs: ✅ caught means the row turned red as it must. "
              "**Max diff** is n/a where no numeric difference was measured (a functional check, a loader "
              "refusal); the notes say how such a row was judged.", ""]
    lines += [f"![worst difference per row (log scale)]({PLOT})", ""]
    lines += _tests_lists(run)
    lines += bad_input_section(data)  # the "Bad input" section (reports/bad_input.py)
    lines += faults_section(data)  # the "Faults" section beside it (the same module)
    lines += device_runs_section([sec for _, sec in sections])
    for src, sec in sections:
        lines += _section_header(sec, src, root)
        lines += _provenance(sec, src)
        lines += _status_table(sec)
        lines += _tests_lists(sec)
    lines += performance_section()  # recorded `python -m reference_export bench` files (reports/perf.py)
    lines += capture_perf_section()  # `python -m reference_export measure-capture` (reports/capture_perf.py)
    lines += mutation_score_section()  # `python -m parity_tests.mutants run` (reports/mutation_score.py)
    lines += ["## Tiers", ""]
    lines += [tabulate([[t.name, t.rtol if t.kind == "close" else "", t.atol if t.kind == "close" else "",
                         t.nmse if t.nmse else "", t.doc] for t in TIERS.values()],
                       headers=["tier", "rtol", "atol", "NMSE ≤", "meaning"], tablefmt="github"), ""]
    return "\n".join(lines)


def summary_json(run: RunResults) -> dict[str, Any]:
    return {
        "created": run.created, "code_hash": run.code_hash, "provenance": run.provenance, "summary": run.summary,
        "rows": [{"component": g.component, "row": g.row, "preset": g.preset, "status": g.status, "ok": g.ok,
                  "compares": g.compares, "expect_fail": g.expect_fail, "max_abs": g.max_abs,
                  "needed_atol": g.needed_atol, "tiers": g.tiers, "n": g.n} for g in run.rows()],
    }


def plot(run: RunResults, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in run.rows() if not g.expect_fail and g.max_abs is not None]
    if not groups:
        return None
    labels = [f"{g.component} · {g.row}"[:60] for g in groups]
    floor = 1e-12
    vals = [max(g.max_abs, floor) if math.isfinite(g.max_abs) else 1e3 for g in groups]
    # the tier's atol where the tier has one (close tiers); referee/exact/functional rows get no marker
    tol = [TIERS[g.tiers[0]].atol if TIERS[g.tiers[0]].kind == "close" else None for g in groups]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(groups) + 1.5))
    y = range(len(groups))
    ax.barh(y, vals, color=["tab:green" if g.ok else "tab:red" for g in groups])
    marks = [(t, i) for i, t in enumerate(tol) if t]
    ax.scatter([t for t, _ in marks], [i for _, i in marks], marker="|", color="k", s=120, label="tier atol")
    ax.set_xscale("log")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"max |ours − reference| (0 drawn at {floor:g}; rows without a numeric difference left out)")
    ax.set_title("Worst absolute difference per row")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out) as tmp:  # the temporary name keeps ".png": savefig picks the format from it
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out


def _shown(p: Path) -> str:
    """A path as the report shows it: relative to the working directory when inside it."""
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _load(results: Path, fresh: bool, root: Path | None = None) -> RunResults:
    try:
        run = load(results, _shown(results))
        if fresh:
            check_fresh(run, root or ROOT)
    except ResultsError as e:
        raise SystemExit(str(e)) from None
    if not run.records:
        raise SystemExit(f"{_shown(results)}: the run recorded no comparisons (pytest exit status "
                         f"{run.summary.get('exitstatus', '?')}); refusing to write an empty report")
    return run


def _baseline(path: Path | None) -> dict | None:
    if path is None or not path.exists():
        return None
    try:  # a binary or cut file is one line naming it (reports/results.py read_json)
        b = read_json(path, _shown(path), "baseline missing", "baseline is empty", "baseline is ")
    except ResultsError as e:
        raise SystemExit(str(e)) from None
    return b if isinstance(b, dict) else None


def check_outputs(out_md: Path) -> None:
    """Before any work: VALIDATION.md, summary.json beside it and the plots folder can be written (raises
    ``impl.outfile.OutputError``, one line naming the path)."""
    check_output(out_md)
    check_output(out_md.with_name("summary.json"))
    plots = (out_md.parent / PLOT).parent
    if plots.exists():
        check_folder(plots)


def render(results: Path, out_md: Path, also: list[Path] | None = None, baseline: Path | None = None,
           root: Path | None = None) -> list[Path]:
    """Render ``results`` (the main run; refused unless produced by this tree's code) plus ``also`` (recorded
    opt-in runs, e.g. released dimensions) as sections. ``baseline``: rows it has that this run lacks are red."""
    check_outputs(out_md)
    run = _load(results, fresh=True, root=root)
    sections = [(_shown(p), _load(p, fresh=False)) for p in also or []]
    written = []
    md = render_markdown(run.to_json(), run.source, [(s, r.to_json()) for s, r in sections], _baseline(baseline),
                         root=root)
    sj = out_md.with_name("summary.json")
    sj_text = json.dumps(summary_json(run), indent=1, default=str)
    # The size is known now: refuse a full disk before writing anything (the plot is a few hundred kB at most).
    check_free_space(out_md, len(md.encode()) + len(sj_text) + 1_000_000, "the report")
    # Each file is written atomically (impl/outfile.py): a failure keeps the old one byte for byte.
    write_text(out_md, md)
    written.append(out_md)
    write_text(sj, sj_text)
    written.append(sj)
    p = plot(run, out_md.parent / PLOT)
    if p:
        written.append(p)
    return written
