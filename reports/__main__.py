"""``python -m reports``: the main job and the report tools.

    python -m reports run [--preset tiny] [-- extra pytest args]   build checkpoints + references, run the parity
                                                                   suite, write reports/VALIDATION.md
    python -m reports render [--results reports/results.json]      results.json -> VALIDATION.md, summary.json, plot
    python -m reports gate [--update]                              CI gate against reports/baseline.json
    python -m reports compare OURS.h5 REF.h5 [--tier stack] [--override GLOB=TIER …]
                                                                   a port's activations vs a reference, tap by tap
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .gate import gate
from .render import render

HERE = Path(__file__).parent
ROOT = HERE.parent


def _also(given: list[Path] | None) -> list[Path]:
    if given is not None:
        return given
    return sorted(HERE.glob("results-released*.json"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the parity suite and render the report")
    r.add_argument("--preset", default="tiny", choices=["tiny", "0.6b", "1.7b"])
    r.add_argument("--checkpoint", default=None, help="a real checkpoint folder instead of synthetic ones")
    r.add_argument("--results", default=str(HERE / "results.json"))
    r.add_argument("--out", default=str(HERE / "VALIDATION.md"))
    r.add_argument("--also", action="append", default=None, type=Path,
                   help="another results file to render as its own section (default: reports/results-released*.json: "
                        "the recorded opt-in runs at released dimensions)")
    r.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    d = sub.add_parser("render", help="render results.json into VALIDATION.md")
    d.add_argument("--results", default=str(HERE / "results.json"))
    d.add_argument("--out", default=str(HERE / "VALIDATION.md"))
    d.add_argument("--also", action="append", default=None, type=Path, help="as for run")
    g = sub.add_parser("gate", help="compare results.json with the committed baseline")
    g.add_argument("--results", default=str(HERE / "results.json"))
    g.add_argument("--baseline", default=str(HERE / "baseline.json"))
    g.add_argument("--update", action="store_true", help="rewrite the baseline from these results")
    c = sub.add_parser("compare", help="compare a port's activations (our HDF5 schema) with a reference file")
    c.add_argument("ours")
    c.add_argument("ref")
    c.add_argument("--tier", default="stack", help="default tier (exact, op, block, stack)")
    c.add_argument("--override", action="append", default=[], help="GLOB=TIER for matching taps (repeatable)")
    c.add_argument("--json", default=None, help="also write the results as JSON")
    a = p.parse_args(argv)
    if a.cmd == "compare":
        from .port_compare import main_compare

        return main_compare(a.ours, a.ref, a.tier, a.override, a.json)
    if a.cmd == "run":
        cmd = [sys.executable, "-m", "pytest", "-q", "parity_tests", "-m", "not slow and not benchmark",
               "--preset", a.preset, f"--results={a.results}"]
        if a.checkpoint:
            cmd += ["--checkpoint", a.checkpoint]
        cmd += a.pytest_args
        print("reports: " + " ".join(cmd[2:]), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT)
        for f in render(Path(a.results), Path(a.out), _also(a.also)):
            print(f"reports: wrote {f}")
        return rc
    if a.cmd == "render":
        for f in render(Path(a.results), Path(a.out), _also(a.also)):
            print(f"reports: wrote {f}")
        return 0
    return gate(Path(a.results), Path(a.baseline), a.update)


if __name__ == "__main__":
    sys.exit(main())
