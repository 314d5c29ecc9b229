"""The reference HDF5 file: writer and reader (schema version ``SCHEMA_VERSION``).

Layout::

    /                     attrs: schema_version, created, harness_git_sha, versions (JSON), device, dtype, attn,
                                 seed, preset, variant, checkpoint_sha256, case_name
    /case                 attrs: the case's settings (JSON-able values; lists/dicts as JSON strings)
    /inputs/<name>        input arrays
    /taps/<module path>/<point>          a dataset when the point was recorded once;
    /taps/<module path>/<point>/step_00012   a group of datasets when recorded per call (numbered by call
                                         order); each dataset's ``step`` attr is the decode step: the index of
                                         the talker forward it ran in (0 = prefill), 0 outside generation

Every tap dataset keeps its exact dtype (bf16 is stored as its raw 16-bit pattern, uint16, with attr
``torch_dtype = "bfloat16"``) and carries attrs shape, dtype, mean, std, absmax, finite, step.
Writes go to a temporary file in the same folder, renamed into place on success: a failed capture leaves no
partial file and never replaces a good one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from impl.outfile import atomic_path, check_free_space

SCHEMA_VERSION = 1


class ReferenceError_(Exception):
    """A reference file that is missing, of another schema, or for another checkpoint."""


def _to_numpy(t: torch.Tensor | np.ndarray) -> tuple[np.ndarray, str]:
    if isinstance(t, np.ndarray):
        return t, str(t.dtype)
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy(), "bfloat16"
    return t.numpy(), str(t.dtype).replace("torch.", "")


def _from_numpy(a: np.ndarray, torch_dtype: str | None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if torch_dtype == "bfloat16":
        return t.view(torch.bfloat16)
    return t


STATS_CHUNK = 1 << 20  # elements per float64 block in :func:`_stats`


def _stats(t: torch.Tensor) -> dict[str, Any]:
    """mean, std (unbiased), absmax and finite of ``t``, accumulated in float64 over blocks of ``STATS_CHUNK``
    elements: memory stays at one 8 MB block whatever the tap's size (a whole-tensor float64 copy, and its ``abs()``,
    cost 4x a large fp32 codec tap, 8x a bf16 one, at the peak of a released-size capture)."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return {"mean": 0.0, "std": 0.0, "absmax": 0.0, "finite": True}
    total, finite = 0.0, True
    absmax = torch.zeros((), dtype=torch.float64)
    for i in range(0, n, STATS_CHUNK):
        c = flat[i:i + STATS_CHUNK].to(torch.float64)
        total += float(c.sum())
        absmax = torch.maximum(absmax, c.abs().max())  # a NaN propagates, as in a whole-tensor max
        finite = finite and bool(torch.isfinite(c).all())
    mean, absmax = total / n, float(absmax)
    if n == 1:
        return {"mean": mean, "std": 0.0, "absmax": absmax, "finite": finite}
    sq = 0.0
    for i in range(0, n, STATS_CHUNK):
        c = flat[i:i + STATS_CHUNK].to(torch.float64)
        sq += float(((c - mean) ** 2).sum())
    return {"mean": mean, "std": (sq / (n - 1)) ** 0.5, "absmax": absmax, "finite": finite}


def _attr(v: Any) -> Any:
    if v is None:
        return "null"
    if isinstance(v, str):
        return str(v)  # plain str (TorchVersion and other str subclasses confuse h5py)
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return v


def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    return int(np.asarray(v).nbytes)


def write_refs(path: str | Path, *, meta: dict[str, Any], case: dict[str, Any],
               inputs: dict[str, torch.Tensor | np.ndarray], records: dict[str, list[torch.Tensor]],
               steps: dict[str, list[int]] | None = None, progress: bool = True) -> Path:
    """Write one case's references atomically; return the path."""
    from tqdm import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = steps or {}
    # The size is known before the first byte: the tensors, + 4 kB per dataset of attributes and HDF5 structure. A
    # full disk is refused here, not met halfway through the file.
    arrays = [*inputs.values(), *(t for ts in records.values() for t in ts)]
    check_free_space(path, sum(_nbytes(v) + 4096 for v in arrays) + 65536, "the reference file")
    # Atomic (impl/outfile.py): a temporary file beside ``path``, renamed on success; on any failure (a full disk
    # part-way, Ctrl-C, SIGTERM) it is removed and an old ``path`` is kept byte for byte. h5py's own multi-line
    # OSError becomes one ``OutputError`` line naming ``path``.
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        for k, v in meta.items():
            f.attrs[k] = _attr(v)
        g = f.create_group("case")
        for k, v in case.items():
            g.attrs[k] = _attr(v)
        gi = f.create_group("inputs")
        for k, v in inputs.items():
            arr, dt = _to_numpy(v if isinstance(v, (np.ndarray, torch.Tensor)) else np.asarray(v))
            ds = gi.create_dataset(k, data=arr)
            ds.attrs["torch_dtype"] = dt
        gt = f.create_group("taps")
        # ``order``: position of the tap's first record in execution order (records keep insertion order),
        # so a reader can name the first tap where two runs diverge.
        for order, (name, tensors) in enumerate(tqdm(list(records.items()), desc=f"write {path.name}",
                                                     disable=not progress, leave=False)):
            module, point = name.rsplit(":", 1)
            grp = gt.require_group(module)
            st = steps.get(name, [0] * len(tensors))
            if len(tensors) == 1:
                _write_tensor(grp, point, tensors[0], st[0]).attrs["order"] = order
            else:
                sub = grp.create_group(point)
                sub.attrs["order"] = order
                for i, t in enumerate(tensors):
                    _write_tensor(sub, f"step_{i:05d}", t, st[i])
    return path


