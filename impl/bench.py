"""``python -m impl bench --model DIR``: our engine timed on one folder (the side-by-side driver is the harness's).

Measures, per batch size: frames/s of greedy generation (talker + code predictor) for our static decode step
(:mod:`impl.fast_decode`; a CUDA graph per batch bucket on CUDA), for our eager loop; the real-time factor (compute
seconds per second of audio at 12.5 frames/s: below 1 is faster than real time); our first-audio time at 1- and
8-frame chunks (prompt, prefill, the frames, the codec decode of the chunk); peak memory (CUDA:
``max_memory_allocated``; CPU: the peak RSS growth of the process over the side's load and runs, sampled every 2 ms);
and on every device the weight read-bandwidth floor: bytes of weights one frame reads (the talker once, the
predictor's layers 15 times) divided by a read bandwidth measured in the same run. Each figure is the median of
``--repeats`` runs after ``--warmup`` untimed ones (which also compile/capture).

Ours against upstream, in one process on the same folder, is a harness tool: ``python -m reference_export bench``
(:mod:`reference_export.bench`, ``./run.sh bench``) runs :func:`run` with upstream's timer passed in. ``impl``
imports nothing of the harness, not even lazily.

Results go to ``reports/bench-<device>-<preset>.json`` (``--json`` to choose): ``{"provenance": {...}, "runs":
[...]}``, one run per (device, dtype, preset, batch, frames, fast mode); a run measured again replaces the old one,
other runs stay. Timings are recorded, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from .fast_decode import MODES as FAST_MODES
from .outfile import check_free_space, check_output, write_text

FRAME_RATE = 12.5  # codec frames per second of audio
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
SIZE_NAMES = {"0b6": "0.6b", "1b7": "1.7b", "tiny": "tiny"}  # config.json ``tts_model_size`` -> preset name
DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs back home again across the wide "
                "green field before the sun goes down.")


# ------------------------------------------------------------------------------------------------ helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so RSS growth from here
    counts what a side really allocates."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the figure may undercount a side that reuses the previous side's freed heap


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_gb``: CUDA ``max_memory_allocated`` over the body, or on
    CPU the peak growth of the process RSS over its value at entry (a 2 ms sampling thread: torch ops release the
    GIL). Weights loaded inside the body count; memory held from before does not."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.peak_gb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif sys.platform.startswith("linux"):
            _release_freed_memory()  # else the previous side's freed heap is reused unseen and RSS undercounts
            self._base = _rss_bytes()
            self._peak = self._base
            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.is_set():
                    self._peak = max(self._peak, _rss_bytes())
                    time.sleep(0.002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def peak_so_far_gb(self) -> float:
        """The peak up to now, inside the body (used to keep the profiler's own memory out of the figure)."""
        if self.device.type == "cuda":
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self._base) / 1e9
        if sys.platform.startswith("linux"):
            return (max(self._peak, _rss_bytes()) - self._base) / 1e9
        return float("nan")

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_gb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 1e9
        elif sys.platform.startswith("linux"):
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_gb = (self._peak - self._base) / 1e9


