"""Loading Hugging Face-layout checkpoint folders into ``impl`` modules, strictly.

A checkpoint folder holds ``config.json``, ``model.safetensors`` (or sharded ``model-0000x-of-0000y.safetensors``
with ``model.safetensors.index.json``), ``generation_config.json``, the text tokenizer files and
``speech_tokenizer/{config.json, preprocessor_config.json, model.safetensors}``.

``impl`` modules are named exactly like the checkpoint keys, so loading is one ``load_state_dict(strict=True)``
per sub-tree. Where a name must differ, ``KEY_MAP`` (one declarative table of regex → replacement) says so; it is
empty today. Every failure is one line naming the file and the key(s) at fault.

Values are checked as they are read, with one reduction per tensor (``torch.aminmax``): a floating tensor holding
NaN or Inf, or a weight matrix (2-D or more) that is all zeros, raises instead of loading. Such weights produce
audio without a word otherwise (NaN logits make the greedy loop pick code 0 forever; NaN codec weights write a
wav of NaN). An integer tensor where the model holds a floating parameter raises in :func:`load_into`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint folder or file that does not match the model being built."""


# checkpoint key regex -> impl key. Unknown keys are never dropped: they raise.
KEY_MAP: list[tuple[str, str]] = []


def map_key(key: str) -> str:
    for pat, rep in KEY_MAP:
        key2, n = re.subn(pat, rep, key)
        if n:
            return key2
    return key


def weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a folder: single file or the shards named by the index."""
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return [folder / n for n in names]
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def weight_keys(f: Path) -> list[str]:
    """The tensor names of one safetensors file; a truncated, empty or foreign file raises one line."""
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (or not a regular file)")
    try:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            return list(sf.keys())
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def check_values(t: torch.Tensor, key: str, where: str | Path) -> None:
    """Raise ``CheckpointError`` if floating ``t`` holds NaN/Inf, or is a weight matrix (ndim >= 2) of all zeros.

    One ``aminmax`` reduction: NaN propagates into it, and min == max == 0 means all zeros. Integer tensors pass
    (their dtype is judged against the module's in :func:`load_into`)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    lo_f, hi_f = float(lo), float(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        n_nan = int(torch.isnan(t).sum())  # only on the error path: say what kind
        n_inf = int(torch.isinf(t).sum())
        raise CheckpointError(f"{where}: key {key} holds non-finite values ({n_nan} NaN, {n_inf} Inf of "
                              f"{t.numel()}); refusing to load it")
    if t.ndim >= 2 and lo_f == 0.0 and hi_f == 0.0:
        raise CheckpointError(f"{where}: key {key} {tuple(t.shape)} is all zeros; refusing to load it "
                              "(an untrained or blanked weight)")


def read_state_dict(folder: str | Path, prefix: str = "", device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors whose key starts with ``prefix`` (prefix stripped), mapped through ``KEY_MAP``.

    Floating tensors are cast to ``dtype`` when given; integer buffers keep theirs.
    """
    folder = Path(folder)
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        if not f.exists():
            raise CheckpointError(f"{f}: weight shard named by the index is missing")
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    if not key.startswith(prefix):
                        continue
                    t = sf.get_tensor(key)
                    check_values(t, key, f)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[map_key(key[len(prefix):])] = t.to(device)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {_first_line(e)})") from None
    return out


def load_into(module: nn.Module, state: dict[str, torch.Tensor], where: str, prefix: str = "") -> None:
    """``module.load_state_dict(state, strict=True)`` with one-line errors naming file, key and shapes.

    Non-persistent buffers (RoPE tables) are not expected in ``state``.
    """
    expected = module.state_dict()
    # Shapes of the keys both sides hold first: a changed size in config.json (hidden_size) also changes which
    # modules exist (a projection appears), and "missing key" would blame the wrong thing.
    for k, t in expected.items():
        if k in state and tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{where}: key {prefix}{k} has shape {tuple(state[k].shape)}, model expects {tuple(t.shape)} "
                "(does config.json match these weights?)")
        if k in state and t.is_floating_point() and not state[k].is_floating_point():
            raise CheckpointError(f"{where}: key {prefix}{k} is {str(state[k].dtype).replace('torch.', '')}, "
                                  "model expects a floating-point tensor")
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {_few(prefix, missing)} for {type(module).__name__}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected key(s) {_few(prefix, unexpected)} (not in {type(module).__name__})")
    module.load_state_dict(state, strict=True)


def _few(prefix: str, keys: list[str], n: int = 5) -> str:
    shown = ", ".join(prefix + k for k in keys[:n])
    return f"[{shown}{', …' if len(keys) > n else ''}] ({len(keys)} in all)"
