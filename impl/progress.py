"""Progress of long generation: ``progress(done, budget)`` callbacks and a plain stderr line for the CLI.

The generation loops (:class:`impl.generate.TalkerLoop`, :func:`impl.fast_decode.generate_fast`) call
``progress(done, budget)`` after every frame: ``done`` frames made so far, ``budget`` the most frames the run may
make (``max_new_tokens - 1``; a run that ends at EOS stops before it). The callback runs on the host between
frames and must be cheap; it never adds a device sync (the loop already knows ``done``).

:class:`ProgressLine` is the callback behind ``progress=True`` and the CLI: no tqdm dependency, one line.

    >>> import io
    >>> out = io.StringIO()
    >>> p = ProgressLine(out, tty=False)  # not a terminal: whole lines, at most one per 10 s, and the last
    >>> p(3, 10); p(4, 10); p(10, 10); p.close()
    >>> out.getvalue().splitlines()
    ['generating: 3/10 frames (30%), 0.2 s of audio', 'generating: 10/10 frames (100%), 0.8 s of audio']
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

ProgressFn = Callable[[int, int], None]
FRAME_RATE = 12.5  # codec frames per second of audio (1920 samples at 24 kHz)


class ProgressLine:
    """``callable(done, budget)`` that writes ``generating: done/budget frames (x%), s of audio`` to ``stream``.

    On a terminal (``tty``) the line is redrawn in place (``\\r``) at most every ``interval`` seconds; elsewhere
    (a log file, a pipe, a test's captured stderr) a whole line is written at most every ``log_interval`` seconds,
    so a log does not fill with redraws. Nothing is written before ``delay`` seconds have passed since the first
    call: a short run stays silent. :meth:`close` ends the line (a last update and a newline) if anything was
    written. ``tty=None`` asks the stream."""

    def __init__(self, stream: TextIO | None = None, delay: float = 0.0, tty: bool | None = None,
                 interval: float = 0.1, log_interval: float = 10.0, label: str = "generating"):
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty, self.delay, self.label = tty, delay, label
        self.interval = interval if tty else log_interval
        self.start: float | None = None
        self.last_write: float | None = None
        self.last: tuple[int, int] | None = None
        self.shown: str | None = None  # the text last written

    def _text(self, done: int, budget: int) -> str:
        pct = f" ({100 * done // budget}%)" if budget > 0 else ""
        return f"{self.label}: {done}/{budget} frames{pct}, {done / FRAME_RATE:.1f} s of audio"

    def _write(self, done: int, budget: int, now: float) -> None:
        text = self._text(done, budget)
        self.stream.write(f"\r{text}\x1b[K" if self.tty else f"{text}\n")  # \x1b[K: clear the rest of the line
        self.stream.flush()
        self.shown, self.last_write = text, now

    def __call__(self, done: int, budget: int) -> None:
        now = time.monotonic()
        if self.start is None:
            self.start = now
        self.last = (done, budget)
        if now - self.start < self.delay:
            return
        if self.last_write is None or now - self.last_write >= self.interval:
            self._write(done, budget, now)

    def close(self) -> None:
        """The final count (if the line was shown at all), then a newline on a terminal."""
        if self.shown is None or self.last is None:
            return
        if self._text(*self.last) != self.shown:
            self._write(*self.last, time.monotonic())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_progress(progress: object) -> tuple[ProgressFn | None, ProgressLine | None]:
    """The ``progress=`` argument of the API -> (callback or None, a :class:`ProgressLine` to close or None).

    ``None``/``False``: no progress; ``True``: a :class:`ProgressLine` on stderr, shown at once; a callable:
    called as ``progress(done, budget)`` after every frame. Anything else is one ``ValueError`` line."""
    if progress is None or progress is False:
        return None, None
    if progress is True:
        line = ProgressLine()
        return line, line
    if callable(progress):
        return progress, None
    raise ValueError(f"progress {progress!r} is not True, False, None or a callable(done, budget)")
