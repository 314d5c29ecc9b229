"""The "Mutation score (generated mutants)" section of VALIDATION.md: ``reports/mutation-score.json`` as recorded by
``python -m parity_tests.mutants run`` (parity_tests/mutants.py), shown as recorded and never re-run here.

The score is caught ÷ non-equivalent (a timeout counts as caught; an equivalent mutant is a survivor listed in
``reports/mutation-survivors.json`` with its reason; a survivor killed by a row added for it says so). The recorded run gets the freshness flag the other recorded
sections get, over what it measures: ``impl/`` (the mutated code), the tests and the conftest (what judged it).
A file that cannot be read is shown in one line naming the file and the key at fault.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .perf import REPORTS
from .results import freshness

FILE = "mutation-score.json"
MEASURED = ("impl", "parity_tests", "conftest.py")
TARGET = 0.95  # issue 18: at least 95 % of the non-equivalent mutants caught
HEADERS = ["#", "mutant (file:line)", "operator", "change", "tests run", "outcome", "first failing test",
           "first red parity row (when that test recorded one)"]


def _cell(s: Any) -> str:
    return str(s or "").replace("|", "\\|")


def mutation_score_section(folder: Path | None = None, root: Path | None = None) -> list[str]:
    f = (folder or REPORTS) / FILE
    if not f.exists():
        return []
    lines = ["## Mutation score (generated mutants)", ""]
    try:
        data = json.loads(f.read_text())
        s, muts, pop, prov = data["summary"], data["mutants"], data["population"], data["provenance"]
        if not isinstance(muts, list):
            raise TypeError("'mutants' is not a list")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        return lines + [f"- ⚠️ `{f.name}`: unreadable ({type(e).__name__}: {e}); not shown", ""]
    caught = s["caught"] + s["timeout"]
    score = s.get("score")
    verdict = "n/a" if score is None else ("meets" if score >= TARGET else "**misses**")
    per_op = ", ".join(f"{op} {v['executed']}/{v['all']}" for op, v in pop.get("per_operator", {}).items())
    lines += [
        f"Mutants nobody picked: `python -m parity_tests.mutants` enumerates every site of five operators over "
        f"`impl/` (numeric literal ±1 or ×10/÷10, comparison flipped, slice bound ±1, padding mode swapped, dtype "
        f"cast dropped; messages and annotations aside), keeps those on lines the default suite executes, and draws "
        f"**{s['total']}** of them at random (seed `{data.get('seed')}`). Each ran in a scratch clone against the "
        f"tests that executed its lines (per-test coverage), stopping at the first failure.", "",
        f"**Score: {caught} of {s['non_equivalent']} non-equivalent mutants caught = "
        f"{'n/a' if score is None else f'{100 * score:.1f} %'}** ({verdict} the {100 * TARGET:.0f} % target); "
        f"{s['equivalent']} equivalent (reason given per mutant), {s['survived']} survived, {s['timeout']} caught by "
        f"timeout, {s['error']} tool errors.", "",
        f"- Population: {pop.get('mutants')} mutants in {len(pop.get('files', []))} files, {pop.get('executed')} on "
        f"executed lines (executed/all per operator: {per_op}). Not mutated: "
        + "; ".join(f"`{k}`: {v}" for k, v in (pop.get("excluded") or {}).items()) + ".",
    ]
    if not data.get("complete", True):
        lines.append(f"- **⚠️ Incomplete:** the run stopped after {s['total']} of {data.get('n')} mutants.")
    sha = str(prov.get("git") or "")
    fr = freshness(sha.removesuffix("+dirty"), str(prov.get("date_utc", "")), paths=MEASURED,
                   **({"root": root} if root else {}))
    lines.append(f"- Recorded {prov.get('date_utc', '?')} at `{sha[:10]}{'+dirty' if sha.endswith('+dirty') else ''}`"
                 f", {prov.get('cores', '?')} cores, load average {prov.get('load_average_1m', '?')}, torch "
                 f"{prov.get('torch', '?')}: `{prov.get('command', '?')}`")
    shas = Counter(str(m.get("git", sha))[:10] for m in muts)
    if len(shas) > 1:
        lines.append("- Mutants ran at more than one commit (survivors rerun with `--only` after a row was added for "
                     "them): " + ", ".join(f"{n} at `{k}`" for k, n in shas.items()))
    if fr.stale:
        lines.append(f"- **⚠️ Possibly stale:** {fr.stale}")
    lines.append("")
    rows = []
    for i, m in enumerate(muts, 1):
        out = m.get("outcome", "?")
        if out == "equivalent":
            out = f"equivalent: {m.get('note', '')}"
        elif out == "survived":
            out = "**survived**"
        elif m.get("killed_by"):
            out = f"{out} (by a row added for it: {', '.join(m['killed_by'])})"
        rows.append([i, f"`{m.get('file')}:{m.get('line')}`", m.get("op"), _cell(m.get("change")), m.get("tests"),
                     _cell(out), f"`{m['first_failed']}`" if m.get("first_failed") else "",
                     _cell(m.get("first_red_row"))])
    lines += [tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True), ""]
    return lines
