"""A captured HDF5 file in open formats, for readers without HDF5: ``safetensors`` or ``npz``.

Keys are the names ``python -m reports compare`` reads back (``reports/port_dumps.py``): ``<module path>:<point>`` for
a tap recorded once, ``<module path>:<point>@step_N`` for each call of a tap recorded several times, N counting the
calls *kept in the file* from 0 (with ``--steps`` the HDF5 datasets keep each call's own number in ``step_NNNNN`` and
its ``call`` attr; N here is the position among them, which is what the reader expects). Only taps are written
(``/inputs`` and the attrs are not tap names). safetensors keeps bf16 as bf16; npz has no bf16, so bf16 taps are
written as float32 (exact). The run's provenance (schema version, checkpoint sha256, producer, the request) goes
to the safetensors header metadata; an npz holds taps only (any other key would not be a tap name).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from impl.outfile import atomic_path, write_bytes

from .h5io import ReferenceError_, RefFile

META_KEYS = ("schema_version", "checkpoint_sha256", "producer", "case_name", "variant", "dtype", "device")


def tensors_of(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tap of a capture as ``{key: tensor}`` (keys as above) and the provenance strings."""
    try:
        rf = RefFile(path)
    except ReferenceError_ as e:
        raise ValueError(str(e)) from None
    with rf:
        out: dict[str, torch.Tensor] = {}
        for name in rf.names():
            calls = rf.tap_steps(name)
            if len(calls) == 1:  # one kept call: a plain key, as reports/port_dumps.py reads the HDF5 file
                out[name] = calls[0].contiguous()
            else:
                for i, t in enumerate(calls):
                    out[f"{name}@step_{i}"] = t.contiguous()
        meta = {k: str(rf.meta.get(k)) for k in META_KEYS if k in rf.meta}
        meta["case"] = json.dumps(rf.case, default=str)
        meta["source"] = Path(path).name
    return out, meta


def convert(src: str | Path, out: str | Path, fmt: str) -> Path:
    """Write the taps of the HDF5 capture ``src`` to ``out`` in ``fmt`` (atomically); return ``out``."""
    tensors, meta = tensors_of(src)
    if not tensors:
        raise ValueError(f"{src}: holds no taps")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    elif fmt == "npz":
        arrays: dict[str, np.ndarray] = {}
        for k, t in tensors.items():
            if t.dtype == torch.bfloat16:
                t = t.float()  # exact: every bf16 value is a float32 value
            arrays[k] = t.numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_bytes(out, buf.getvalue())
    else:
        raise ValueError(f"--format {fmt!r}: not one of safetensors, npz")
    return Path(out)
