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
from collections.abc import Callable
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


# safetensors dtype names -> torch dtypes, for reading tensor bytes straight into anonymous memory.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


_CHECK_CHUNK = 1 << 24  # bytes: the bounded buffer a mapped tensor's values are checked through


def _map_file(f: Path) -> torch.UntypedStorage:
    """A private (copy-on-write) mapping of the whole file: pages are read when first touched, and a write to a
    tensor on it (a test mutating a weight) copies that page without changing the file."""
    return torch.UntypedStorage.from_file(str(f), shared=False, nbytes=f.stat().st_size)


def _check_streamed(fh, offset: int, nbytes: int, dt: torch.dtype, mapped: torch.Tensor, key: str,
                    where: Path) -> None:
    """:func:`check_values` on a tensor's bytes read through one bounded buffer (``_CHECK_CHUNK``), so checking a
    mapped tensor never makes its pages resident. The error path hands the mapped tensor to :func:`check_values`
    for the exact message (NaN/Inf counts, the all-zero shape)."""
    if not dt.is_floating_point or nbytes == 0:
        return
    item = torch.empty((), dtype=dt, device="cpu").element_size()
    chunk = max(item, _CHECK_CHUNK // item * item)
    buf = torch.empty(min(chunk, nbytes), dtype=torch.uint8, device="cpu")
    fh.seek(offset)
    done, finite, all_zero = 0, True, True
    while done < nbytes:
        n = min(chunk, nbytes - done)
        got = fh.readinto(buf[:n].numpy())
        if got != n:
            raise CheckpointError(f"{where}: key {key} is truncated ({done + got} of {nbytes} bytes)")
        lo, hi = torch.aminmax(buf[:n].view(dt))
        lo_f, hi_f = float(lo), float(hi)
        finite = finite and math.isfinite(lo_f) and math.isfinite(hi_f)
        all_zero = all_zero and lo_f == 0.0 and hi_f == 0.0
        done += n
    if not finite or (mapped.ndim >= 2 and all_zero):
        check_values(mapped, key, where)  # raises, with the counts


def _read_tensors(f: Path, prefix: str, map_dtypes: frozenset[torch.dtype] | None = None,
                  map_key_ok: Callable[[str], bool] | None = None):
    """Yield (key, tensor, checked) of one safetensors file for keys starting with ``prefix``.

    A tensor whose stored dtype is in ``map_dtypes``, whose key passes ``map_key_ok`` (if given) and whose bytes
    sit at an offset aligned to its element size (as the safetensors writer pads them) is a view of a private mapping of the file (:func:`_map_file`),
    as upstream's loader (transformers) leaves its CPU weights: a page becomes resident only when the model first
    reads it, so the rows of the 151k-entry text embedding a run never looks up cost no memory (the model
    loaders map only lookup tables: :func:`gathered_keys`). Its values are
    checked here, through a bounded buffer (``checked`` is True). Any other tensor is read with a plain
    ``readinto`` into its own CPU tensor (process memory, one tensor at a time); the caller checks it.

    Not ``safe_open(...).get_tensor``: its views of safetensors' own mapping made every page the NaN check or a
    copy touched resident while any tensor of the file lived (loading held the checkpoint twice: 7.4 GB peak for
    3.6 GB of 0.6B weights). ``safe_open`` still validates the header first, so a truncated or foreign file
    raises its one line. A mapped weight reads what the file holds: rewriting the file in place while the model
    lives changes it (a shorter file: SIGBUS), as with upstream; ``mmap=False`` at load opts out."""
    import struct

    with safe_open(str(f), framework="pt", device="cpu") as sf:
        keys = [k for k in sf.keys() if k.startswith(prefix)]
    storage = None
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        base = 8 + n
        for key in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):  # sequential reads
            info = header[key]
            start, end = info["data_offsets"]
            dt = _ST_DTYPES.get(info["dtype"])
            if dt is None:  # an exotic dtype (fp8 ...): let safetensors decode it, then own the memory
                with safe_open(str(f), framework="pt", device="cpu") as sf:
                    yield key, sf.get_tensor(key).clone(), False
                continue
            item = torch.empty((), dtype=dt, device="cpu").element_size()
            if (map_dtypes is not None and dt in map_dtypes and end > start and (base + start) % item == 0
                    and (map_key_ok is None or map_key_ok(key))):
                if storage is None:
                    storage = _map_file(f)
                if base + end > storage.nbytes():
                    raise CheckpointError(f"{f}: key {key} is truncated ({storage.nbytes() - base - start} of "
                                          f"{end - start} bytes)")
                mapped = torch.empty(0, dtype=torch.uint8, device="cpu").set_(storage, base + start, (end - start,))
                mapped = mapped.view(dt).reshape(info["shape"])
                _check_streamed(fh, base + start, end - start, dt, mapped, key, f)
                yield key, mapped, True
                continue
            buf = torch.empty(end - start, dtype=torch.uint8, device="cpu")
            fh.seek(base + start)
            got = fh.readinto(buf.numpy()) if end > start else 0
            if got != end - start:
                raise CheckpointError(f"{f}: key {key} is truncated ({got} of {end - start} bytes)")
            yield key, buf.view(dt).reshape(info["shape"]), False


