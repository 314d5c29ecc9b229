"""Output files that are never left half-written: checked before any work, written atomically, or written through.

One module for every file the engine *and* the harness write (``python -m impl synthesize``, reports, the
baseline, plots, port reports, bench JSON, HDF5 captures, synthetic checkpoints). It imports nothing but the
standard library, so the harness uses it without reaching into engine internals.

Rules:

- a symlink is followed: the file it points to is written, the link stays a link;
- an existing directory, block device or socket is refused (one line naming the path);
- a character device (``/dev/null``) or a FIFO is written through (opened and written in place): renaming a
  temporary file over it would replace the device node with a regular file;
- anything else (a regular file or a new name) is written to a hidden temporary file beside the target
  (``.<stem>.tmp-<pid>-<rand><suffix>``: the suffix is kept, so libraries that pick a format from it still work),
  flushed to disk (fsync), and renamed into place; the folder is fsynced after the rename. On any failure —
  an exception, a full disk, Ctrl-C, or SIGTERM while the write is under way — the temporary file is removed and
  the old file is untouched. An ``OSError`` while writing (ENOSPC, EDQUOT, EIO; h5py's spans several lines) becomes
  one :class:`OutputError` line naming the path and saying what is left (:func:`write_failed`).

:func:`check_output` runs first, before any work, and proves the folder writable by creating and removing a probe
file there: a missing folder or a read-only one fails in the first second, not after an hour of measurement.
:func:`check_folder` does the same for an output folder, :func:`check_free_space` for a size we can estimate.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be written (``reason``: the system's words, when a write failed part-way)."""

    reason: str | None = None


def _shown(given: Path, target: Path) -> str:
    return str(given) if target == given.absolute() else f"{given} (-> {target})"


def check_output(path: str | Path) -> tuple[Path, bool]:
    """Resolve ``path`` (following symlinks) and decide how it will be written: ``(target, write_through)``.

    Raises :class:`OutputError` naming ``path`` when it cannot be written."""
    given = Path(path)
    target = Path(os.path.realpath(given))  # follow symlinks (a dangling one points at a new file)
    shown = _shown(given, target)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{shown}: cannot use as output ({e.strerror})") from None
    if st is not None:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            raise OutputError(f"{shown}: is a directory; an output file is expected here")
        if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
            if not os.access(target, os.W_OK):
                raise OutputError(f"{shown}: not writable")
            return target, True
        if not stat.S_ISREG(mode):
            raise OutputError(f"{shown}: not a regular file, character device or FIFO; refusing to write it")
    parent = target.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise OutputError(f"{shown}: folder {parent} {what}")
    _probe(parent, shown, target.name)
    return target, False


def check_writable(folder: str | Path, shown: str | Path) -> None:
    """Prove ``folder`` writable by creating and removing a probe file there; raises :class:`OutputError` starting
    with ``shown`` (the output the user named) otherwise."""
    _probe(Path(folder), str(shown), Path(shown).name)


def _probe(folder: Path, shown: str, name: str = "out") -> None:
    try:  # the only honest writability test (os.access says yes to root on a read-only mount)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{name}.probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{shown}: cannot write in {folder} ({e.strerror})") from None


def check_folder(path: str | Path, create: bool = False) -> Path:
    """An output *folder*: it must be a folder (or not exist, with ``create=True``: it is then made, parents
    included) and writable. Raises :class:`OutputError` naming ``path``."""
    given = Path(path)
    target = Path(os.path.realpath(given))
    shown = _shown(given, target)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{shown}: is a file; an output folder is expected here")
    if not target.exists():
        if not create:
            raise OutputError(f"{shown}: folder does not exist")
        parent = target.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise OutputError(f"{shown}: {parent} is a file, not a folder")
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{shown}: cannot create the folder ({e.strerror})") from None
    _probe(target, shown)
    return target


def check_folder_can_be_made(path: str | Path) -> Path:
    """An output folder that the writer makes later: an existing one is checked as by :func:`check_folder`; for a
    new one, the nearest existing folder above it must be a writable folder. Nothing is created now, so a run
    refused for another reason leaves no empty folder behind."""
    given = Path(path)
    target = Path(os.path.realpath(given))
    if target.exists():
        return check_folder(given)
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{_shown(given, target)}: {parent} is a file, not a folder")
    _probe(parent, _shown(given, target))
    return target


