"""Check an outside port (Rust, C++, ONNX, MLX, numpy …) against a reference, tap by tap: ``reports compare``.

The port dumps its activations in any format ``reports/port_dumps.py`` reads (our HDF5 schema, safetensors, npz,
a folder of ``.npy``), under our tap names or under its own with a ``--map`` file. Every reference tap the port
dumped is judged at a tier (``reports/compare.py``); the first failing tap in upstream's execution order is named
with both values and the smallest tolerance that would have passed. Everything that could not be compared is
listed by name: reference taps the port lacks, port taps the reference lacks, shape mismatches, integer vs float
mismatches, keys that are not tap names. ``--out DIR`` writes the per-port report (``port_report.py``).

Exit status: 0 every selected tap passes; 1 a divergence, a missing tap or an unusable key; 2 bad input (a file
that cannot be read, an unknown tier, a malformed option), with one line on stderr naming it.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from reference_export.h5io import ReferenceError_, RefFile

from .compare import TIERS, CompareResult, compare, tier_for
from .port_dumps import Dump, PortInputError, load_dump, load_map

CLOSE_TIERS = ("op", "block", "stack")  # the tiers a float tap is also judged at, for "tightest passing tier"
PORT_TIERS = ("exact", *CLOSE_TIERS)  # what --tier / --override may name (referee/functional need more inputs)


@dataclass
class TapCheck:
    """One compared call of one tap."""

    name: str  # our tap name
    label: str  # name, or name@step_N for a per-call tap
    order: int  # position of the tap in upstream's execution order (reference file)
    group: str  # component group (see ``component_group``)
    result: CompareResult
    at_tier: dict[str, bool] = field(default_factory=dict)  # pass/fail at op/block/stack (float taps)
    step: int = 0  # the decode step this call was recorded in (reference ``step`` attr; 0 = prefill / no loop)
    call: int = 0  # the call index of this tap (0 for a tap called once)


@dataclass
class PortCheck:
    ours: Path
    ref: Path
    fmt: str
    default_tier: str
    overrides: dict[str, str]
    checks: list[TapCheck]
    missing: list[str]  # selected reference taps the port did not dump
    unknown: list[str]  # port taps the reference does not have
    problems: list[str]  # keys/taps that could not be compared, one line each, by name
    notes: list[str]  # decisions said out loud (dtype upcasts, reshapes)
    ignored: list[str]  # port keys a "-" map rule dropped
    renamed: int  # port keys renamed by the map
    not_selected: int  # reference taps outside --only
    ref_meta: dict[str, Any]
    ref_case: dict[str, Any]
    inputs_not_dumped: int = 0  # reference ``:in`` taps the port did not dump (optional, see check_port)

    @property
    def first_divergence(self) -> TapCheck | None:
        """The earliest failing call in time: by decode step first, then upstream's execution order within the
        step, then call index. (Ordering by tap alone would name a tap that first ran early but failed at step 1
        ahead of one that failed during the prefill.)"""
        failing = [c for c in self.checks if not c.result]
        return min(failing, key=lambda c: (c.step, c.order, c.call)) if failing else None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and self.first_divergence is None and not self.missing and not self.problems


def component_group(name: str) -> str:
    """The component a tap belongs to for the report: the module path up to its first layer index
    (``talker.model.layers.3``, ``speech_tokenizer.decoder.decoder.1``), else the module's parent."""
    parts = name.rpartition(":")[0].split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1] if len(parts) > 2 else parts)


def _leading_ones_stripped(shape: tuple[int, ...]) -> tuple[int, ...]:
    i = 0
    while i < len(shape) - 1 and shape[i] == 1:
        i += 1
    return tuple(shape[i:])


