"""``python -m reference_export measure-capture``: what a request capture costs at released sizes, measured.

    python -m reference_export measure-capture --preset 0.6b --dtype float32 --frames 100 \
        [--taps 'talker.model.layers.0:*'] --json reports/capture-released.json

Builds (or reuses, under ``.cache/released/``) the synthetic checkpoint of the released layout
(``python -m reference_export synth --preset P --variant custom_voice``), then runs
``python -m reference_export capture --request`` on a custom_voice request forced to ``--frames`` frames
(``--max-new-frames``; synthetic weights may stop at EOS earlier, and the record says how many frames ran) in a
**child process**, and records:

- wall time of the child (load + run + write) and its peak RSS (``os.wait4``'s ``ru_maxrss``: the child alone,
  never the synth child or this process), plus a coarse RSS timeline polled from ``/proc`` (when the peak came);
- the weights' bytes as the capture holds them (talker and speaker encoder in ``--dtype``, the codec in its own
  dtype, fp32 unless ``--codec-dtype``: upstream's codec overflows in bf16), read from the safetensors headers,
  and the ratio peak RSS / weights against the budget (``BUDGET``: issue 16 item 4);
- the output file's size (the file is then deleted unless ``--keep-output``: they run to gigabytes);
- provenance: git sha (``+dirty``), date, CPU, cores, load average before and after, torch / transformers /
  qwen-tts versions, the exact commands, and that the checkpoint is synthetic.

Each run is one entry of ``--json`` (a run of the same preset, dtype, frames and taps replaces the older entry);
the file is written atomically (``impl.outfile.write_text``) and rendered into VALIDATION.md by
``reports/capture_perf.py``. Opt-in: nothing in the default test run calls this.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from impl.bench import cpu_name  # the CPU line the bench records, for the same machine

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "released"
BUDGET = 1.3  # peak RSS / weights in the capture dtype (issue 16, item 4)
TEXT = ("Every port starts with one sentence, spoken by one voice, and a file that says what the reference "
        "computed at each step, so the first place the two part is named.")
SPEAKER = "ryan"
_FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float64": 8}
_ST_ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def weight_bytes(path: Path, float_dtype: str) -> int:
    """Bytes of the tensors of safetensors ``path`` once loaded with floating tensors in ``float_dtype`` (integer
    tensors keep theirs), from the file's header alone."""
    import struct

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    total = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        numel = 1
        for d in info["shape"]:
            numel *= int(d)
        floating = info["dtype"] in ("F64", "F32", "F16", "BF16")
        total += numel * (_FLOAT_BYTES[float_dtype] if floating else _ST_ITEM[info["dtype"]])
    return total


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_child(cmd: list[str], poll_s: float = 1.0) -> dict[str, Any]:
    """Run ``cmd`` (stdout/stderr passed through) and return its exit status, wall seconds, peak RSS (``wait4``)
    and an RSS timeline polled every ``poll_s`` seconds (at most 120 points kept, evenly thinned)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.wait(poll_s):
            kb = _rss_kb(proc.pid)
            if kb is not None:
                samples.append((round(time.monotonic() - t0, 1), kb))

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        proc.terminate()  # the child's own handler removes its temporary file
        proc.wait()
        raise
    wall = time.monotonic() - t0
    done.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen so it does not wait again
    step = max(1, len(samples) // 120)
    peak_at = max(samples, key=lambda s: s[1])[0] if samples else None
    return {"rc": proc.returncode, "wall_s": round(wall, 1), "peak_rss_bytes": int(ru.ru_maxrss) * 1024,
            "peak_polled_at_s": peak_at, "rss_timeline_mb": [[t, round(kb / 1024)] for t, kb in samples[::step]]}


def ensure_checkpoint(preset: str, variant: str, seed: int, given: str | None) -> tuple[Path, bool]:
    """The checkpoint to capture from: ``given``, or the synthetic one under ``.cache/released/`` (built in a child
    process when missing, so this process stays small). Returns (folder, synthetic)."""
    if given:
        ck = Path(given)
        return ck, (ck / "synth.json").is_file()
    ck = CACHE / f"{preset}-{variant}-s{seed}"
    if not (ck / "synth.json").is_file():
        cmd = [sys.executable, "-m", "reference_export", "synth", "--preset", preset, "--variant", variant,
               "--seed", str(seed), "--out", str(ck), "--force"]
        print(f"building {ck} ({shlex.join(cmd)})", file=sys.stderr)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise RuntimeError(f"synth {preset}/{variant}: the build failed (see above)")
    return ck, True


def measure(a: argparse.Namespace) -> dict[str, Any]:
    from impl.outfile import check_output

    from .export import codec_dtype_for, git_sha
    from .upstream import versions

    check_output(a.json)  # an unwritable --json fails now, not after an hour of capture
    ck, synthetic = ensure_checkpoint(a.preset, "custom_voice", a.seed, a.checkpoint)
    codec_dtype = a.codec_dtype or codec_dtype_for(a.dtype)
    out = Path(a.out) if a.out else CACHE / f"capture-{a.preset}-{a.dtype}-{os.getpid()}.h5"
    cmd = [sys.executable, "-m", "reference_export", "capture", "--checkpoint", str(ck), "--request",
           "--text", a.text, "--speaker", a.speaker, "--max-new-frames", str(a.frames), "--dtype", a.dtype,
           "--codec-dtype", codec_dtype, "--out", str(out)]
    for g in a.taps or []:
        cmd += ["--taps", g]
    w_model = weight_bytes(ck / "model.safetensors", a.dtype)
    w_codec = weight_bytes(ck / "speech_tokenizer" / "model.safetensors", codec_dtype)
    load_before = os.getloadavg()
    date = datetime.now(UTC).isoformat(timespec="seconds")
    sha = git_sha()
    print(f"measuring: {shlex.join(cmd)}", file=sys.stderr)
    child = run_child(cmd)
    load_after = os.getloadavg()
    if child["rc"] != 0:
        raise RuntimeError(f"the capture child exited {child['rc']} (its error is above); nothing recorded")
    import h5py

    try:
        size = out.stat().st_size
        with h5py.File(out, "r") as f:
            frames = [int(x) for x in json.loads(f.attrs["frames"])]  # lists are JSON strings (h5io._attr)
            stop = [str(x) for x in json.loads(f.attrs["stop_reason"])]
            steps = int(f.attrs["decode_steps"])
            calls = int(f.attrs["tap_calls_written"])
            raw = int(f.attrs["tap_bytes_raw"])
    finally:
        if not a.keep_output:
            out.unlink(missing_ok=True)
    weights = w_model + w_codec
    vers = versions()
    from .synth import checkpoint_sha256

    return {
        "preset": a.preset, "variant": "custom_voice", "dtype": a.dtype, "codec_dtype": codec_dtype,
        "taps": list(a.taps or []), "frames_requested": a.frames, "frames_ran": frames, "stop_reason": stop,
        "decode_steps": steps, "wall_s": child["wall_s"], "peak_rss_bytes": child["peak_rss_bytes"],
        "weights_bytes": weights, "weights_bytes_model": w_model, "weights_bytes_codec": w_codec,
        "peak_over_weights": round(child["peak_rss_bytes"] / weights, 3), "budget": BUDGET,
        "within_budget": child["peak_rss_bytes"] <= BUDGET * weights,
        "output_bytes": size, "output_kept": bool(a.keep_output), "tap_calls_written": calls, "tap_bytes_raw": raw,
        "peak_polled_at_s": child["peak_polled_at_s"], "rss_timeline_mb": child["rss_timeline_mb"],
        "provenance": {
            "git": sha, "date_utc": date, "cpu": cpu_name(), "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "mem_total_gb": _mem_total_gb(),
            "load_average_1m": round(load_before[0], 2), "load_average_1m_after": round(load_after[0], 2),
            "torch": vers.get("torch"), "transformers": vers.get("transformers"), "qwen_tts": vers.get("qwen-tts"),
            "python": platform.python_version(), "note": a.note,
            "command": shlex.join(["python", "-m", "reference_export", *a.argv]),
            "child_command": _repo_relative(shlex.join(["python", *cmd[1:]])),
            "checkpoint": {"synthetic": synthetic, "preset": a.preset, "variant": "custom_voice",
                           "path": _repo_relative(str(ck)), "sha256": checkpoint_sha256(ck)},
        },
    }


def _repo_relative(text: str) -> str:
    """The clone's folder written as ``<repo>``: the JSON is committed and read on other machines."""
    return text.replace(str(ROOT), "<repo>")


