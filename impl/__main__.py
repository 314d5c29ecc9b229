"""``python -m impl synthesize --model PATH --text ... --out out.wav``: the public API from a shell.

Modes follow the checkpoint (CustomVoice: ``--speaker``; VoiceDesign: ``--instruct``; Base: ``--ref-audio``
with ``--ref-text`` for ICL or ``--x-vector-only``). Prints one line per item: frames, stop reason, seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m impl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _synthesize(args)
    except (ValueError, FileNotFoundError, NotImplementedError, KeyError, RuntimeError) as e:
        # Config, checkpoint, prompt and audio errors are subclasses of these; each names the file, key or value.
        print(f"error: {e}", file=sys.stderr)
        return 2


def _synthesize(args: argparse.Namespace) -> int:
    import numpy as np
    import soundfile as sf
    import torch

    from .model import Qwen3TTS

    t0 = time.time()
    tts = Qwen3TTS.from_pretrained(args.model, device=args.device, dtype=getattr(torch, DTYPES[args.dtype]),
                                   codec_dtype=getattr(torch, DTYPES[args.codec_dtype]),
                                   attn=args.attn)
    sampling = {k: v for k, v in dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      repetition_penalty=args.repetition_penalty).items() if v is not None}
    nst = None if args.non_streaming_text is None else args.non_streaming_text == "true"
    texts = args.text if len(args.text) > 1 else args.text[0]
    t1 = time.time()
    res = tts.generate_codes(texts, mode=args.mode, speaker=args.speaker, language=args.language,
                             instruct=args.instruct, ref_audio=args.ref_audio, ref_text=args.ref_text,
                             x_vector_only=args.x_vector_only, non_streaming_text=nst, greedy=args.greedy,
                             seed=args.seed, max_new_frames=args.max_new_frames, **sampling)
    t2 = time.time()
    wavs = tts.decode(res)
    out = Path(args.out)
    paths = [out] if len(wavs) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(wavs))]
    for i, (w, path) in enumerate(zip(wavs, paths)):
        # Write beside the target and rename: an interrupted run leaves no partial file, never clobbers half.
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            sf.write(str(tmp), np.asarray(w, dtype=np.float32), 24000, subtype="FLOAT", format="WAV")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"{path}: {res.codes[i].shape[0]} frames, {len(w) / 24000:.2f} s audio, stop={res.stop_reason[i]}")
    print(f"load {t1 - t0:.1f} s, generate {t2 - t1:.1f} s, decode {time.time() - t2:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