def _prepare(name: str, x: torch.Tensor, y: torch.Tensor, notes: list[str]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Make ours comparable with the reference or say why not ("" = comparable)."""
    if x.is_floating_point() != y.is_floating_point():
        kind = lambda t: "float" if t.is_floating_point() else "integer"  # noqa: E731
        return x, y, (f"{name}: dtype {str(x.dtype)[6:]} ({kind(x)}) but the reference is {str(y.dtype)[6:]} "
                      f"({kind(y)}): integer vs float, not compared")
    if x.is_floating_point():
        # Low-precision floats upcast exactly; fp64 stays fp64 (compare() works in fp64 anyway).
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        y = y.float() if y.dtype in (torch.bfloat16, torch.float16) else y
    else:
        x, y = x.long(), y.long()
    if tuple(x.shape) != tuple(y.shape) and x.numel() == y.numel() and \
            _leading_ones_stripped(tuple(x.shape)) == _leading_ones_stripped(tuple(y.shape)):
        # A port without a batch axis (or with an extra one of size 1) is the same tensor; say so, then compare.
        notes.append(f"{name}: shape {tuple(x.shape)} read as the reference's {tuple(y.shape)} (axes of size 1)")
        x = x.reshape(y.shape)
    return x, y, ""


def check_port(ours: str | Path, ref: str | Path, default_tier: str = "stack",
               overrides: dict[str, str] | None = None, map_file: str | Path | None = None,
               only: list[str] | None = None) -> PortCheck:
    """Judge a port's dump against a reference file. Raises ``PortInputError`` on unreadable input."""
    overrides = dict(overrides or {})
    for t in [default_tier, *overrides.values()]:
        if t not in PORT_TIERS:
            raise PortInputError(f"tier {t!r} is not one of {', '.join(PORT_TIERS)}")
    rules = load_map(map_file) if map_file else []
    ref = Path(ref)
    if not ref.exists():
        raise PortInputError(f"{ref}: reference file not found")
    if ref.is_file() and ref.stat().st_size == 0:
        raise PortInputError(f"{ref}: empty file (0 bytes)")
    try:
        rf = RefFile(ref)
    except ReferenceError_ as e:
        raise PortInputError(str(e)) from None
    with rf:
        dump: Dump = load_dump(ours, rules)
        # A module's ``:in`` is recorded by the same hook as its ``:out``, after everything inside the module ran;
        # in execution order it comes before the first tap of the module's subtree.
        raw = {n: float(rf.order(n)) for n in rf.names()}
        first_inside: dict[str, float] = {}  # module path -> earliest tap of its subtree (":in" taps excluded)
        for n, o in raw.items():
            if n.endswith(":in"):
                continue
            parts = n.rpartition(":")[0].split(".")
            for k in range(1, len(parts) + 1):
                m = ".".join(parts[:k])
                first_inside[m] = min(first_inside.get(m, o), o)
        pos = {n: (first_inside[n[:-3]] - 0.5 if n.endswith(":in") and n[:-3] in first_inside else o)
               for n, o in raw.items()}
        all_names = sorted(pos, key=lambda n: (pos[n], n))
        idx = {n: i for i, n in enumerate(all_names)}  # execution position, as the report shows it
        selected = [n for n in all_names if not only or any(fnmatch.fnmatchcase(n, g) for g in only)]
        ref_names = set(all_names)
        check = PortCheck(Path(ours), ref, dump.fmt, default_tier, overrides, [], [], [],
                          list(dump.problems), list(dump.notes), dump.ignored, len(dump.renamed),
                          len(all_names) - len(selected), rf.meta, rf.case)
        check.unknown = [n for n in dump.taps if n not in ref_names]
        ref_low = set()
        for name in selected:
            if name not in dump.taps:
                if name.endswith(":in"):
                    # A module's input is an earlier op's output (or an intermediate between two taps): judged
                    # when the port dumps it, never required.
                    check.inputs_not_dumped += 1
                else:
                    check.missing.append(name)
                continue
            tier = tier_for(name, default_tier, overrides)
            got, want = dump.taps[name], rf.tap_steps(name)
            steps = rf.tap_step_numbers(name)
            if len(got) != len(want):
                r = CompareResult(name, tier.name, False, [], [], dump.stored_dtype.get(name, ""))
                r.message = (f"{name}: {len(got)} call(s) dumped (@step_0..), the reference recorded {len(want)}")
                check.checks.append(TapCheck(name, name, idx[name], component_group(name), r))
                continue
            for i, (x, y) in enumerate(zip(got, want)):
                label = name if len(want) == 1 else f"{name}@step_{i}"
                if y.dtype in (torch.bfloat16, torch.float16):
                    ref_low.add(str(y.dtype)[6:])
                x, y, why = _prepare(label, x, y, check.notes)
                if why:
                    r = CompareResult(label, tier.name, False, list(x.shape), list(y.shape), str(x.dtype)[6:])
                    r.message = why
                else:
                    r = compare(label, x, y, tier)
                tc = TapCheck(name, label, idx[name], component_group(name), r, step=steps[i], call=i)
                if not why and x.is_floating_point() and tier.kind == "close":
                    tc.at_tier = {t: bool(compare(label, x, y, t)) for t in CLOSE_TIERS}
                check.checks.append(tc)
        if ref_low:
            check.notes.append(f"the reference holds {'/'.join(sorted(ref_low))} taps: upcast exactly to float32 "
                               f"for the comparison")
    return check


def compare_files(ours: Path, ref: Path, default_tier: str = "stack", overrides: dict[str, str] | None = None,
                  include_missing: bool = True) -> tuple[list[CompareResult], list[str]]:
    """The results in upstream execution order and the reference taps absent from ``ours`` (older API)."""
    c = check_port(ours, ref, default_tier, overrides)
    return [t.result for t in c.checks], c.missing if include_missing else []


def _parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for o in items:
        if "=" not in o:
            raise PortInputError(f"--override {o!r}: expected GLOB=TIER (e.g. '*attn_probs=block')")
        glob, tier = o.split("=", 1)
        if not glob:
            raise PortInputError(f"--override {o!r}: empty glob before '='")
        if tier not in PORT_TIERS:
            raise PortInputError(f"--override {o!r}: tier {tier!r} is not one of {', '.join(PORT_TIERS)}")
        out[glob] = tier
    return out


def print_check(c: PortCheck, out=None) -> None:
    out = out or sys.stdout  # looked up at call time (pytest's capsys swaps sys.stdout)
    rows = [[t.label, "pass" if t.result else "FAIL", t.result.tier, f"{t.result.max_abs:.3g}",
             f"{t.result.cosine:.6f}", f"{t.result.needed_atol:.3g}"] for t in c.checks]
    if rows:
        print(tabulate(rows, headers=["tap", "status", "tier", "max_abs", "cosine", "needed atol"],
                       tablefmt="github"), file=out)
    n_ok = sum(bool(t.result) for t in c.checks)
    print(f"\n{c.ours} ({c.fmt}, {c.renamed} keys renamed by --map, {len(c.ignored)} ignored) vs {c.ref}",
          file=out)
    print(f"{n_ok}/{len(c.checks)} comparisons pass; {len(c.missing)} reference taps absent from the port"
          + (f" (first: {c.missing[0]})" if c.missing else "")
          + (f"; {c.not_selected} reference taps outside --only" if c.not_selected else "")
          + (f"; {c.inputs_not_dumped} optional module-input (:in) taps not dumped" if c.inputs_not_dumped
             else ""), file=out)
    for title, items in (("port taps the reference lacks", c.unknown), ("not usable", c.problems),
                         ("notes", c.notes)):
        if items:
            print(f"{title} ({len(items)}):", file=out)
            for line in items[:20]:
                print(f"  {line}", file=out)
            if len(items) > 20:
                print(f"  … {len(items) - 20} more (see the report)", file=out)
    first = c.first_divergence
    if first:
        print(f"first divergence (upstream execution order): {first.result.message}", file=out)
    elif not c.checks:
        print("nothing compared: no dumped tap matches a reference tap (a comparison of nothing fails)", file=out)


def main_compare(ours: str, ref: str, default_tier: str, overrides: list[str], out: str | None,
                 map_file: str | None = None, out_dir: str | None = None, only: list[str] | None = None) -> int:
    """``reports compare``: print the table and verdict; 0 pass, 1 fail, 2 bad input (one line on stderr)."""
    from impl.outfile import OutputError, check_folder_can_be_made, check_output, write_text

    try:
        if default_tier not in PORT_TIERS:
            raise PortInputError(f"--tier {default_tier!r} is not one of {', '.join(PORT_TIERS)}")
        # The outputs before any work: --json a writable file, --out a folder (made when the report is written) that
        # is not a file.
        if out:
            check_output(out)
        if out_dir:
            check_folder_can_be_made(out_dir)
        c = check_port(ours, ref, default_tier, _parse_overrides(overrides), map_file, only)
    except (PortInputError, OutputError) as e:
        print(f"reports compare: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that opened but failed mid-read (h5py, numpy): still one line, naming it
        print(f"reports compare: {getattr(e, 'filename', None) or ours}: read error ({e})", file=sys.stderr)
        return 2
    print_check(c)
    try:  # atomic writes (impl/outfile.py): a full disk keeps the old files byte for byte, one line, exit 2
        if out:
            write_text(out, json.dumps(_to_json(c), indent=1))
        if out_dir:
            from .port_report import write_report

            for f in write_report(c, Path(out_dir)):
                print(f"reports compare: wrote {f}")
    except OutputError as e:
        print(f"reports compare: {e}", file=sys.stderr)
        return 2
    return 0 if c.ok else 1


def _to_json(c: PortCheck) -> dict[str, Any]:
    return {"ours": str(c.ours), "ref": str(c.ref), "format": c.fmt, "ok": c.ok,
            "checkpoint_sha256": c.ref_meta.get("checkpoint_sha256"), "case": c.ref_meta.get("case_name"),
            "default_tier": c.default_tier, "overrides": c.overrides,
            "results": [dict(t.result.to_json(), tap=t.name, order=t.order, group=t.group, at_tier=t.at_tier)
                        for t in c.checks],
            "missing": c.missing, "unknown": c.unknown, "problems": c.problems, "notes": c.notes,
            "ignored": c.ignored, "not_selected": c.not_selected, "inputs_not_dumped": c.inputs_not_dumped,
            "tiers": {k: {"rtol": v.rtol, "atol": v.atol, "nmse": v.nmse} for k, v in TIERS.items()
                      if k in PORT_TIERS}}
