"""``python -m reference_export``: build synthetic checkpoints and capture upstream references.

    python -m reference_export synth --preset tiny --variant base --seed 0 --out ckpt/tiny-base
    python -m reference_export capture --checkpoint ckpt/tiny-base --case talker_stack --out refs/talker.h5
    python -m reference_export cases            # list the cases
    python -m reference_export capture --checkpoint ckpt/tiny-cv --request --text "Hello." --speaker ryan \
        --max-new-frames 8 --out refs/hello.h5 [--impl] [--taps GLOB …] [--steps 0:8,100] [--format npz]
    python -m reference_export capture --checkpoint DIR --request-file requests.json --out refs/run.h5
    python -m reference_export convert refs/hello.h5 --format safetensors --out refs/hello.safetensors
    python -m reference_export bench --model DIR [--frames 200] [--batch 1,8] …   ours vs upstream, speed (bench.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from impl.config import PRESET_NAMES, VARIANTS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # owns its arguments (impl.bench's, plus --no-upstream)
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["measure-capture"]:  # opt-in: released-size capture cost (measure_capture.py)
        from .measure_capture import main as measure_main

        return measure_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m reference_export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("bench", add_help=False, help="speed: ours vs upstream on one folder (bench --help)")
    sub.add_parser("measure-capture", add_help=False,
                   help="peak RSS, wall time and file size of a request capture (measure-capture --help)")
    s = sub.add_parser("synth", help="write a synthetic checkpoint folder (real layout, random weights)")
    s.add_argument("--preset", required=True, choices=PRESET_NAMES)
    s.add_argument("--variant", required=True, choices=VARIANTS)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true", help="replace an existing non-empty folder")
    c = sub.add_parser("capture", help="run upstream on a checkpoint and record a case's taps into HDF5")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--case", default=None, help="a fixed case (python -m reference_export cases)")
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"],
                   help="talker/speaker-encoder dtype (float64: the fp64 tier's truth, codec included)")
    c.add_argument("--codec-dtype", default=None, choices=["float32", "bfloat16", "float64"],
                   help="speech tokenizer dtype (default float32; float64 when --dtype float64)")
    c.add_argument("--attn", default=None, choices=["eager", "sdpa"],
                   help="attention (default: eager for cases, sdpa for requests, as upstream's loader)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=None,
                   help="cases: the input seed (default 0); --request: a sampled run with this seed (default greedy)")
    _request_args(c)
    v = sub.add_parser("convert", help="a captured HDF5 file as safetensors or npz (tap@step_N keys)")
    v.add_argument("file")
    v.add_argument("--format", required=True, choices=["safetensors", "npz"])
    v.add_argument("--out", required=True)
    sub.add_parser("cases", help="list the capture cases")
    a = p.parse_args(argv)
    try:
        if a.cmd == "synth":
            from .synth import build_checkpoint

            out = build_checkpoint(a.preset, a.variant, a.seed, a.out, force=a.force)
            print(out)
        elif a.cmd == "capture" and (a.request or a.request_file):
            for written in _capture_requests(a):
                print(written)
        elif a.cmd == "convert":
            from .openformat import convert

            print(convert(a.file, a.out, a.format))
        elif a.cmd == "capture":
            from .export import capture_case

            if a.case is None:
                raise ValueError("capture needs --case NAME, --request or --request-file")
            a.seed = 0 if a.seed is None else a.seed
            a.attn = a.attn or "eager"
            out = _check_capture_args(a)
            written = capture_case(a.case, a.checkpoint, out, device=a.device, dtype=a.dtype, attn=a.attn,
                                   seed=a.seed, codec_dtype=a.codec_dtype)
            _warn_nonfinite(written)
            print(written)
        elif a.cmd == "cases":
            from .cases import all_cases

            for name, case in sorted(all_cases().items()):
                print(f"{name:32s} {case.component:20s} {','.join(case.variants):30s} {case.description}")
    except KeyboardInterrupt:
        # Ctrl-C: one line, 128 + SIGINT. Writes are atomic (temporary file or folder, renamed at the end).
        print("interrupted (no output written or changed)", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        print(f"error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


def _request_args(c: argparse.ArgumentParser) -> None:
    """``capture --request``: the request arguments of ``python -m impl synthesize``, and what to keep."""
    g = c.add_argument_group("request capture (reference_export/request.py)")
    g.add_argument("--request", action="store_true", help="capture the request given by the flags below")
    g.add_argument("--request-file", default=None,
                   help="a JSON list of requests; writes <out stem>_<name or index><suffix> per request")
    g.add_argument("--impl", action="store_true", help="run our engine (impl) instead of upstream, same schema")
    g.add_argument("--text", action="append", help="text to speak (repeat for a batch)")
    g.add_argument("--mode", choices=["custom_voice", "voice_design", "voice_clone", "base"], default=None,
                   help="default: what the checkpoint serves")
    g.add_argument("--speaker", default=None)
    g.add_argument("--language", default="auto")
    g.add_argument("--instruct", default=None)
    g.add_argument("--ref-audio", default=None)
    g.add_argument("--ref-text", default=None)
    g.add_argument("--x-vector-only", action="store_true")
    g.add_argument("--non-streaming-text", choices=["true", "false"], default=None)
    g.add_argument("--max-new-frames", type=int, default=None)
    for flag, typ in (("--temperature", float), ("--top-k", int), ("--top-p", float),
                      ("--repetition-penalty", float)):
        g.add_argument(flag, type=typ, default=None, help="sampled runs (with --seed)")
    g.add_argument("--taps", action="append", default=None, metavar="GLOB",
                   help="keep only taps matching GLOB (repeatable; default: all)")
    g.add_argument("--all-taps", action="store_true",
                   help="also keep request.DEFAULT_SKIP (upstream helper outputs a port need not reproduce)")
    g.add_argument("--steps", default=None, help="keep decode steps only, e.g. 0:8,100 (ranges half-open)")
    g.add_argument("--format", choices=["hdf5", "safetensors", "npz"], default="hdf5",
                   help="hdf5 (the schema), or an open format with tap@step_N keys")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _capture_requests(a: argparse.Namespace) -> list[Path]:
    """``capture --request`` / ``--request-file``: checks every request and output before loading anything, then
    loads the model once and writes one file per request."""
    from impl.outfile import OutputError, check_output

    from .recorder import parse_steps
    from .request import (
        RequestError,
        capture_request,
        check_request,
        load_request_file,
        output_paths,
        request_from_args,
    )

    if a.case is not None:
        raise RequestError("--case and --request/--request-file exclude each other")
    if a.request and a.request_file:
        raise RequestError("--request and --request-file exclude each other")
    if a.request_file:
        reqs = load_request_file(a.request_file)
    else:
        if not a.text:
            raise RequestError("--request needs --text")
        reqs = [request_from_args(a)]
    steps = parse_steps(a.steps) if a.steps is not None else None
    for g in a.taps or []:
        if not g.strip():
            raise RequestError("--taps '': an empty glob")
    ck = Path(a.checkpoint)
    if not (ck / "config.json").is_file():
        raise RequestError(f"--checkpoint {ck}: not a checkpoint folder (no config.json)")
    import json

    from impl.config import Qwen3TTSConfig, SpeechTokenizerConfig
    from impl.loading import read_state_dict

    Qwen3TTSConfig.from_file(ck / "config.json")  # the checkpoint's configs parse, as for --case
    SpeechTokenizerConfig.from_file(ck / "speech_tokenizer" / "config.json")
    cfg = json.loads((ck / "config.json").read_text())
    from .request import check_steps_before

    for i, r in enumerate(reqs):
        check_request(r, ck, cfg, where=f"request {r.name or i}" if a.request_file else "")
        if r.max_new_frames is not None:
            check_steps_before(steps, int(r.max_new_frames) + 1)
    outs = output_paths(a.out, reqs, many=bool(a.request_file))
    for o in outs:
        target, through = check_output(o)
        if through:
            raise OutputError(f"{o}: not a regular file; a capture is written atomically to a regular file")
    for folder in (ck, ck / "speech_tokenizer"):
        read_state_dict(folder)  # truncation, NaN/Inf and all-zero matrices raise here, before anything loads
    from .export import DTYPES

    model = None
    written = []
    for i, (r, o) in enumerate(zip(reqs, outs)):
        h5 = Path(o) if a.format == "hdf5" else _hidden_h5(o)
        try:
            if model is None:
                model = _load_model(a, ck, DTYPES)
            capture_request(r, ck, h5, impl=a.impl, device=a.device, dtype=a.dtype, codec_dtype=a.codec_dtype,
                            attn=a.attn or "sdpa", taps=a.taps, steps=steps,
                            progress=not a.no_progress, model=model, all_taps=a.all_taps,
                            release_talker=i == len(reqs) - 1)  # the talker's last use: free it before the decode
            if a.format != "hdf5":
                from .openformat import convert

                convert(h5, o, a.format)
        finally:
            if a.format != "hdf5":
                h5.unlink(missing_ok=True)
        written.append(o)
    return written


def _hidden_h5(out: Path) -> Path:
    import os

    return Path(out).with_name(f".{Path(out).name}.capture-{os.getpid()}.h5")


def _load_model(a: argparse.Namespace, ck: Path, dtypes: dict):
    from .export import codec_dtype_for

    codec = dtypes[a.codec_dtype or codec_dtype_for(a.dtype)]
    attn = a.attn or "sdpa"
    if a.impl:
        from impl import Qwen3TTS

        return Qwen3TTS.from_pretrained(ck, device=a.device, dtype=dtypes[a.dtype], attn=attn, codec_dtype=codec)
    from .upstream import load_upstream

    return load_upstream(ck, device=a.device, dtype=dtypes[a.dtype], attn=attn, codec_dtype=codec)


def _warn_nonfinite(path: str | Path) -> None:
    """Say loudly (stderr) when a written reference holds NaN/Inf taps: weights were checked before the run, so
    these come from the computation itself (e.g. upstream's codec overflowing in bf16), and they are a finding,
    not a reference to compare against silently."""
    import h5py

    bad: list[str] = []
    total = [0]

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset) and name.startswith("taps/"):
            total[0] += 1
            if not bool(obj.attrs.get("finite", True)):
                bad.append(name[len("taps/"):])

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    if bad:
        print(f"warning: {path}: {len(bad)} of {total[0]} tap datasets hold NaN/Inf (first: {bad[0]}); "
              "this reference is not finite", file=sys.stderr)


def _check_capture_args(a: argparse.Namespace) -> str:
    """Everything ``capture`` can check before loading upstream, each failure one line naming the file or value:
    the case exists, the device exists, ``--out`` can be written (a symlink is followed; a folder, device or
    other non-regular file is refused: the atomic rename would replace it), and the checkpoint's configs parse and
    its weights are readable, finite and not blanked (a reference captured on NaN weights is NaN throughout).
    Returns the path to write (symlinks resolved)."""
    from impl.config import Qwen3TTSConfig, SpeechTokenizerConfig
    from impl.loading import CheckpointError, read_state_dict
    from impl.model import resolve_device
    from impl.outfile import OutputError, check_output

    from .cases import get_case

    get_case(a.case)
    resolve_device(a.device)
    target, through = check_output(a.out)
    if through:
        raise OutputError(f"{a.out}: not a regular file; a reference is written atomically to a regular file")
    ck = Path(a.checkpoint)
    if not ck.is_dir():
        raise CheckpointError(f"{ck}: not a checkpoint folder")
    Qwen3TTSConfig.from_file(ck / "config.json")
    SpeechTokenizerConfig.from_file(ck / "speech_tokenizer" / "config.json")
    for folder in (ck, ck / "speech_tokenizer"):
        read_state_dict(folder)  # one read per tensor: truncation, NaN/Inf and all-zero matrices raise here
    return str(target)


if __name__ == "__main__":
    sys.exit(main())
