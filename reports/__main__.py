"""``python -m reports``: the main job and the report tools.

    python -m reports run [--preset tiny] [-- extra pytest args]   build checkpoints + references, run the parity
                                                                   suite, write reports/VALIDATION.md
    python -m reports render [--results reports/results.json]      results.json -> VALIDATION.md, summary.json, plot
    python -m reports gate [--update]                              CI gate against reports/baseline.json (and the
                                                                   recorded sections reports/results-released*.json)
    python -m reports compare OURS REF.h5 [--tier stack] [--override GLOB=TIER …] [--map FILE] [--out DIR]
                                                                   a port's activations (HDF5, safetensors, npz,
                                                                   .npy folder) vs a reference, tap by tap
    python -m reports merge A.json B.json … --out results.json [--expect N]
                                                                   the shards' results files (pytest --splits N
                                                                   --group i) -> one run for render and gate
    python -m reports durations RESULTS.json … [--out reports/durations.json] [--keep]
                                                                   refresh the per-test durations shards balance on
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from impl.outfile import OutputError, check_output

from .gate import gate
from .render import check_outputs, render

HERE = Path(__file__).parent
ROOT = HERE.parent


# Recorded runs rendered as their own sections (and held by the gate's baseline): the opt-in runs at released
# dimensions, and the runs on other devices/dtypes (`./run.sh test --device cuda [--dtype bfloat16]`).
RECORDED = ("results-released*.json", "results-cuda*.json")


def _also(given: list[Path] | None) -> list[Path]:
    if given is not None:
        return given
    return sorted({p for g in RECORDED for p in HERE.glob(g)})


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
    g.add_argument("--update", action="store_true", help="rewrite the baseline from these results (refused while any "
                                                          "row is red or any test failed)")
    g.add_argument("--also", action="append", default=None, type=Path,
                   help="a recorded results file the baseline also covers (default: reports/results-released*.json)")
    c = sub.add_parser(
        "compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="compare a port's activations (HDF5, safetensors, npz, .npy folder) with a reference file",
        description="Judge a port's activations against a reference captured by `reference_export capture` on the "
                    "same checkpoint, tap by tap, and name the first divergence in upstream's execution order.",
        epilog="OURS formats (detected from the content): our HDF5 schema, .safetensors (bf16/fp16 are upcast to "
               "fp32 and said so), .npz, or a folder of .npy files (file name = key; '__' may stand for ':').\n"
               "Keys are our tap names '<module path>:<point>'; a tap called once per decode step is written "
               "'<name>@step_N' (N = call index from 0).\n"
               "--map FILE renames a port's own keys: one 'PATTERN -> TARGET' rule a line, first match wins; "
               "PATTERN is a glob whose * are {1}, {2} … in TARGET, or 're:REGEX' (groups {1} …, named {name}); "
               "TARGET '-' ignores the key. Rules may also be a JSON list of {\"glob\"|\"regex\": …, \"to\": …}.\n"
               "Exit status: 0 all selected taps pass, 1 a divergence or a missing/unusable tap, 2 bad input.")
    c.add_argument("ours", help="the port's dump: file or folder")
    c.add_argument("ref", help="the reference HDF5 from `reference_export capture` on the same checkpoint")
    c.add_argument("--tier", default="stack", help="default tier: exact, op, block or stack (default stack)")
    c.add_argument("--override", action="append", default=[], help="GLOB=TIER for matching taps (repeatable)")
    c.add_argument("--map", default=None, metavar="FILE", help="rename rules from the port's keys to our tap names")
    c.add_argument("--only", action="append", default=None, metavar="GLOB",
                   help="judge only reference taps matching GLOB (repeatable); others are neither compared nor "
                        "counted missing")
    c.add_argument("--out", default=None, metavar="DIR",
                   help="write the per-port report: DIR/REPORT.md, DIR/error_growth.png, DIR/results.json")
    c.add_argument("--json", default=None, help="also write the results as JSON")
    m = sub.add_parser("merge", help="merge the results files of a sharded run into one",
                       description="Merge the results files of the shards of one run (pytest --splits N --group i) "
                                   "into one results file. Refused (exit 2, one line): different code hashes or "
                                   "runs, a test in two shards, a shard that failed to collect, a missing shard.")
    m.add_argument("files", nargs="+", help="the shards' results files")
    m.add_argument("--out", required=True, help="the merged results file to write")
    m.add_argument("--expect", type=int, default=None, metavar="N",
                   help="how many shards there must be (default: the --splits the shards record)")
    u = sub.add_parser("durations", help="refresh the durations file that shards are balanced on",
                       description="Write the durations file that shards are balanced on from the per-test "
                                   "durations (setup + call + teardown) recorded in results files: a whole run, or "
                                   "all shards of one.")
    u.add_argument("files", nargs="+", help="results files (e.g. reports/results.json)")
    u.add_argument("--out", default=str(ROOT / "reports" / "durations.json"),
                   help="default reports/durations.json (what pytest --splits reads by default)")
    u.add_argument("--keep", action="store_true", help="keep the durations of tests these files did not run")
    a = p.parse_args(argv)
    if a.cmd == "merge":
        from .merge import main_merge

        return main_merge(a.files, a.out, a.expect)
    if a.cmd == "durations":
        from .merge import main_durations

        return main_durations(a.files, a.out, a.keep)
    if a.cmd == "compare":
        from .port_compare import main_compare

        return main_compare(a.ours, a.ref, a.tier, a.override, a.json, map_file=a.map, out_dir=a.out, only=a.only)
    if a.cmd == "run":
        cmd = [sys.executable, "-m", "pytest", "-q", "parity_tests", "-m", "not slow and not benchmark and not install",
               "--preset", a.preset, f"--results={a.results}"]
        if a.checkpoint:
            cmd += ["--checkpoint", a.checkpoint]
        cmd += a.pytest_args
        try:  # the outputs first: a report that cannot be written is said before the suite runs, not after it
            check_output(a.results)
            check_outputs(Path(a.out))
        except OutputError as e:
            print(f"reports: {e}", file=sys.stderr)
            return 2
        print("reports: " + " ".join(cmd[2:]), flush=True)
        results = Path(a.results)
        before = results.stat().st_mtime_ns if results.exists() else None
        rc = subprocess.call(cmd, cwd=ROOT)
        after = results.stat().st_mtime_ns if results.exists() else None
        if after is None or after == before:
            # e.g. a collection error: pytest wrote nothing, and the previous results must not be re-rendered
            print(f"reports: pytest (exit {rc}) wrote no new {results}; not rendering the previous results")
            return rc or 2
        try:
            written = render(results, Path(a.out), _also(a.also), baseline=HERE / "baseline.json")
        except SystemExit as e:  # refused (e.g. a collection error: the run recorded nothing): say why, keep rc
            print(f"reports: not rendering: {e}")
            return rc or 2
        except OutputError as e:
            print(f"reports: {e}", file=sys.stderr)
            return rc or 2
        for f in written:
            print(f"reports: wrote {f}")
        return rc
    if a.cmd == "render":
        try:
            written = render(Path(a.results), Path(a.out), _also(a.also), baseline=HERE / "baseline.json")
        except OutputError as e:  # an output that cannot be written (checked first) or a write that failed
            print(f"reports: {e}", file=sys.stderr)
            return 2
        except SystemExit as e:  # render's one-line refusal of an input (stale, binary, empty …): exit 2
            if not isinstance(e.code, str):
                raise
            print(f"reports: {e.code}", file=sys.stderr)
            return 2
        for f in written:
            print(f"reports: wrote {f}")
        return 0
    return gate(Path(a.results), Path(a.baseline), a.update, _also(a.also))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Ctrl-C: one line and the conventional exit status 128 + SIGINT instead of a traceback.
        print("interrupted", file=sys.stderr)
        sys.exit(130)
