"""Shared helpers of the bad-input tests (``test_bad_input_*.py``): cheap broken copies of a checkpoint and a
snapshot of a folder that shows any created or changed file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from safetensors.torch import load_file, save_file


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A folder of symlinks to ``src``'s files (speech_tokenizer/ a real folder of links): cheap to break one."""
    dst.mkdir()
    for p in src.iterdir():
        if p.is_dir():
            (dst / p.name).mkdir()
            for q in p.iterdir():
                (dst / p.name / q.name).symlink_to(q)
        else:
            (dst / p.name).symlink_to(p)
    return dst


def replace_file(path: Path, data: bytes | str) -> None:
    path.unlink()
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def edit_weights(path: Path, key_pred, fn) -> str:
    """Rewrite a safetensors file with ``fn`` applied to the first key matching ``key_pred``; return the key."""
    state = load_file(str(path))
    key = next(k for k in sorted(state) if key_pred(k))
    state[key] = fn(state[key])
    path.unlink()
    save_file(state, str(path), metadata={"format": "pt"})
    return key


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    d = fn(d)
    replace_file(path, json.dumps(d))


def snapshot(folder: Path) -> dict[str, tuple]:
    """Names, kinds, sizes and mtimes of everything in ``folder``: any created or changed file shows."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(folder))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out
