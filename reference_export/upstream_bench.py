"""The upstream half of ``python -m reference_export bench``: upstream ``qwen-tts`` timed through its own public wrapper.

``impl`` never imports ``qwen_tts`` or ``transformers``; the benchmark needs upstream in the same process (same
folder, same text, same machine state), so :mod:`reference_export.bench` imports this module lazily and only when upstream is
measured. As the issue asks, upstream loads with ``Qwen3TTSModel.from_pretrained(folder, device_map=..., dtype=...)``
and runs ``generate_custom_voice`` / ``generate_voice_design``; ``model.generate`` (talker + code predictor) is timed
on its own through a thin wrapper around the bound method, separately from the codec decode that follows it.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .upstream import UPSTREAM_VERSION, install_standins


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_upstream(folder: str | Path, *, device: str, dtype: torch.dtype, mode: str, texts: list[str],
                  speaker: str | None, instruct: str | None, language: str, max_new_tokens: int, warmup: int,
                  repeats: int, peak_memory, profile=None) -> dict[str, Any]:
    """Load upstream from ``folder`` and time ``repeats`` greedy generations (after ``warmup`` untimed ones).

    ``peak_memory`` is :class:`impl.bench.PeakMemory` (a context manager measuring the peak over its body) and
    ``profile`` :func:`impl.bench.profile_frames` or None, passed in so both sides are measured the same way. Returns medians in seconds, the codes of the last run (a list of
    (F_i, 16) CPU tensors) and the peak memory in GB, load included.
    """
    install_standins()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers
        from qwen_tts.inference.qwen3_tts_model import Qwen3TTSModel
    transformers.logging.set_verbosity_error()

    with peak_memory(device) as mem:
        if importlib.util.find_spec("accelerate") is not None:
            wrapper = Qwen3TTSModel.from_pretrained(str(folder), device_map=device, dtype=dtype,
                                                    attn_implementation="sdpa")
            how = f"Qwen3TTSModel.from_pretrained(device_map={device!r}, dtype={dtype})"
        else:
            # transformers needs ``accelerate`` for any device_map, and the lock leaves it out (upstream never
            # imports it otherwise): load on CPU, then move the model; the wrapper reads its device from the model.
            wrapper = Qwen3TTSModel.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
            wrapper.model.to(device)
            wrapper.device = torch.device(device)
            st = wrapper.model.speech_tokenizer  # a plain wrapper object (not a submodule): moved by hand
            if st is not None and getattr(st, "model", None) is not None:
                st.model.to(device)
                st.device = torch.device(device)
            how = f"Qwen3TTSModel.from_pretrained(dtype={dtype}) then .to({device!r}) (accelerate absent)"
        inner = wrapper.model.generate
        timing: dict[str, Any] = {}

        def timed_generate(*args, **kwargs):
            _sync(device)
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            _sync(device)
            timing["generate_s"] = time.perf_counter() - t0
            timing["codes"] = [c.detach().cpu() for c in out[0]]
            return out

        wrapper.model.generate = timed_generate  # instance attribute shadows the method; nothing else changes
        kw = dict(language=language, max_new_tokens=max_new_tokens, do_sample=False, subtalker_dosample=False,
                  non_streaming_mode=True)
        if mode == "custom_voice":
            def call():
                return wrapper.generate_custom_voice(texts, speaker=speaker, instruct=instruct, **kw)
        elif mode == "voice_design":
            def call():
                return wrapper.generate_voice_design(texts, instruct=instruct or "", **kw)
        else:
            raise ValueError(f"bench: upstream timing supports custom_voice and voice_design checkpoints, not {mode!r}")
        gen, total = [], []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                _sync(device)
                t0 = time.perf_counter()
                call()
                _sync(device)
                if i >= warmup:
                    total.append(time.perf_counter() - t0)
                    gen.append(timing["generate_s"])
        codes = timing["codes"]
        peak = mem.peak_so_far_gb()  # before the profiled run: the profiler's own memory stays out
        prof = None
        if profile is not None:  # impl.bench.profile_frames(fn, device, frames): one more run, under the profiler
            with torch.inference_mode():
                prof = profile(call, torch.device(device), max(int(c.shape[0]) for c in codes))
        wrapper.model.generate = inner  # the wrapper (and its weights) go when this function returns
    return {"generate_s": statistics.median(gen), "generate_s_all": gen, "total_s": statistics.median(total),
            "decode_s": statistics.median(total) - statistics.median(gen), "codes": codes,
            "peak_mem_gb": peak, "version": UPSTREAM_VERSION, "loaded_with": how, "profile": prof}
