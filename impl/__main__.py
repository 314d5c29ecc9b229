"""``python -m impl synthesize --model PATH --text ... --out out.wav``: the public API from a shell.

Modes follow the checkpoint (CustomVoice: ``--speaker``; VoiceDesign: ``--instruct``; Base: ``--ref-audio``
with ``--ref-text`` for ICL or ``--x-vector-only``). Prints one line per item: frames, stop reason, seconds.
Generation shows ``generating: done/budget frames`` on stderr: at once on a terminal, otherwise (a log, a pipe)
only once it has run ``PROGRESS_DELAY_S`` seconds. Warnings (a budget far from what the text warrants, a dropped
instruct) are one ``warning:`` line each on stderr, before generation starts.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
# Off a terminal, the progress line appears only after this many seconds of generation (short runs and tests stay
# quiet); on a terminal it shows at once.
PROGRESS_DELAY_S = 5.0


class UsageError(Exception):
    """A command-line mistake argparse found (unknown flag, ``--seed abc``): one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one ``error:`` line (argparse's own message, which names the argument and the
    value) instead of the usage block; ``--help`` still prints the usage."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m impl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    # Listed here for --help; main() hands ``bench`` to impl.bench, which owns its arguments.
    sub.add_parser("bench", add_help=False, help="speed: our engine on one folder (python -m impl bench --help; "
                                                      "ours vs upstream: python -m reference_export bench)")
    s = sub.add_parser("synthesize", help="text -> 24 kHz wav")
    s.add_argument("--model", required=True, help="checkpoint folder (config.json, model.safetensors, ...)")
    s.add_argument("--text", required=True, action="append", help="text to speak (repeat for a batch)")
    s.add_argument("--out", required=True, help="output wav (a batch writes out_0.wav, out_1.wav, ...)")
    s.add_argument("--mode", choices=["custom_voice", "voice_design", "voice_clone"], default=None,
                   help="default: what the checkpoint serves")
    s.add_argument("--speaker", default=None, help="CustomVoice speaker (e.g. ryan)")
    s.add_argument("--language", default="auto")
    s.add_argument("--instruct", default=None, help="style instruction (VoiceDesign; CustomVoice 1.7B)")
    s.add_argument("--ref-audio", default=None, help="Base: reference audio file")
    s.add_argument("--ref-text", default=None, help="Base ICL: transcript of the reference audio")
    s.add_argument("--x-vector-only", action="store_true", help="Base: speaker embedding only (no ICL)")
    s.add_argument("--non-streaming-text", choices=["true", "false"], default=None,
                   help="feed the whole text up front (default per mode, as upstream)")
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--max-new-frames", type=int, default=None)
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--repetition-penalty", type=float, default=None)
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="language-model precision")
    s.add_argument("--codec-dtype", choices=sorted(DTYPES), default="float32",
                   help="codec precision (fp32 default: upstream's codec overflows in bf16)")
    s.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa")
    s.add_argument("--fast", choices=["eager", "compile", "cudagraph", "compile-cudagraph"], default=None,
                   help="greedy generation on the static decode step (impl.fast_decode; needs --greedy)")
    s.add_argument("--linear", choices=["aten", "onednn"], default="aten",
                   help="talker matmul kernel: aten (upstream's, bit-exact) or onednn (CPU float32: faster decode, "
                        "equal to rounding only)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C: one line and the conventional 128 + SIGINT; outputs are written atomically, so nothing is partial.
        print("interrupted (no output written or changed)", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():  # restored afterwards: in-process callers keep their own warning display
            warnings.showwarning = _show_warning
            return _synthesize(args)
    except (ValueError, OSError, NotImplementedError, KeyError, RuntimeError) as e:
        # Config, checkpoint, prompt and audio errors are subclasses of these; each names the file, key or value.
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one ``warning:`` line on stderr, at once (not the two-line file:line form)."""
    print(f"warning: {_one_line(message) if isinstance(message, BaseException) else message}", file=sys.stderr)


def _one_line(e: BaseException) -> str:
    """The first line of an error (torch and libsndfile messages can run to many lines)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _check_utf8(flag: str, t: str) -> None:
    """A command-line value with bytes that are not UTF-8 arrives as lone surrogates: name it here, not in the
    tokenizer (which fails with a TypeError)."""
    try:
        t.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = t.encode("utf-8", "surrogateescape")[len(t[: e.start].encode("utf-8"))]
        raise ValueError(f"{flag} is not valid UTF-8 (byte 0x{bad:02x} at character {e.start})") from None


def _check_text_args(texts: list[str]) -> None:
    from .model import blank_text_error, is_blank

    for i, t in enumerate(texts):
        _check_utf8(f"--text #{i + 1}", t)
        if is_blank(t):  # whitespace, or zero-width / invisible characters only
            raise ValueError(blank_text_error(t, f"--text #{i + 1}"))


def _synthesize(args: argparse.Namespace) -> int:
    import numpy as np
    import soundfile as sf
    import torch

    from .model import Qwen3TTS
    from .outfile import check_output, write_bytes

    # Everything the user typed is checked before the model loads: text, output paths (writable, not a folder).
    _check_text_args(args.text)
    for flag, value in (("--instruct", args.instruct), ("--ref-text", args.ref_text)):
        if value is not None:
            _check_utf8(flag, value)
    out = Path(args.out)
    n = len(args.text)
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]
    for path in paths:
        check_output(path)
    from .sampling import check_sampling_value, check_seed

    check_seed(args.seed)
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):  # ranges: before the model loads
        if getattr(args, name) is not None:
            check_sampling_value(name, getattr(args, name))
    if args.max_new_frames is not None and args.max_new_frames < 1:
        raise ValueError(f"max_new_frames {args.max_new_frames} is out of range: must be >= 1")
    if args.ref_audio is not None and "://" not in args.ref_audio and not Path(args.ref_audio).is_file():
        raise ValueError(f"--ref-audio {args.ref_audio}: file not found")  # before the model loads, not after
    t0 = time.time()
    tts = Qwen3TTS.from_pretrained(args.model, device=args.device, dtype=getattr(torch, DTYPES[args.dtype]),
                                   codec_dtype=getattr(torch, DTYPES[args.codec_dtype]),
                                   attn=args.attn, fast=args.fast, linear=args.linear)
    _ = tts.codec  # load (and check) the codec now: a broken one must fail before the generation, not after it
    sampling = {k: v for k, v in dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      repetition_penalty=args.repetition_penalty).items() if v is not None}
    nst = None if args.non_streaming_text is None else args.non_streaming_text == "true"
    texts = args.text if len(args.text) > 1 else args.text[0]
    t1 = time.time()
    from .progress import ProgressLine

    tty = sys.stderr.isatty()
    with ProgressLine(sys.stderr, delay=0.0 if tty else PROGRESS_DELAY_S, tty=tty) as progress:
        res = tts.generate_codes(texts, mode=args.mode, speaker=args.speaker, language=args.language,
                                 instruct=args.instruct, ref_audio=args.ref_audio, ref_text=args.ref_text,
                                 x_vector_only=args.x_vector_only, non_streaming_text=nst, greedy=args.greedy,
                                 seed=args.seed, max_new_frames=args.max_new_frames, progress=progress, **sampling)
    t2 = time.time()
    wavs = tts.decode(res)  # raises on NaN/Inf audio: nonsense never reaches a file
    for i, (w, path) in enumerate(zip(wavs, paths)):
        # Rendered in memory, then written atomically (or through, for /dev/null and FIFOs): impl.outfile.
        buf = io.BytesIO()
        sf.write(buf, np.asarray(w, dtype=np.float32), 24000, subtype="FLOAT", format="WAV")
        write_bytes(path, buf.getvalue())
        print(f"{path}: {res.codes[i].shape[0]} frames, {len(w) / 24000:.2f} s audio, stop={res.stop_reason[i]}")
        if res.stop_reason[i] == "budget":
            why = "--max-new-frames" if args.max_new_frames is not None else "the default budget from the text length"
            print(f"warning: {path}: stop=budget: no end of speech within {res.codes[i].shape[0]} frames ({why}); "
                  "the audio may be cut short", file=sys.stderr)
    print(f"load {t1 - t0:.1f} s, generate {t2 - t1:.1f} s, decode {time.time() - t2:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
