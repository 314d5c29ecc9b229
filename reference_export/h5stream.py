"""A reference file written while the run is under way: each tap call goes to disk as it is produced.

Same schema as :func:`reference_export.h5io.write_refs` (``schema_version`` 1, read by ``RefFile``), so every reader
works unchanged; what differs is when the data is written:

- a tap's first kept call is written as the dataset ``/taps/<module>/<point>``; when a second call arrives, that
  dataset is moved (an HDF5 link move, no copy) to ``<point>/step_<call>`` of a new group and the next calls join it.
  ``step_NNNNN`` numbers the tap's *call* (0, 1, 2 … over the whole run), so a ``--steps`` subset keeps each kept
  call's own number; attrs ``step`` (decode step) and ``call`` say where it ran;
- datasets of 1,024 elements or more are chunked and gzip-compressed (level 4, byte shuffle): gzip is in every
  HDF5 build, so readers without h5py's own filters open the file;
- nothing is buffered for the whole run: memory holds one tap call at a time (and the heap is kept from
  fragmenting: :func:`bound_heap`).

The caller opens the file on a temporary name (``impl.outfile.atomic_path``): a run that fails or is interrupted
leaves no file, and the rename happens only after the last attrs are written.
"""

from __future__ import annotations

from typing import Any

import h5py
import torch

from .h5io import SCHEMA_VERSION, _attr, _stats, _to_numpy

COMPRESS_MIN_ELEMENTS = 1024
MMAP_THRESHOLD = 1 << 20  # bytes: allocations this large get their own mapping, returned to the OS when freed


def bound_heap() -> None:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` (process-wide; a no-op where ``mallopt`` is missing).

    By default glibc raises the threshold to the size of each mapped block freed (up to 32 MB), after which torch's
    activations of that size come from the heap; interleaved with the writer's small HDF5/zlib buffers the heap
    then fragments and keeps freed memory. Measured on the 0.6b codec decode with every tap streamed: peak RSS
    +2.9 GB over the loaded model (2.3 GB still held afterwards), +0.95 GB with the threshold fixed."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD (malloc.h); setting it also stops the adjustment
    except (OSError, AttributeError):
        pass


class H5TapStream:
    """A :class:`reference_export.recorder.TapSink` writing into an open ``h5py.File``."""

    def __init__(self, f: h5py.File, meta: dict[str, Any]):
        from datetime import UTC, datetime

        bound_heap()
        self.f = f
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        for k, v in meta.items():
            f.attrs[k] = _attr(v)
        self.case = f.create_group("case")
        self.inputs = f.create_group("inputs")
        self.taps = f.create_group("taps")
        self.order: dict[str, int] = {}
        self.single: set[str] = set()  # taps written once so far (a plain dataset)
        self.calls_written = 0
        self.bytes_written = 0

    def write(self, name: str, value: torch.Tensor, step: int, call: int, in_loop: bool) -> None:
        module, _, point = name.rpartition(":")
        grp = self.taps.require_group(module)
        if name not in self.order:
            self.order[name] = len(self.order)  # execution order of the tap's first call
            self._dataset(grp, point, value, step, call, in_loop).attrs["order"] = self.order[name]
            self.single.add(name)
            return
        if name in self.single:  # second call: the plain dataset becomes the group's first member
            self.single.discard(name)
            first_call = int(grp[point].attrs["call"])
            grp.move(point, f"{point}.__first")
            sub = grp.create_group(point)
            sub.attrs["order"] = self.order[name]
            grp.move(f"{point}.__first", f"{point}/step_{first_call:05d}")
        self._dataset(grp[point], f"step_{call:05d}", value, step, call, in_loop)

    def _dataset(self, grp: h5py.Group, key: str, t: torch.Tensor, step: int, call: int,
                 in_loop: bool) -> h5py.Dataset:
        arr, dt = _to_numpy(t)
        kw: dict[str, Any] = {}
        if arr.ndim and arr.size >= COMPRESS_MIN_ELEMENTS:
            kw = dict(chunks=True, compression="gzip", compression_opts=4, shuffle=True)
        ds = grp.create_dataset(key, data=arr, **kw)
        ds.attrs.update({"shape": list(t.shape), "dtype": dt, "torch_dtype": dt, "step": step, "call": call,
                         **_stats(t)})
        self.calls_written += 1
        self.bytes_written += arr.nbytes
        return ds

    def add_input(self, name: str, value) -> None:
        arr, dt = _to_numpy(value if isinstance(value, torch.Tensor) else torch.as_tensor(value))
        self.inputs.create_dataset(name, data=arr).attrs["torch_dtype"] = dt

    def set_case(self, settings: dict[str, Any]) -> None:
        for k, v in settings.items():
            self.case.attrs[k] = _attr(v)

    def set_meta(self, meta: dict[str, Any]) -> None:
        for k, v in meta.items():
            self.f.attrs[k] = _attr(v)

    def left_out(self, taps: list[str], steps: list[int]) -> None:
        """``/left_out``: tap names ``--taps`` dropped (``taps``, UTF-8 strings) and decode steps ``--steps``
        dropped (``steps``), so the file says what it does not hold."""
        g = self.f.create_group("left_out")
        g.create_dataset("taps", data=sorted(taps), dtype=h5py.string_dtype())
        g.create_dataset("steps", data=sorted(steps), dtype="int64")