def check_free_space(path: str | Path, need_bytes: int, what: str = "the output") -> None:
    """Refuse early when the filesystem holding ``path`` (a file or folder; the nearest existing parent is asked)
    has less than ``need_bytes`` free. ``need_bytes`` is an estimate; say so in ``what`` if it matters."""
    p = Path(os.path.realpath(path))
    while not p.exists():
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < need_bytes:
        raise OutputError(f"{path}: {free / 1e6:.1f} MB free on its filesystem, {what} needs about "
                          f"{need_bytes / 1e6:.1f} MB")


def _fsync_path(p: Path, directory: bool = False) -> None:
    fd = os.open(p, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a temporary file exists, SIGTERM raises ``SystemExit(143)`` so the cleanup below runs (its default
    action kills the process on the spot and would leave the temporary file behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):  # someone else handles it; leave their handler alone
        yield
        return

    def raise_exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def temp_name(target: Path) -> Path:
    """The hidden temporary name beside ``target``; the suffix is kept (``.plot.tmp-12-ab3f.png``)."""
    return target.with_name(f".{target.stem}.tmp-{os.getpid()}-{secrets.token_hex(3)}{target.suffix}")


def _final_mode(target: Path) -> int:
    """The permission bits the written file gets: those of the file it replaces, else what ``open()`` would give a
    new file (0o666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a path to write ``path``'s new content to, for writers that take a file name (h5py, matplotlib,
    safetensors). When the ``with`` body returns, the temporary file is fsynced and renamed onto ``path``; when it
    raises (anything, KeyboardInterrupt and SIGTERM included) the temporary file is removed and ``path`` is
    untouched. A character device or FIFO is yielded as it is (written through). Raises :class:`OutputError` first
    when ``path`` cannot be written."""
    target, through = check_output(path)
    if through:
        yield target
        return
    tmp = temp_name(target)
    existed = target.exists()
    mode = _final_mode(target)
    with _sigterm_raises():
        try:
            yield tmp
            if not tmp.exists():
                raise OutputError(f"{path}: the writer produced no file")
            os.chmod(tmp, mode)  # some writers (safetensors) create 0600 files; a replaced file keeps its mode
            _fsync_path(tmp)
            os.replace(tmp, target)
            with contextlib.suppress(OSError):
                _fsync_path(target.parent, directory=True)
        except OSError as e:  # a full disk, a quota, an I/O error while writing: one line naming the output
            raise write_failed(path, e, existed) from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _why(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else (str(e).strip().splitlines() or [type(e).__name__])[0]


def write_failed(path: str | Path, e: OSError, existed: bool) -> OutputError:
    """One line for a write that failed part-way (``e``: the OSError; h5py's spans several lines, so the errno's
    text is used when there is one), saying what is left: the old file, or nothing."""
    why = _why(e)
    left = "the old file is kept unchanged" if existed else "no file was written"
    err = OutputError(f"{path}: write failed ({why}); {left}")
    err.reason = why  # atomic_dir re-words a failed file inside its temporary folder in terms of the folder
    return err


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` under the rules above; return the path written."""
    target, through = check_output(path)
    if through:
        with open(target, "wb") as f:
            f.write(data)
        return target
    with atomic_path(target) as tmp, open(tmp, "xb") as f:
        f.write(data)
    return target


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default); return the path written."""
    return write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary *folder* beside ``path``; on success it replaces ``path`` (an old folder there is
    removed only after the new one is complete); on failure it is removed and ``path`` is untouched."""
    given = Path(path)
    target = Path(os.path.realpath(given))
    if target.exists() and not target.is_dir():
        raise OutputError(f"{_shown(given, target)}: is a file; an output folder is expected here")
    check_folder(target.parent, create=False) if target.parent.exists() else check_folder(target.parent, create=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
    with _sigterm_raises():
        try:
            tmp.mkdir()
            yield tmp
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            with contextlib.suppress(OSError):
                _fsync_path(target.parent, directory=True)
        except (OSError, OutputError) as e:
            if old.exists() and not target.exists():
                os.replace(old, target)  # the rename of the new folder failed: put the old one back
            if isinstance(e, OSError):
                why = _why(e)
            elif getattr(e, "reason", None):  # a file inside the temporary folder failed to write
                why = e.reason
            else:
                raise
            left = "the old folder is kept unchanged" if target.exists() else "no folder was written"
            raise OutputError(f"{given}: write failed ({why}); {left}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)


__all__ = ["OutputError", "atomic_dir", "atomic_path", "check_folder", "check_folder_can_be_made", "check_free_space",
           "check_output", "check_writable", "temp_name", "write_bytes", "write_failed", "write_text"]
