"""``python -m reports merge``: the results files of a sharded run (``pytest --splits N --group i``, one file per
shard, each with its own provenance) into one results file that ``render`` and ``gate`` judge as one run.

Refused, with one line naming the file at fault (exit 2), because each would make the merged file claim more than
was run:

- shards produced by different code (``code_hash``), or of different kinds of run (preset, checkpoint, device,
  dtype, attention, TF32, pytest selection): their rows do not add up to one run;
- a test present in two shards (the shards overlap: a row would be counted twice);
- a shard that failed to collect or was interrupted (pytest exit status 2, 3 or 4, or nothing collected): its tests
  are missing, not passed;
- fewer or more than N shards, a shard of another split than N, or a shard number seen twice or not at all (N:
  ``--expect N``, else the ``--splits`` the shards record; ``--expect`` also makes non-shard files an error).

The merged file keeps every test, skip reason, duration, row and bad-input case, in shard order (``--splits`` cuts
the collection into contiguous runs of whole modules, so this is the serial run's order), and one
provenance entry per shard (``provenance.shards``: file, machine, device, sha, wall time, counts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from impl.outfile import write_text

from .results import ResultsError, RunResults, load

# Provenance keys that make two shards parts of the same run.
SAME_RUN = ("preset", "checkpoint", "device", "dtype", "attn", "tf32", "markexpr")
# pytest exit statuses of a shard that did not run its tests: interrupted, internal error, usage error.
NOT_RUN = (2, 3, 4)
# Per-shard provenance kept in the merged file (the rest is the same across shards, or per machine).
SHARD_KEYS = ("git_sha", "machine", "cpus", "python", "device", "dtype", "device_info", "workers", "versions",
              "memory")


class MergeError(ResultsError):
    """Shard files that cannot be merged into one run; the message is one line naming the file."""


def _shard(run: RunResults) -> dict | None:
    s = run.provenance.get("shard")
    return s if isinstance(s, dict) and isinstance(s.get("group"), int) and isinstance(s.get("splits"), int) else None


def merge(runs: list[RunResults], expect: int | None = None) -> RunResults:
    """One run from the shards ``runs`` (each loaded with its file name as ``source``)."""
    if not runs:
        raise MergeError("merge: no results files given")
    for r in runs:
        st = r.summary.get("exitstatus")
        if st in NOT_RUN or not r.summary.get("collected"):
            raise MergeError(f"{r.source}: this shard did not run its tests (pytest exit status {st}, "
                             f"{r.summary.get('collected')} collected): re-run it before merging")
        if not r.code_hash:
            raise MergeError(f"{r.source}: carries no code hash (written by an older harness); re-run the shard")
    first = runs[0]
    for r in runs[1:]:
        if r.code_hash != first.code_hash:
            raise MergeError(f"{r.source}: produced by code {r.code_hash}, but {first.source} by {first.code_hash}: "
                             f"shards of different code are not one run")
        for k in SAME_RUN:
            if r.provenance.get(k) != first.provenance.get(k):
                raise MergeError(f"{r.source}: {k} is {r.provenance.get(k)!r}, but {first.source} has "
                                 f"{first.provenance.get(k)!r}: shards of different runs")
    shards = [_shard(r) for r in runs]
    if any(shards) and not all(shards):
        r = runs[shards.index(None)]
        raise MergeError(f"{r.source}: not a shard (no provenance.shard), merged with shard files")
    splits = sorted({s["splits"] for s in shards if s})
    if len(splits) > 1:
        raise MergeError(f"merge: shards of different splits ({', '.join(map(str, splits))}) are not one run")
    if expect is None and splits:
        expect = splits[0]  # the shards say how many there are: a missing one is caught without --expect
    if expect is not None:
        for r, s in zip(runs, shards):
            if s is None:
                raise MergeError(f"{r.source}: not a shard (no provenance.shard): run with --splits {expect} "
                                 f"--group i")
            if s["splits"] != expect:
                raise MergeError(f"{r.source}: shard {s['group']}/{s['splits']}, but --expect {expect}")
        groups = [s["group"] for s in shards]  # type: ignore[index]
        seen: dict[int, str] = {}
        for r, g in zip(runs, groups):
            if g in seen:
                raise MergeError(f"{r.source}: shard {g}/{expect} again (also {seen[g]})")
            seen[g] = r.source
        missing = sorted(set(range(1, expect + 1)) - set(groups))
        if missing:
            raise MergeError(f"merge: shard(s) {', '.join(f'{g}/{expect}' for g in missing)} missing "
                             f"({len(runs)} of {expect} given)")
    owner: dict[str, str] = {}
    for r in runs:
        ids = set(r.tests) | {rec.nodeid for rec in r.records if rec.nodeid}
        for t in sorted(ids):
            if t in owner:
                raise MergeError(f"{r.source}: test {t} is also in {owner[t]}: the shards overlap")
            owner[t] = r.source
    order = sorted(range(len(runs)), key=lambda i: (shards[i]["group"] if shards[i] else 0, i))
    runs = [runs[i] for i in order]
    return _combine(runs)


def _combine(runs: list[RunResults]) -> RunResults:
    first = runs[0]
    # per-shard keys (which shard, how many xdist workers) live in provenance.shards only
    prov: dict[str, Any] = {k: v for k, v in first.provenance.items() if k not in ("shard", "workers")}
    prov["shards"] = [{"source": r.source, "created": r.created, "code_hash": r.code_hash,
                       **(_shard(r) or {"group": i + 1, "splits": len(runs)}),
                       **{k: r.provenance.get(k) for k in SHARD_KEYS},
                       **{k: r.summary.get(k) for k in ("collected", "passed", "failed", "errors", "skipped",
                                                        "duration_s", "exitstatus")}}
                      for i, r in enumerate(runs)]
    prov["captures"] = [c for r in runs for c in r.provenance.get("captures") or []]
    prov["memory"] = combined_memory([r.provenance.get("memory") for r in runs])
    if len({s["git_sha"] for s in prov["shards"]}) > 1:
        prov["git_sha"] = "; ".join(dict.fromkeys(str(s["git_sha"]) for s in prov["shards"]))
    summary: dict[str, Any] = {k: sum(int(r.summary.get(k) or 0) for r in runs)
                               for k in ("collected", "passed", "failed", "errors", "skipped")}
    # The machine time of the whole run; each shard's own wall time is in provenance.shards.
    summary["duration_s"] = round(sum(float(r.summary.get("duration_s") or 0.0) for r in runs), 1)
    summary["exitstatus"] = next((int(r.summary["exitstatus"]) for r in runs if r.summary.get("exitstatus")), 0)
    marked: dict[str, list[str]] | None = None
    if all(r.marked is not None for r in runs):
        marked = {}
        for r in runs:
            for m, ids in (r.marked or {}).items():
                marked.setdefault(m, []).extend(ids)
    extra: dict[str, Any] = {}
    for r in runs:
        extra.update({k: v for k, v in r.extra.items() if k not in extra})
    return RunResults(
        provenance=prov, summary=summary, records=[rec for r in runs for rec in r.records],
        tests={t: o for r in runs for t, o in r.tests.items()},
        skipped={t: why for r in runs for t, why in r.skipped.items()},
        bad_input=[c for r in runs for c in r.bad_input], code_hash=first.code_hash,
        created=max(r.created for r in runs), schema=first.schema,
        durations={t: d for r in runs for t, d in r.durations.items()}, marked=marked, extra=extra)


def combined_memory(mems: list[Any]) -> dict | None:
    """The merged run's memory record: the shard whose pytest peaked highest (its peak, test and ratio), the
    largest checkpoint any shard used, and the child captures of all shards (count, highest peak, summed time)."""
    mems = [m for m in mems if isinstance(m, dict) and m.get("peak_rss_gb")]
    if not mems:
        return None
    out = dict(max(mems, key=lambda m: m["peak_rss_gb"]))
    kids = [m for m in mems if m.get("capture_children")]
    if kids:
        out.update(capture_children=sum(int(m["capture_children"]) for m in kids),
                   capture_children_peak_rss_gb=max(float(m["capture_children_peak_rss_gb"]) for m in kids),
                   capture_children_wall_s=round(sum(float(m["capture_children_wall_s"]) for m in kids), 1))
    return out


def _shown(path: str) -> str:
    """A shard's file as the merged provenance names it: relative to the working directory when inside it (a
    committed report holds no absolute path of the machine that wrote it)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main_merge(files: list[str], out: str, expect: int | None = None) -> int:
    """0: merged and written; 2: refused (one line on stderr naming the file at fault)."""
    import sys

    from impl.outfile import OutputError, check_output

    try:
        check_output(out)  # before reading anything: an output that cannot be written is said first
        if expect is not None and expect < 1:
            raise MergeError(f"--expect {expect}: the number of shards must be at least 1")
        runs = [load(Path(f), _shown(f)) for f in files]
        merged = merge(runs, expect)
        write_text(out, json.dumps(merged.to_json(), indent=1))
    except (ResultsError, OutputError) as e:
        print(f"merge: {e}" if not str(e).startswith("merge:") else str(e), file=sys.stderr)
        return 2
    s = merged.summary
    print(f"merge: wrote {out}: {len(runs)} shard(s), {s['passed']} passed, {s['failed']} failed, "
          f"{s['errors']} errors, {s['skipped']} skipped of {s['collected']}; {len(merged.records)} comparisons")
    return 0


