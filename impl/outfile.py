"""Output files that are never left half-written: checked before any work, written atomically, or written through.

Rules (one place, used by ``python -m impl synthesize``):

- a symlink is followed: the file it points to is written, the link stays a link;
- an existing directory, block device or socket is refused (one line naming the path);
- a character device (``/dev/null``) or a FIFO is written through (opened and written in place): renaming a
  temporary file over it would replace the device node with a regular file;
- anything else (a regular file or a new name) is written to a hidden temporary file beside the target and renamed
  into place, so an interrupted or failed run never leaves a partial file and never clobbers a good one.

:func:`check_output` runs first, before the model loads, and proves the folder writable by creating and removing a
probe file there: a missing folder or a read-only one fails in the first second, not after the generation.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be written."""


def check_output(path: str | Path) -> tuple[Path, bool]:
    """Resolve ``path`` (following symlinks) and decide how it will be written: ``(target, write_through)``.

    Raises :class:`OutputError` naming ``path`` when it cannot be written."""
    given = Path(path)
    target = Path(os.path.realpath(given))  # follow symlinks (a dangling one points at a new file)
    shown = str(given) if target == given.absolute() else f"{given} (-> {target})"
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{shown}: cannot use as output ({e.strerror})") from None
    if st is not None:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            raise OutputError(f"{shown}: is a directory; --out names a file")
        if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
            if not os.access(target, os.W_OK):
                raise OutputError(f"{shown}: not writable")
            return target, True
        if not stat.S_ISREG(mode):
            raise OutputError(f"{shown}: not a regular file, character device or FIFO; refusing to write it")
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(f"{shown}: folder {parent} does not exist")
    try:  # the only honest writability test (os.access says yes to root on a read-only mount)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{shown}: cannot write in {parent} ({e.strerror})") from None
    return target, False


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` under the rules above; return the path written."""
    target, through = check_output(path)
    if through:
        with open(target, "wb") as f:
            f.write(data)
        return target
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


__all__ = ["OutputError", "check_output", "write_bytes"]