def _write_tensor(grp: h5py.Group, name: str, t: torch.Tensor, step: int) -> h5py.Dataset:
    arr, dt = _to_numpy(t)
    ds = grp.create_dataset(name, data=arr)
    ds.attrs.update({"shape": list(t.shape), "dtype": dt, "torch_dtype": dt, "step": step, **_stats(t)})
    return ds


class RefFile:
    """Read a reference file. Raises ``ReferenceError_`` with the file name on any mismatch or absence."""

    def __init__(self, path: str | Path, expect_checkpoint_sha256: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise ReferenceError_(f"{self.path}: reference file not found")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise ReferenceError_(f"{self.path}: not a readable HDF5 file ({e})") from None
        v = _decode_attr(self._f.attrs.get("schema_version"))
        if v != SCHEMA_VERSION:
            raise ReferenceError_(f"{self.path}: schema_version {v!r}, this harness reads {SCHEMA_VERSION}")
        for grp in ("case", "inputs", "taps"):
            if grp not in self._f:
                raise ReferenceError_(f"{self.path}: missing group /{grp}")
        if expect_checkpoint_sha256 is not None:
            got = self._f.attrs.get("checkpoint_sha256")
            if got != expect_checkpoint_sha256:
                raise ReferenceError_(
                    f"{self.path}: captured from checkpoint {str(got)[:12]}…, but the checkpoint under test is "
                    f"{expect_checkpoint_sha256[:12]}… (re-capture it)")

    def close(self) -> None:
        self._f.close()

    @property
    def meta(self) -> dict[str, Any]:
        return {k: _decode_attr(v) for k, v in self._f.attrs.items()}

    @property
    def case(self) -> dict[str, Any]:
        return {k: _decode_attr(v) for k, v in self._f["case"].attrs.items()}

    def input(self, name: str) -> torch.Tensor:
        if name not in self._f["inputs"]:
            raise ReferenceError_(f"{self.path}: no input {name!r} (has {sorted(self._f['inputs'])})")
        ds = self._f["inputs"][name]
        return _from_numpy(ds[()], ds.attrs.get("torch_dtype"))

    def inputs(self) -> list[str]:
        return sorted(self._f["inputs"])

    def names(self) -> list[str]:
        out = []
        for module, grp in self._f["taps"].items():
            for point in grp:
                out.append(f"{module}:{point}")
        return sorted(out)

    def _node(self, name: str):
        module, _, point = name.rpartition(":")
        taps = self._f["taps"]
        if module not in taps or point not in taps[module]:
            near = [n for n in self.names() if n.startswith(module.rsplit(".", 1)[0])][:5]
            raise ReferenceError_(f"{self.path}: no reference tap {name!r} (nearby: {near})")
        return taps[module][point]

    def order(self, name: str) -> int:
        """Execution order of a tap's first record (files without it sort by name)."""
        return int(self._node(name).attrs.get("order", 1 << 30))

    def has(self, name: str) -> bool:
        module, _, point = name.rpartition(":")
        return module in self._f["taps"] and point in self._f["taps"][module]

    def tap(self, name: str) -> torch.Tensor:
        """The tensor of a tap recorded once (raises if it was recorded per step)."""
        node = self._node(name)
        if isinstance(node, h5py.Group):
            raise ReferenceError_(f"{self.path}: tap {name!r} was recorded {len(node)} times; use tap_steps()")
        return _from_numpy(node[()], node.attrs.get("torch_dtype"))

    def tap_steps(self, name: str) -> list[torch.Tensor]:
        """All calls of a tap in call order (a single-call tap gives a one-element list)."""
        node = self._node(name)
        if isinstance(node, h5py.Dataset):
            return [_from_numpy(node[()], node.attrs.get("torch_dtype"))]
        return [_from_numpy(node[k][()], node[k].attrs.get("torch_dtype")) for k in sorted(node)]

    def tap_step_numbers(self, name: str) -> list[int]:
        """The ``step`` attr of each call of a tap (the decode step it was recorded in)."""
        node = self._node(name)
        if isinstance(node, h5py.Dataset):
            return [int(node.attrs.get("step", 0))]
        return [int(node[k].attrs.get("step", 0)) for k in sorted(node)]

    def __enter__(self) -> RefFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _decode_attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "[{" or v == "null":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v