def main_durations(files: list[str], out: str, keep: bool = False) -> int:
    """Write the durations file shards are balanced on (``{node id: seconds}``, sorted) from the per-test durations that results
    files record (a whole run, or every shard of one). ``keep``: start from the existing file, so tests these files
    did not run keep their old numbers. 0: written; 2: refused (one line)."""
    import sys

    from impl.outfile import OutputError, check_output

    try:
        check_output(out)
        runs = [load(Path(f), f) for f in files]
        for r in runs:
            if not r.durations:
                raise ResultsError(f"{r.source}: records no per-test durations (an older results file); re-run it")
        durations: dict[str, float] = {}
        if keep and Path(out).exists():
            from .results import read_json

            old = read_json(Path(out), out, "missing", "empty file (not a durations file)")
            if not isinstance(old, dict):
                raise ResultsError(f"{out}: not a durations file (expected an object of node id -> seconds)")
            durations.update(old)
        for r in runs:
            durations.update({t: round(float(d), 3) for t, d in r.durations.items()})
        write_text(out, json.dumps(dict(sorted(durations.items())), indent=1) + "\n")
    except (ResultsError, OutputError) as e:
        print(f"durations: {e}", file=sys.stderr)
        return 2
    print(f"durations: wrote {out}: {len(durations)} tests, {sum(durations.values()):.0f} s in all")
    return 0
