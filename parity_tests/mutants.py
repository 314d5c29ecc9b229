"""Generated mutants of ``impl/`` and the suite's mutation score: mutations nobody picked (issue 18, item 6).

    python -m parity_tests.mutants coverage                      # per-test line coverage of impl/ (once)
    python -m parity_tests.mutants sites                         # the population, per operator and file
    python -m parity_tests.mutants run --n 48 --seed 20261207 --json reports/mutation-score.json [--only ID …] [--resume]

The hand-written mutation self-tests (``test_mutations_*.py``) measure what their author thought of. Here a small
AST mutator enumerates every mutation site of a fixed set of operators over ``impl/``:

- ``num``: a numeric literal, an int ``±1``, a float ``×10`` / ``÷10``;
- ``cmp``: a comparison flipped (``<``↔``<=``, ``>``↔``>=``, ``==``↔``!=``);
- ``slice``: a slice bound ``±1``;
- ``pad``: a padding mode swapped (``constant``→``reflect``→``replicate``→``constant``, ``zeros``→``reflect``);
- ``cast``: a dtype cast dropped (``.float()``, ``.double()``, ``.to(<dtype>)``, ``.type_as(x)``, ``dtype=`` of a
  call).

Not mutated: messages (``raise``, ``assert``, f-strings, ``print``/``warn``/``write`` calls), annotations, and two
files: ``impl/config.py`` and ``impl/presets/`` (the synthetic checkpoints are built from them, so a mutant there
changes the fixture both sides load, not only ours). Only lines the default suite executes are mutated (per-test
coverage, ``coverage``): code no CPU test runs, CUDA paths mostly, cannot be judged here and is counted in the
population as such. Mutants whose source equals another's are dropped.

A random sample of ``--n`` mutants is drawn with ``--seed`` (``random.Random``) and each is run in a scratch clone of
this repository (``git clone``, so nothing here is touched; the cache of checkpoints and references is shared: no
mutated file feeds either) against the tests that executed its lines (the whole file's tests for a line only
executed at import), ``-x``, with a timeout of five times those tests' durations in the coverage run plus five minutes. A
mutant is **caught** when a test fails or errors (or the run times out: a hang turns CI red too), **survived**
otherwise. A survivor listed under ``equivalent`` in ``reports/mutation-survivors.json`` with a reason is
**equivalent** (no observable change); one listed under ``killed`` names the tests added to catch it after it first
survived (rerun with ``--only ID``). The score is caught ÷ (total − equivalent). Results go to ``--json`` (atomic), rendered into VALIDATION.md
by ``reports/mutation_score.py``: per mutant the operator, the change, the outcome, the first failing test and the
first red parity row.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("QWEN3TTS_MUTANTS_DIR", "/tmp/qwen3tts-mutants"))
COVERAGE_FILE = WORK / "coverage.sqlite"
COVERAGE_RESULTS = WORK / "coverage-results.json"
SURVIVORS = ROOT / "reports" / "mutation-survivors.json"  # {"equivalent": {id: why}, "killed": {id: [tests]}}
EXCLUDED = {"impl/config.py": "the synthetic checkpoints are built from it (a mutant changes both sides' fixture)",
            "impl/presets": "the synthetic checkpoints are built from them (a mutant changes both sides' fixture)"}
OPERATORS = ("num", "cmp", "slice", "pad", "cast")
CMP_FLIP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
PAD_SWAP = {"constant": "reflect", "reflect": "replicate", "replicate": "constant", "zeros": "reflect",
            "circular": "constant"}
CASTS = {"float", "double", "half", "bfloat16"}
DTYPE_NAMES = {"float32", "float64", "float16", "bfloat16", "float", "double", "half", "long", "int64", "int32"}
QUIET_CALLS = {"print", "warn", "warning", "write", "info", "debug", "error", "set_description", "set_postfix"}


@dataclass(frozen=True)
class Mutant:
    file: str  # relative to the repository root
    line: int
    end_line: int
    col: int
    op: str
    change: str  # "`a` → `b`"
    start: int  # byte offsets of the replaced span in the file
    end: int
    new: str

    def applied(self, raw: bytes) -> bytes:
        """``raw`` (the file's bytes) with this mutant's span replaced."""
        return raw[:self.start] + self.new.encode() + raw[self.end:]

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}:{self.col}:{self.op}:{_short(self.new)}"


def _short(s: str) -> str:
    return re.sub(r"\s+", " ", s)[:40]


# ---------------------------------------------------------------------------------------------- enumerate sites


def population_files(root: Path = ROOT) -> list[str]:
    out = []
    for p in sorted((root / "impl").rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if not any(rel == e or rel.startswith(e + "/") for e in EXCLUDED):
            out.append(rel)
    return out


def _is_dtype_expr(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr in DTYPE_NAMES or node.attr.endswith("dtype")
    if isinstance(node, ast.Name):
        return node.id.endswith("dtype") or node.id in DTYPE_NAMES
    return False


class _Sites(ast.NodeVisitor):
    """Every mutant of one module's source, as byte spans to replace."""

    def __init__(self, rel: str, src: str):
        self.rel, self.src = rel, src
        self.lines = src.encode().splitlines(keepends=True)
        self.starts = [0]
        for ln in self.lines:
            self.starts.append(self.starts[-1] + len(ln))
        self.out: list[Mutant] = []
        self.quiet = 0  # > 0 inside messages and annotations

    def _span(self, node: ast.AST) -> tuple[int, int]:
        return (self.starts[node.lineno - 1] + node.col_offset, self.starts[node.end_lineno - 1] + node.end_col_offset)

    def _text(self, node: ast.AST) -> str:
        a, b = self._span(node)
        return self.src.encode()[a:b].decode()

    def _add(self, node: ast.AST, op: str, new: str, at: ast.AST | None = None) -> None:
        at = at or node
        a, b = self._span(at)
        old = self._text(at)
        if new == old:
            return
        self.out.append(Mutant(self.rel, at.lineno, at.end_lineno, at.col_offset, op,
                               f"`{_short(old)}` → `{_short(new)}`", a, b, new))

    def _quietly(self, *nodes: ast.AST | None) -> None:
        self.quiet += 1
        for n in nodes:
            if n is not None:
                self.visit(n)
        self.quiet -= 1

    # messages and annotations are not mutated
    def visit_Raise(self, node: ast.Raise) -> None:
        self._quietly(node.exc, node.cause)

    def visit_Assert(self, node: ast.Assert) -> None:
        self._quietly(node.test, node.msg)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        self._quietly(*node.values)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._quietly(node.annotation)
        if node.value is not None:
            self.visit(node.value)

    def visit_arg(self, node: ast.arg) -> None:
        self._quietly(node.annotation)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._quietly(node.returns)
        self.visit(node.args)
        for d in node.decorator_list:
            self.visit(d)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            body = body[1:]  # the docstring
        for s in body:
            self.visit(s)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if name in QUIET_CALLS:
            return self._quietly(*node.args, *[k.value for k in node.keywords])
        if not self.quiet and isinstance(f, ast.Attribute):
            recv = self._text(f.value)
            if name in CASTS and not node.args and not node.keywords:
                self._add(node, "cast", f"({recv})")
            elif name == "to" and node.args and _is_dtype_expr(node.args[0]) and len(node.args) == 1 \
                    and not node.keywords:
                self._add(node, "cast", f"({recv})")
            elif name == "to" and not node.args and [k.arg for k in node.keywords] == ["dtype"]:
                self._add(node, "cast", f"({recv})")
            elif name == "type_as" and len(node.args) == 1:
                self._add(node, "cast", f"({recv})")
        if not self.quiet:
            for k in node.keywords:
                if k.arg == "dtype" and _is_dtype_expr(k.value) and not (isinstance(f, ast.Attribute) and f.attr == "to"):
                    args = [self._text(a) for a in node.args] + [
                        (f"{kk.arg}={self._text(kk.value)}" if kk.arg else f"**{self._text(kk.value)}")
                        for kk in node.keywords if kk is not k]
                    self._add(node, "cast", f"{self._text(f)}({', '.join(args)})")
            for a in [*node.args, *[k.value for k in node.keywords if k.arg in ("mode", "padding_mode")]]:
                if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value in PAD_SWAP:
                    self._add(a, "pad", repr(PAD_SWAP[a.value]))
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        if not self.quiet:
            for i, o in enumerate(node.ops):
                if type(o) in CMP_FLIP:
                    ops = list(node.ops)
                    ops[i] = CMP_FLIP[type(o)]()
                    parts = [self._text(node.left)]
                    for oo, c in zip(ops, node.comparators):
                        parts += [_OP_TEXT[type(oo)], self._text(c)]
                    self._add(node, "cmp", "(" + " ".join(parts) + ")")
        self.generic_visit(node)

    def visit_Slice(self, node: ast.Slice) -> None:
        if not self.quiet:
            for b in (node.lower, node.upper):
                if b is not None:
                    t = self._text(b)
                    self._add(b, "slice", f"({t}) + 1")
                    self._add(b, "slice", f"({t}) - 1")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        v = node.value
        if self.quiet or isinstance(v, bool) or not isinstance(v, (int, float)):
            return
        if isinstance(v, int):
            for w in (v + 1, v - 1):
                self._add(node, "num", f"({w})")
        else:
            d = Decimal(repr(v))  # decimal ×10 / ÷10: 1e-6 × 10 is 1e-05, not 9.999999999999999e-06
            for w in ((float(d * 10), float(d / 10)) if v else (1.0,)):
                self._add(node, "num", f"({w!r})")


_OP_TEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


def module_docstring_lines(tree: ast.Module) -> set[int]:
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        return set(range(body[0].lineno, body[0].end_lineno + 1))
    return set()


def mutants_of(rel: str, root: Path = ROOT) -> list[Mutant]:
    """Every mutant of ``rel`` (deduplicated by resulting source; each one compiles)."""
    return list(_mutants_of_source(rel, (root / rel).read_text()))


@functools.lru_cache(maxsize=256)
def _mutants_of_source(rel: str, src: str) -> tuple[Mutant, ...]:
    tree = ast.parse(src)
    v = _Sites(rel, src)
    for node in tree.body:
        if node.lineno in module_docstring_lines(tree):
            continue
        v.visit(node)
    seen, out = set(), []
    raw = src.encode()
    for m in v.out:
        new_src = m.applied(raw)
        if new_src in seen or new_src == raw:
            continue
        try:
            compile(new_src, rel, "exec")
        except SyntaxError:
            continue
        seen.add(new_src)
        out.append(m)
    return tuple(out)


@contextlib.contextmanager
def mutated(m: Mutant, root: Path) -> Iterator[None]:
    """``m`` applied to its file under ``root`` (a scratch clone) for the block; the file's bytes are restored after."""
    p = root / m.file
    raw = p.read_bytes()
    p.write_bytes(m.applied(raw))
    try:
        yield
    finally:
        p.write_bytes(raw)


# ---------------------------------------------------------------------------------------------- coverage


def run_coverage(workers: str = "2") -> None:
    """The default suite once under per-test line coverage of ``impl/`` (in a scratch clone; its results file, with
    each test's outcome and duration, is kept for the timeouts)."""
    clone = _clone(WORK / "coverage-clone")
    env = {**os.environ, "COVERAGE_FILE": str(COVERAGE_FILE), "QWEN3TTS_CACHE": _cache()}
    cmd = [sys.executable, "-m", "pytest", "parity_tests", "-q", "-p", "no:cacheprovider", "--cov=impl",
           "--cov-context=test", "--cov-report=", f"--results={COVERAGE_RESULTS}"]
    if workers != "0":
        cmd += ["-n", workers]
    rc = subprocess.call(cmd, cwd=clone, env=env)
    if rc != 0:
        raise SystemExit(f"coverage run: pytest exited {rc}; the unmutated suite must pass before mutants mean anything")


def load_coverage(path: Path = COVERAGE_FILE) -> dict[str, dict[int, set[str]]]:
    """``{relative impl file: {line: {test node ids}}}``; the empty context (import time) is kept as ``""``."""
    import coverage

    data = coverage.CoverageData(basename=str(path))
    data.read()
    out: dict[str, dict[int, set[str]]] = {}
    for f in data.measured_files():
        m = re.search(r"(impl/.*\.py)$", f.replace(os.sep, "/"))
        if not m:
            continue
        lines: dict[int, set[str]] = {}
        for ln, ctxs in (data.contexts_by_lineno(f) or {}).items():
            lines[ln] = {c.split("|", 1)[0] for c in ctxs}
        out[m.group(1)] = lines
    return out


def select_tests(m: Mutant, cov: dict[str, dict[int, set[str]]]) -> tuple[list[str], str]:
    """The tests that executed the mutant's lines; for lines run only at import, every test that ran the file."""
    lines = cov.get(m.file, {})
    tests: set[str] = set()
    for ln in range(m.line, m.end_line + 1):
        tests |= lines.get(ln, set())
    named = {t for t in tests if t}
    if named:
        return sorted(named), "line"
    if "" in tests:
        return sorted({t for s in lines.values() for t in s if t}), "file (line runs at import)"
    return [], "not executed"


# ---------------------------------------------------------------------------------------------- run


def _cache() -> str:
    return os.environ.get("QWEN3TTS_CACHE", str(ROOT / ".cache"))


def _clone(dest: Path) -> Path:
    """A scratch clone of this repository at HEAD plus its uncommitted tracked changes, sharing ``.venv``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=ROOT, capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "apply", "--whitespace=nowarn", "-"], cwd=dest, input=diff, check=True)
    if (ROOT / ".venv").exists():
        (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


@dataclass
class Outcome:
    id: str
    file: str
    line: int
    op: str
    change: str
    selection: str
    tests: int
    outcome: str = ""  # caught | survived | equivalent | timeout | not executed | error
    first_failed: str = ""
    first_red_row: str = ""
    wall_s: float = 0.0
    note: str = ""
    killed_by: list[str] = field(default_factory=list)


def _order(tests: list[str], collection: list[str]) -> list[str]:
    pos = {t: i for i, t in enumerate(collection)}
    return sorted(tests, key=lambda t: pos.get(t, len(pos)))


def run_one(m: Mutant, clone: Path, tests: list[str], timeout: float) -> dict[str, Any]:
    results = clone / ".mutant-results.json"
    results.unlink(missing_ok=True)
    t0 = time.monotonic()
    env = {**os.environ, "QWEN3TTS_CACHE": _cache(), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--results={results}", *tests]
    with mutated(m, clone):
        try:
            proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = -1, e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    wall = time.monotonic() - t0
    first_failed, first_red = "", ""
    if results.exists():
        try:
            r = json.loads(results.read_text())
            first_failed = next((t for t, o in r.get("tests", {}).items() if o in ("failed", "error")), "")
            for row in r.get("rows", []):
                if not row["result"].get("passed", True) and not row.get("expect_fail"):
                    first_red = f"{row['component']} / {row['row']}: {row['result'].get('name', '')}"
                    break
        except (ValueError, KeyError, TypeError):
            pass
    if not first_failed:
        hit = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
        first_failed = hit.group(1) if hit else ""
    outcome = {0: "survived", 1: "caught", 2: "caught", 3: "caught", -1: "timeout"}.get(rc, "error")
    if outcome == "caught" and not first_failed:  # no test ran to fail: collection or the session itself stopped
        err = [ln for ln in out.splitlines() if re.match(r"^(E\s+\w+(Error|Exit|Exception)|ERROR )", ln)]
        first_failed = f"(no test ran: pytest exit {rc}; {(err or out.strip().splitlines()[-1:] or ['?'])[0].strip()})"
    tail = "" if outcome in ("survived", "caught", "timeout") else out.strip().splitlines()[-1:]
    return {"outcome": outcome, "rc": rc, "first_failed": first_failed, "first_red_row": first_red,
            "wall_s": round(wall, 1), "note": " ".join(tail) if tail else ""}


def sample(seed: int, n: int, cov: dict[str, dict[int, set[str]]]) -> tuple[list[Mutant], dict[str, Any]]:
    every = [m for f in population_files() for m in mutants_of(f)]
    executed = [m for m in every if select_tests(m, cov)[1] != "not executed"]
    per_op = {op: {"all": sum(m.op == op for m in every), "executed": sum(m.op == op for m in executed)}
              for op in OPERATORS}
    pop = {"files": population_files(), "excluded": EXCLUDED, "mutants": len(every), "executed": len(executed),
           "per_operator": per_op}
    rng = random.Random(seed)
    return rng.sample(executed, min(n, len(executed))), pop


def _provenance(cmd: list[str]) -> dict[str, Any]:
    import platform
    from datetime import UTC, datetime

    import torch

    from reference_export.export import git_sha

    return {"git": git_sha(), "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": platform.machine(), "cores": os.cpu_count(), "torch": str(torch.__version__),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "command": " ".join(["python -m parity_tests.mutants", *cmd])}


def summarize(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    c = {k: sum(o["outcome"] == k for o in outcomes) for k in
         ("caught", "timeout", "survived", "equivalent", "error")}
    judged = len(outcomes) - c["equivalent"] - c["error"]
    caught = c["caught"] + c["timeout"]
    return {"total": len(outcomes), **c, "non_equivalent": judged, "score": round(caught / judged, 4) if judged else None}


def _write(a: argparse.Namespace, argv: list[str], pop: dict[str, Any], outcomes: list[dict[str, Any]],
           equivalent: dict[str, str], killed: dict[str, list[str]], complete: bool) -> dict[str, Any]:
    from impl.outfile import write_text

    for o in outcomes:  # the committed notes on survivors, applied to new and kept outcomes alike
        if o["outcome"] in ("survived", "equivalent"):
            o["outcome"], o["note"] = ("equivalent", str(equivalent[o["id"]])) if o["id"] in equivalent else \
                ("survived", "")
        o["killed_by"] = list(killed.get(o["id"], [])) if o["outcome"] in ("caught", "timeout") else []
    prov = _provenance(argv)
    for o in outcomes:
        o.setdefault("git", prov["git"])  # the code each mutant ran against (a rerun with --only moves it)
    data = {"description": "generated mutants of impl/ run against the default suite (parity_tests/mutants.py)",
            "seed": a.seed, "n": a.n, "complete": complete, "population": pop, "provenance": prov,
            "earlier_runs": a.earlier_runs, "summary": summarize(outcomes), "mutants": outcomes}
    write_text(a.json, json.dumps(data, indent=1) + "\n")
    return data


def cmd_run(a: argparse.Namespace, argv: list[str]) -> int:
    from impl.outfile import check_output

    check_output(a.json)
    if not COVERAGE_FILE.exists():
        raise SystemExit(f"{COVERAGE_FILE}: no coverage data; run `python -m parity_tests.mutants coverage` first")
    cov = load_coverage()
    cov_results = json.loads(COVERAGE_RESULTS.read_text())
    durations = {k: float(v) for k, v in (cov_results.get("durations") or {}).items()}
    collection = list(cov_results.get("tests", {}))
    picked, pop = sample(a.seed, a.n, cov)
    notes = json.loads(SURVIVORS.read_text()) if SURVIVORS.exists() else {}
    equivalent, killed = notes.get("equivalent", {}), notes.get("killed", {})
    prior: dict[str, dict[str, Any]] = {}
    a.earlier_runs = []
    if (a.only or a.resume) and Path(a.json).exists():
        old = json.loads(Path(a.json).read_text())
        if old.get("seed") != a.seed:
            raise SystemExit(f"{a.json}: recorded with --seed {old.get('seed')}, not {a.seed}; nothing to reuse")
        prior = {o["id"]: o for o in old.get("mutants", [])}
        for o in prior.values():
            o.setdefault("git", old.get("provenance", {}).get("git", "?"))
        a.earlier_runs = [*old.get("earlier_runs", []), old.get("provenance", {})]
    clone = _clone(WORK / "mutant-clone")
    git_now = _provenance(argv)["git"]
    outcomes = []
    for i, m in enumerate(picked):
        tests, how = select_tests(m, cov)
        if m.id in prior and ((a.only and m.id not in a.only) or (a.resume and not a.only)):
            outcomes.append(prior[m.id])
            continue
        # tests added after the coverage run to kill this mutant (reports/mutation-survivors.json) run too, first
        added = [t for t in killed.get(m.id, []) if t not in tests]
        tests = added + _order(tests, collection)
        timeout = 5 * sum(durations.get(t, 5.0) for t in tests) + 300
        print(f"[{i + 1}/{len(picked)}] {m.id} {m.change} ({len(tests)} tests, timeout {timeout:.0f} s)",
              file=sys.stderr, flush=True)
        o = Outcome(m.id, m.file, m.line, m.op, m.change, how, len(tests))
        r = run_one(m, clone, tests, timeout)
        o.outcome, o.first_failed, o.first_red_row, o.wall_s, o.note = (
            r["outcome"], r["first_failed"], r["first_red_row"], r["wall_s"], r["note"])
        print(f"    {o.outcome} {o.first_failed} ({o.wall_s} s)", file=sys.stderr, flush=True)
        outcomes.append({**asdict(o), "git": git_now})
        if i + 1 < len(picked):  # what has run so far, in case the run is stopped (completed: False), and the
            # recorded outcomes of the mutants still to come, so a stopped --only/--resume run loses none of them
            rest = [prior[x.id] for x in picked[i + 1:] if x.id in prior]
            _write(a, argv, pop, outcomes + rest, equivalent, killed, complete=False)
    data = _write(a, argv, pop, outcomes, equivalent, killed, complete=True)
    s = data["summary"]
    print(f"{a.json}: {s['caught'] + s['timeout']} of {s['non_equivalent']} non-equivalent mutants caught "
          f"({s['equivalent']} equivalent, {s['survived']} survived, {s['error']} errors)", file=sys.stderr)
    return 0


def cmd_sites(a: argparse.Namespace) -> int:
    cov = load_coverage() if COVERAGE_FILE.exists() else None
    for f in population_files():
        ms = mutants_of(f)
        ex = [m for m in ms if cov is not None and select_tests(m, cov)[1] != "not executed"]
        by = {op: sum(m.op == op for m in ms) for op in OPERATORS}
        print(f"{f}: {len(ms)} mutants ({', '.join(f'{k} {v}' for k, v in by.items())})"
              + (f", {len(ex)} on executed lines" if cov is not None else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m parity_tests.mutants", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("coverage", help="per-test line coverage of impl/ (the default suite, once)")
    c.add_argument("-n", default="2", help="pytest-xdist workers (0: serial)")
    sub.add_parser("sites", help="the mutation population, per file and operator")
    r = sub.add_parser("run", help="draw --n mutants with --seed and run each against the tests that execute it")
    r.add_argument("--n", type=int, default=48)
    r.add_argument("--seed", type=int, default=20261207)
    r.add_argument("--json", default=str(ROOT / "reports" / "mutation-score.json"))
    r.add_argument("--only", action="append", help="rerun only this mutant id (others keep their recorded outcome)")
    r.add_argument("--resume", action="store_true", help="keep the outcomes already in --json (same seed), run the rest")
    a = ap.parse_args(argv)
    if a.cmd == "coverage":
        run_coverage(a.n)
        return 0
    if a.cmd == "sites":
        return cmd_sites(a)
    if a.n < 1:
        ap.error(f"--n {a.n}: must be at least 1")
    return cmd_run(a, argv)


if __name__ == "__main__":
    sys.exit(main())