def read_bandwidth_gbs(device: torch.device, gib: float = 0.5, rounds: int = 5) -> dict[str, float]:
    """Read bandwidth in GB/s with the current thread settings, best of ``rounds``, over ``gib`` GiB of fp32 (far
    larger than any cache), two ways: a plain reduction (``sum``) and a matrix-vector product (``mv``, the op a
    one-token decode step streams its weights through). ``floor`` is the higher of the two: the bandwidth a
    weight-streaming step could reach, so the floor it gives is the stricter one."""
    n = int(gib * 2**30 / 4)
    cols = 4096
    x = torch.ones(n // cols, cols, dtype=torch.float32, device=device)
    vec = torch.ones(cols, dtype=torch.float32, device=device)
    out = {}
    for name, fn in (("sum", x.sum), ("mv", lambda: torch.mv(x, vec))):
        fn()  # first touch / page-in, kernel selection
        best = float("inf")
        for _ in range(rounds):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        out[name] = x.numel() * 4 / best / 1e9
    out["floor"] = max(out["sum"], out["mv"])
    return out


def weight_bytes_per_frame(talker) -> int:
    """Bytes of weights one frame reads: the talker's layers, final norm and codec head once, the predictor's
    layers, norm and input projection once per step (15 steps), and each of its 15 heads once. Embedding tables are
    row lookups (a few KB) and are left out."""

    def nbytes(m: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    cp = talker.code_predictor
    steps = cp.cfg.num_code_groups - 1
    per_step = nbytes(cp.model.layers) + nbytes(cp.model.norm) + nbytes(cp.small_to_mtp_projection)
    return (nbytes(talker.model.layers) + nbytes(talker.model.norm) + nbytes(talker.codec_head)
            + steps * per_step + nbytes(cp.lm_head))


def profile_frames(fn, device: torch.device, n_frames: int, top: int = 8) -> dict[str, Any]:
    """Run ``fn`` (one generation of ``n_frames`` frames) under ``torch.profiler``: aten calls per frame, the
    CPU self time spent inside operators per frame (wall time minus this is Python and dispatch around them), and
    the top operators by self time (device time on CUDA), per frame."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    events = prof.key_averages()
    dev_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, dev_key, 0.0), reverse=True)[:top]
    n_ops = sum(e.count for e in events if e.key.startswith("aten::"))
    host_us = sum(e.self_cpu_time_total for e in events)
    return {"frames": n_frames, "aten_calls_per_frame": round(n_ops / max(n_frames, 1), 1),
            "op_self_cpu_ms_per_frame": round(host_us / 1e3 / max(n_frames, 1), 3),
            "time": "device" if device.type == "cuda" else "cpu",
            "top_ops_ms_per_frame": {e.key: round(getattr(e, dev_key, 0.0) / 1e3 / max(n_frames, 1), 3) for e in rows}}


def _median_time(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, list[float], Any]:
    out = None
    times = []
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _checkpoint_kind(model: str) -> dict[str, Any]:
    """Whether the folder holds a synthetic checkpoint (random weights in the released layout, marked by the
    ``synth.json`` that ``reference_export synth`` writes) or real weights, and which variant: the report says so
    beside every number measured on it."""
    folder = Path(model)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    kind: dict[str, Any] = {"synthetic": (folder / "synth.json").is_file(), "variant": cfg.get("tts_model_type")}
    if kind["synthetic"]:
        try:
            kind["preset"] = json.loads((folder / "synth.json").read_text()).get("preset")
        except (OSError, ValueError):
            kind["preset"] = None
    return kind


# A recorded command is read on other machines: absolute paths (the model folder, --json) become <path>.
_ABS_PATH = re.compile(r"(?<![\w.<])/[^\s'\"]+")


def provenance(args: argparse.Namespace, device: torch.device, bandwidth: dict[str, float]) -> dict[str, Any]:
    argv = sys.argv[1:] if args.argv is None else args.argv
    p: dict[str, Any] = {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": _ABS_PATH.sub("<path>", f"{getattr(args, 'prog', 'python -m impl bench')} " + " ".join(argv)),
        "checkpoint": _checkpoint_kind(args.model),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "qwen_tts": _version("qwen-tts"), "transformers": _version("transformers"), "git": _git_commit(),
        "dtype": args.dtype, "attn": "sdpa", "warmup": args.warmup, "repeats": args.repeats,
        "statistic": "median", "greedy": True, "read_bandwidth_gbs": round(bandwidth["floor"], 2),
        "read_bandwidth_sum_gbs": round(bandwidth["sum"], 2), "read_bandwidth_mv_gbs": round(bandwidth["mv"], 2),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        p.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1), cuda=torch.version.cuda,
                 capability=f"{props.major}.{props.minor}")
    return p


# ------------------------------------------------------------------------------------------------ ours


def _requests(tts, mode: str, texts: list[str], speaker: str | None, instruct: str | None, language: str):
    return tts.requests(texts, mode=mode, speaker=speaker, language=language, instruct=instruct,
                        non_streaming_text=True)


def measure_ours(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, batches: list[int],
                 fast_mode: str) -> dict[str, Any]:
    """Our side for every batch size: loaded once, measured inside one :class:`PeakMemory`."""
    from .fast_decode import clear_decoders, decoder_for, generate_fast
    from .generate import GenerationSettings, generate
    from .model import Qwen3TTS
    from .prompt import build

    out: dict[str, Any] = {"batches": {}}
    with PeakMemory(device) as mem, torch.inference_mode():
        tts = Qwen3TTS.from_pretrained(args.model, device=device, dtype=dtype, attn="sdpa", linear=args.linear)
        mode = tts.mode
        if mode == "voice_clone":
            raise ValueError(f"{args.model}: bench needs a CustomVoice or VoiceDesign checkpoint (a Base checkpoint "
                             "needs reference audio)")
        speaker = args.speaker or (tts.speakers[0] if mode == "custom_voice" else None)
        instruct = args.instruct if mode == "voice_design" else None
        if mode == "voice_design" and not instruct:
            instruct = "A calm, clear voice."
        rp = float(tts.generation_config.get("repetition_penalty", 1.05))  # upstream's wrapper reads the same key
        settings = GenerationSettings.greedy(args.frames + 1, repetition_penalty=rp)  # N tokens give N-1 frames
        out.update(mode=mode, speaker=speaker, instruct=instruct, bytes_per_frame=weight_bytes_per_frame(tts.talker))
        talker, cfg = tts.talker, tts.config  # loaded with attn="sdpa" above
        for b in batches:
            reqs = _requests(tts, mode, [args.text] * b, speaker, instruct, args.language)
            r: dict[str, Any] = {}

            def fast(reqs=reqs):
                return generate_fast(talker, build(talker, cfg, reqs), settings, fast_mode)

            t, ts, res = _median_time(fast, device, args.warmup, args.repeats)
            r["fast"] = {"seconds": t, "seconds_all": ts, "codes": [c.cpu() for c in res.codes],
                         "frames_generated": [int(c.shape[0]) for c in res.codes], "stop": res.stop_reason}
            if not args.no_eager:
                def eager(reqs=reqs):
                    return generate(talker, build(talker, cfg, reqs), settings, None)

                t, ts, res = _median_time(eager, device, args.warmup, args.repeats)
                r["eager"] = {"seconds": t, "seconds_all": ts, "codes": [c.cpu() for c in res.codes],
                              "frames_generated": [int(c.shape[0]) for c in res.codes], "stop": res.stop_reason}
            if b == 1 and args.profile:  # run after every timing, so the profiler's memory stays out of the peak
                frames = max(r["fast"]["frames_generated"])
                to_profile = [("fast", fast, frames)] + ([("eager_loop", eager, frames)] if "eager" in r else [])
            if b == 1:
                r["first_audio_ms"] = {}
                codec = tts.codec  # loaded before timing: a server holds it loaded
                for chunk in args.chunks:
                    def first(chunk=chunk, reqs=reqs, codec=codec):
                        prompt = build(talker, cfg, reqs)
                        dec = decoder_for(talker, prompt, settings, fast_mode)
                        dec.load(prompt, settings)
                        for k in dec.frames_iter():
                            if k + 1 >= chunk:
                                break
                        n = min(chunk, dec.n_host - 1)
                        wav = codec.decoder.stream().push(dec.frames[0, :n].to(codec.device))
                        return wav.shape[-1]

                    t, _, _ = _median_time(first, device, args.warmup, args.repeats)
                    r["first_audio_ms"][chunk] = t * 1e3
                    if not args.no_eager:  # today's public streaming path (eager loop + decoder.stream())
                        def first_eager(chunk=chunk):
                            chunks = tts.stream(args.text, chunk_frames=chunk, mode=mode, speaker=speaker,
                                                instruct=instruct, language=args.language, greedy=True,
                                                max_new_frames=args.frames, non_streaming_text=True)
                            return len(next(chunks))

                        t, _, _ = _median_time(first_eager, device, args.warmup, args.repeats)
                        r.setdefault("first_audio_ms_eager_stream", {})[chunk] = t * 1e3
            out["batches"][b] = r
            # Each batch size's decoder (KV cache, buffers, CUDA graph pool) goes before the next one is built, as
            # upstream frees its caches after each call: the peak is the largest batch's, not their sum.
            clear_decoders()
            gc.collect()
        out["peak_mem_gb"] = mem.peak_so_far_gb()
        if args.profile and 1 in out["batches"]:
            out["batches"][1]["profile"] = {name: profile_frames(fn, device, n) for name, fn, n in to_profile}
        clear_decoders()  # the cached decoders hold the talker and their buffers
        gc.collect()
    return out


# ------------------------------------------------------------------------------------------------ report


def _fps(side: dict[str, Any]) -> float:
    return sum(side["frames_generated"]) / side["seconds"]


def _rtf(side: dict[str, Any]) -> float:
    longest = max(side["frames_generated"]) if side["frames_generated"] else 0
    return side["seconds"] / (longest / FRAME_RATE) if longest else float("nan")


def _codes_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x.long(), y.long()) for x, y in zip(a, b))


def _round(x: Any, nd: int = 4) -> Any:
    return round(x, nd) if isinstance(x, float) else x


def build_runs(args, device: torch.device, preset: str, ours: dict, up: dict | None, bandwidth_gbs: float,
               fast_mode: str) -> list[dict[str, Any]]:
    runs = []
    floor_s = ours["bytes_per_frame"] / (bandwidth_gbs * 1e9)
    for b, r in ours["batches"].items():
        f = r["fast"]
        o: dict[str, Any] = {
            "path": f"static decode step ({fast_mode})", "frames_per_s": _round(_fps(f), 3), "rtf": _round(_rtf(f)),
            "seconds": _round(f["seconds"]), "seconds_all": [_round(x) for x in f["seconds_all"]],
            "frames_generated": f["frames_generated"], "stop": f["stop"], "peak_mem_gb": _round(ours["peak_mem_gb"], 3),
            "peak_mem_note": "one load, all batch sizes and both of our paths (profiler runs excluded)",
        }
        if "first_audio_ms" in r:
            for c, ms in r["first_audio_ms"].items():
                o[f"first_audio_ms_chunk{c}"] = _round(ms, 2)
        frames_row = max(f["frames_generated"]) if f["frames_generated"] else 0
        if frames_row:
            per_frame = f["seconds"] / frames_row  # one step serves the whole batch: weights read once per step
            o["ms_per_frame"] = _round(per_frame * 1e3, 2)
            o["floor_ms_per_frame"] = _round(floor_s * 1e3, 2)
            o["x_read_floor"] = _round(per_frame / floor_s, 3)
        run: dict[str, Any] = {"device": device.type, "dtype": args.dtype_name, "preset": preset, "batch": b,
                               "frames": args.frames, "fast_mode": fast_mode, "linear": args.linear, "ours": o}
        if "profile" in r:
            o["profile"] = r["profile"]
        for c, ms in (r.get("first_audio_ms_eager_stream") or {}).items():
            o[f"first_audio_ms_chunk{c}_eager_stream"] = _round(ms, 2)
        if "eager" in r:
            e = r["eager"]
            run["ours_eager_loop"] = {"frames_per_s": _round(_fps(e), 3), "rtf": _round(_rtf(e)),
                                      "seconds": _round(e["seconds"]), "frames_generated": e["frames_generated"]}
            run["fast_equals_eager"] = _codes_equal(f["codes"], e["codes"])
        if up is not None and b in up:
            u = up[b]
            uside = {"seconds": u["generate_s"], "frames_generated": [int(c.shape[0]) for c in u["codes"]]}
            run["upstream"] = {"frames_per_s": _round(_fps(uside), 3), "rtf": _round(_rtf(uside)),
                               "seconds": _round(u["generate_s"]), "seconds_all": [_round(x) for x in u["generate_s_all"]],
                               "decode_s": _round(u["decode_s"]), "frames_generated": uside["frames_generated"],
                               "peak_mem_gb": _round(u["peak_mem_gb"], 3), "version": u["version"],
                               "timed": "Qwen3TTSModel.model.generate inside generate_*; decode timed apart",
                               "loaded_with": u["loaded_with"]}
            if u.get("profile"):
                run["upstream"]["profile"] = u["profile"]
            run["codes_equal"] = _codes_equal(f["codes"], u["codes"])
            run["ratios"] = {"frames_per_s_ours_over_upstream": _round(_fps(f) / _fps(uside), 3),
                             "peak_mem_ours_over_upstream": _round(ours["peak_mem_gb"] / u["peak_mem_gb"], 3)
                             if u["peak_mem_gb"] and u["peak_mem_gb"] > 0 else None}
        runs.append(run)
    return runs


def _old_runs(path: Path) -> list[dict[str, Any]]:
    """The runs already in ``path`` (none when it does not exist); one ``ValueError`` line when it is not a bench
    JSON, binary and unreadable files included."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
        raise ValueError(f"{path}: not a bench JSON ({why}); move it away or pass another --json") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    old = data.get("runs", []) if isinstance(data, dict) else data
    if not isinstance(old, list) or not isinstance(data, dict):
        got = type(data).__name__ if not isinstance(data, dict) else f"'runs' is {type(old).__name__}"
        raise ValueError(f"{path}: not a bench JSON (an object with a 'runs' list; got {got}); move it away or pass "
                         f"another --json")
    return old


def check_json_out(path: Path) -> None:
    """Before the measurement: ``path`` can be written (folder exists and is writable, not a folder itself), an
    existing file there is a bench JSON we can merge into, and its filesystem has room for it (its size + 1 MB)."""
    check_output(path)
    _old_runs(path)
    check_free_space(path, (path.stat().st_size if path.is_file() else 0) + 1_000_000, "the bench JSON")


def write_json(path: Path, prov: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Merge into ``path``: a run with the same (device, dtype, preset, batch, frames, fast mode) is replaced; each
    run keeps the provenance it was measured under. Written atomically (impl/outfile.py)."""
    old = _old_runs(path)

    def key(r: dict[str, Any]) -> tuple:
        return (r.get("device"), r.get("dtype"), r.get("preset"), r.get("batch"), r.get("frames"), r.get("fast_mode"),
                r.get("linear", "aten"))

    for r in runs:
        r["provenance"] = prov
    new_keys = {key(r) for r in runs}
    merged = [r for r in old if key(r) not in new_keys] + runs
    merged.sort(key=lambda r: (str(r.get("dtype")), int(r.get("batch", 0)), int(r.get("frames", 0)),
                               str(r.get("fast_mode")), str(r.get("linear", "aten"))))
    write_text(path, json.dumps({"provenance": prov, "runs": merged}, indent=1) + "\n")


def print_table(prov: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    hw = prov.get("gpu") or prov["cpu"]
    print(f"bench: {hw}, torch {prov['torch']}, {prov['torch_threads']} threads, {prov['dtype']}, "
          f"warm-up {prov['warmup']}, median of {prov['repeats']}, load avg {prov['load_average_1m']}, "
          f"read bandwidth {prov['read_bandwidth_gbs']} GB/s")
    for r in runs:
        o, u = r["ours"], r.get("upstream")
        line = (f"  {r['preset']} batch {r['batch']:>2} {r['frames']} frames: ours ({r['fast_mode']}, "
                f"linear {r.get('linear', 'aten')}) "
                f"{o['frames_per_s']:.2f} frames/s "
                f"(RTF {o['rtf']:.3f}, peak {o['peak_mem_gb']:.2f} GB)")
        if "ours_eager_loop" in r:
            line += f", eager loop {r['ours_eager_loop']['frames_per_s']:.2f}"
        if u:
            line += (f", upstream {u['frames_per_s']:.2f} frames/s (RTF {u['rtf']:.3f}, peak {u['peak_mem_gb']:.2f} GB)"
                     f"; ours/upstream {r['ratios']['frames_per_s_ours_over_upstream']:.2f}x, codes equal "
                     f"{r['codes_equal']}")
        print(line)
        extra = [f"first audio chunk {k[len('first_audio_ms_chunk'):].replace('_', ' ')}: {v:.1f} ms"
                 for k, v in o.items() if k.startswith("first_audio_ms_chunk")]
        if "x_read_floor" in o:
            extra.append(f"{o['ms_per_frame']:.1f} ms/frame = {o['x_read_floor']:.2f}x the read floor "
                         f"({o['floor_ms_per_frame']:.1f} ms)")
        if "fast_equals_eager" in r:
            extra.append(f"fast == eager codes: {r['fast_equals_eager']}")
        profiles = dict(o.get("profile") or {})
        if u and u.get("profile"):
            profiles["upstream"] = u["profile"]
        for name, pr in profiles.items():
            tops = ", ".join(f"{k} {v:.2f}" for k, v in list(pr["top_ops_ms_per_frame"].items())[:5])
            extra.append(f"profile {name}: {pr['aten_calls_per_frame']} aten calls/frame, CPU self time "
                         f"{pr['op_self_cpu_ms_per_frame']:.2f} ms/frame in ops; top ({pr['time']} ms/frame) {tops}")
        if extra:
            print("    " + "; ".join(extra))


# ------------------------------------------------------------------------------------------------ CLI


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{s!r}: every value must be an integer >= 1")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="checkpoint folder (CustomVoice or VoiceDesign)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="language-model precision")
    p.add_argument("--frames", type=int, default=200, help="frame budget per run (greedy; a row may stop at EOS)")
    p.add_argument("--batch", type=_int_list, default=[1], help="batch sizes, e.g. 1,8,16")
    p.add_argument("--json", default=None, help="output (default reports/bench-<device>-<preset>.json in a clone, else ./bench-<device>-<preset>.json)")
    p.add_argument("--preset", default=None, help="label for the JSON (default from config.json tts_model_size)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is kept)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (they also compile / capture)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--fast-mode", choices=list(FAST_MODES), default=None,
                   help="how the static step runs (default: cudagraph on CUDA, eager op-by-op on CPU)")
    p.add_argument("--chunks", type=_int_list, default=[1, 8], help="first-audio chunk sizes in frames (batch 1)")
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--speaker", default=None, help="CustomVoice speaker (default: the first)")
    p.add_argument("--instruct", default=None, help="VoiceDesign instruction")
    p.add_argument("--language", default="english")
    p.add_argument("--profile", action="store_true",
                   help="batch 1: also profile one run of each of our paths (operator calls, host ms, top ops per frame)")
    p.add_argument("--no-eager", action="store_true", help="skip our eager loop (static step only)")
    p.add_argument("--linear", choices=["aten", "onednn"], default="aten",
                   help="our talker's matmul kernel (impl.layers.Linear): aten (upstream's) or onednn (CPU float32)")
    return p


# time_upstream(folder, *, device, dtype, mode, texts, speaker, instruct, language, max_new_tokens, warmup, repeats,
# peak_memory, profile) -> dict: what the harness passes in (reference_export.upstream_bench.time_upstream).
UpstreamTimer = Callable[..., dict[str, Any]]


def run(args: argparse.Namespace, time_upstream: UpstreamTimer | None = None) -> int:
    """Measure ours (and upstream, when the harness passes ``time_upstream``), print, merge into the JSON."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if args.frames < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--frames {args.frames} / --repeats {args.repeats} must be >= 1, --warmup {args.warmup} >= 0")
    folder = Path(args.model)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no config.json (--model must be a checkpoint folder)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    args.dtype_name = str(dtype).removeprefix("torch.")
    size = json.loads(cfg_path.read_text()).get("tts_model_size")
    preset = args.preset or SIZE_NAMES.get(str(size), str(size))
    fast_mode = args.fast_mode or ("cudagraph" if device.type == "cuda" else "eager")
    # Default: the clone's reports/ (rendered into VALIDATION.md). Installed from a wheel, the folder beside the
    # package is site-packages (no conftest.py there: the wheel does not ship it), so the current directory.
    root = Path(__file__).resolve().parent.parent
    reports_dir = root / "reports" if (root / "conftest.py").is_file() else Path.cwd()
    out = Path(args.json) if args.json else reports_dir / f"bench-{device.type}-{preset}.json"
    check_json_out(out)  # before the measurement: a bad --json fails in the first second, not after minutes
    bandwidth = read_bandwidth_gbs(device, gib=4.0 if device.type == "cuda" else 0.5)  # GPU: TB/s, needs bulk
    ours = measure_ours(args, device, dtype, args.batch, fast_mode)
    print(f"bench: ours measured ({args.model}, batches {args.batch})", flush=True)
    up = None
    if time_upstream is not None:
        up = {}
        for b in args.batch:
            up[b] = time_upstream(folder, device=str(device), dtype=dtype, mode=ours["mode"], texts=[args.text] * b,
                                  speaker=ours["speaker"], instruct=ours["instruct"], language=args.language,
                                  max_new_tokens=args.frames + 1, warmup=args.warmup, repeats=args.repeats,
                                  peak_memory=PeakMemory, profile=profile_frames if args.profile and b == 1 else None)
    prov = provenance(args, device, bandwidth)
    prov["bytes_per_frame"] = ours["bytes_per_frame"]
    runs = build_runs(args, device, preset, ours, up, bandwidth["floor"], fast_mode)
    print_table(prov, runs)
    write_json(out, prov, runs)
    print(f"bench: wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(
        prog="python -m impl bench", description=__doc__.splitlines()[0],
        epilog="Ours against upstream on the same folder: python -m reference_export bench (the harness)."))
    args = p.parse_args(argv)
    args.argv = argv
    args.prog = "python -m impl bench"
    try:
        return run(args)
    except (ValueError, FileNotFoundError, NotImplementedError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