def read_state_dict(folder: str | Path, prefix: str = "", device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None,
                    mmap: bool | Callable[[str], bool] = True) -> dict[str, torch.Tensor]:
    """All tensors whose key starts with ``prefix`` (prefix stripped), mapped through ``KEY_MAP``.

    Each tensor is checked (:func:`check_values`: NaN/Inf, all-zero matrices) and cast to ``dtype`` when given
    (floating tensors only; integer buffers keep theirs), one at a time: the transient is one tensor, never a
    second copy of the checkpoint. With ``mmap`` (the default) on the CPU, a tensor the cast leaves unchanged is a
    view of a private mapping of the file (see :func:`_read_tensors`); ``mmap`` may be a predicate on the
    (stripped, mapped) key saying which. Otherwise, and on any other device, a tensor is read into process memory
    and moved to ``device``.
    """
    folder = Path(folder)
    device = torch.device(device)
    map_dtypes = map_key_ok = None
    if callable(mmap):
        map_key_ok = lambda key: mmap(map_key(key[len(prefix):]))  # noqa: E731
    if mmap and device.type == "cpu":
        map_dtypes = frozenset(_ST_DTYPES.values()) if dtype is None else frozenset(
            {dtype, *(d for d in _ST_DTYPES.values() if not d.is_floating_point)})
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        if not f.exists():
            raise CheckpointError(f"{f}: weight shard named by the index is missing")
        try:
            for key, t, checked in _read_tensors(f, prefix, map_dtypes, map_key_ok):
                if not checked:
                    t = t.to(device)  # the check runs where the tensor will live (fast on a GPU)
                    check_values(t, key, f)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[map_key(key[len(prefix):])] = t
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {_first_line(e)})") from None
    return out


def load_into(module: nn.Module, state: dict[str, torch.Tensor], where: str, prefix: str = "") -> None:
    """``module.load_state_dict(state, strict=True)`` with one-line errors naming file, key and shapes.

    Non-persistent buffers (RoPE tables) are not expected in ``state``. A module built on ``meta`` (see
    :func:`load_module`) takes the tensors of ``state`` themselves (``assign=True``: no second copy); a module with
    real storage gets them copied in.
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
    module.load_state_dict(state, strict=True, assign=_on_meta(module))


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` on the ``meta`` device: shapes only, no storage, no random init of weights to be replaced."""
    with torch.device("meta"):
        return factory()


def finish_loaded(module: nn.Module, device: str | torch.device, where: str) -> nn.Module:
    """After :func:`load_into` on a meta-built module: create what the checkpoint does not hold (non-persistent
    buffers such as RoPE tables, recomputed by their module's ``_apply`` on ``to_empty``), on ``device``; eval mode.
    A meta tensor left on a module that cannot recompute it raises: it would run uninitialised."""
    device = torch.device(device)
    for name, m in module.named_modules():
        left = [n for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)] if t.is_meta]
        if not left:
            continue
        if type(m)._apply is nn.Module._apply:
            raise CheckpointError(f"{where}: {name + '.' if name else ''}{left[0]} is in no checkpoint key and "
                                  f"{type(m).__name__} cannot recompute it")
        m.to_empty(device=device, recurse=False)  # e.g. RotaryEmbedding._apply recomputes inv_freq in fp32
    return module.eval()


def gathered_keys(module: nn.Module) -> set[str]:
    """The state-dict keys of ``module``'s lookup tables (``nn.Embedding`` weights): the tensors the loaders map
    from the file (``mmap``). A table is read a few rows at a time, so its untouched rows (most of the 151k-row
    text embedding) never become resident. Weights a matmul reads are not mapped: a matmul reads them whole every
    step (mapping saves nothing), and at the file's 8-byte alignment MKL's GEMM rounds differently from the
    64-byte-aligned copy upstream multiplies (measured: prompt embeddings 2.4e-7 off upstream's, 0 when read)."""
    return {f"{name}.weight" if name else "weight" for name, m in module.named_modules()
            if isinstance(m, nn.Embedding)}


def load_module(factory: Callable[[], nn.Module], folder: str | Path, prefix: str, device: str | torch.device,
                dtype: torch.dtype, where: str | None = None, mmap: bool = True) -> nn.Module:
    """The one loader recipe (talker, speaker encoder, codec): build on ``meta`` -> read the checkpoint's
    ``prefix`` tensors (checked: NaN/Inf, all-zero matrices) on ``device`` in ``dtype`` -> strict
    :func:`load_into` (names, shapes, integer-for-float; one-line errors naming file and key) taking those tensors
    as the parameters -> :func:`finish_loaded`. Peak memory: the weights once, plus one tensor in flight; with
    ``mmap`` on the CPU in the file's dtype, only the table rows the model looks up (:func:`gathered_keys`)."""
    module = build_on_meta(factory)
    where = where or str(weight_files(Path(folder))[0])
    state = read_state_dict(folder, prefix=prefix, device=device, dtype=dtype,
                            mmap=gathered_keys(module).__contains__ if mmap else False)
    load_into(module, state, where, prefix=prefix)
    del state
    return finish_loaded(module, device, where)


def _few(prefix: str, keys: list[str], n: int = 5) -> str:
    shown = ", ".join(prefix + k for k in keys[:n])
    return f"[{shown}{', …' if len(keys) > n else ''}] ({len(keys)} in all)"