def _key(r: dict[str, Any]) -> tuple:
    return (r.get("preset"), r.get("dtype"), r.get("codec_dtype"), r.get("frames_requested"), tuple(r.get("taps") or ()))


def record(path: Path, run: dict[str, Any]) -> None:
    """Add ``run`` to the JSON at ``path`` (replacing the run of the same configuration), atomically."""
    from impl.outfile import write_text

    data: dict[str, Any] = {"runs": []}
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if not isinstance(data.get("runs"), list):
                raise ValueError("no 'runs' list")
        except (json.JSONDecodeError, ValueError, AttributeError) as e:
            raise ValueError(f"--json {path}: not a capture measurement file ({e}); move it away first") from None
    data["description"] = ("peak RSS and wall time of `python -m reference_export capture --request` at released "
                           "sizes, measured by `python -m reference_export measure-capture`")
    runs = [r for r in data["runs"] if _key(r) != _key(run)] + [run]
    order = {"0.6b": 0, "1.7b": 1}
    runs.sort(key=lambda r: (order.get(r.get("preset"), 9), str(r.get("preset")), r.get("dtype") != "float32",
                             bool(r.get("taps"))))
    data["runs"] = runs
    import re

    text = json.dumps(data, indent=1)
    # one line per [seconds, MB] timeline point, not three
    text = re.sub(r"\[\s+(-?[\d.]+),\s+(-?[\d.]+)\s+\]", r"[\1, \2]", text)
    write_text(path, text + "\n")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m reference_export measure-capture", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="0.6b", choices=["tiny", "0.6b", "1.7b"])
    p.add_argument("--checkpoint", default=None, help="a custom_voice checkpoint folder (default: the synthetic one)")
    p.add_argument("--seed", type=int, default=0, help="synthetic checkpoint seed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--codec-dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--frames", type=int, default=100, help="--max-new-frames of the request")
    p.add_argument("--taps", action="append", default=None, metavar="GLOB", help="passed to capture (repeatable)")
    p.add_argument("--text", default=TEXT)
    p.add_argument("--speaker", default=SPEAKER)
    p.add_argument("--json", default=str(ROOT / "reports" / "capture-released.json"))
    p.add_argument("--out", default=None, help="the capture file (default: under .cache/released/, deleted)")
    p.add_argument("--keep-output", action="store_true", help="keep the capture file")
    p.add_argument("--note", default=None, help="recorded with the run (e.g. what else the machine was doing)")
    a = p.parse_args(argv)
    a.argv = ["measure-capture", *argv]
    if a.frames < 1:
        print(f"error: --frames {a.frames}: must be >= 1", file=sys.stderr)
        return 2
    try:
        run = measure(a)
        record(Path(a.json), run)
    except KeyboardInterrupt:
        print("interrupted (nothing recorded)", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"{a.json}: {run['preset']} {run['dtype']} taps={run['taps'] or 'all'}: {run['wall_s']} s, peak "
          f"{run['peak_rss_bytes'] / 1e9:.2f} GB = {run['peak_over_weights']}x weights ({run['weights_bytes'] / 1e9:.2f}"
          f" GB), file {run['output_bytes'] / 1e6:.1f} MB, frames {run['frames_ran']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
