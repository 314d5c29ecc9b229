"""The harness's own tap recorder: what a forward hook on an upstream module records, and where it goes.

Written independently of ``impl.taps`` on purpose: the reference side must never share recording code with the
side it judges, or a recorder bug (a wrong tensor picked from a tuple, a step stamped late, a later call dropped)
would hit both alike and compare equal. ``parity_tests/test_recorder.py`` checks this recorder against direct
calls of upstream modules.

A :class:`Recorder` receives ``add(name, tensor)`` for every call of every tap, in execution order, and keeps:

- every call of a multi-call module (one record per call, never only the first), each stamped with ``step``: the
  decode step it ran in (the index of the talker forward, 0 = prefill; set by the capture's talker pre-hook) and
  ``call``: its call index for that tap (0, 1, 2 …);
- only the taps whose names match ``include`` and not ``exclude`` (globs), and, with ``steps`` set, only calls made inside the decode
  loop (``in_loop``) at one of those steps; what it leaves out is counted in ``left_out`` / ``left_out_steps`` so a
  file can say so;
- in memory (``records``/``steps``: the fixed cases, small), or streamed to a :class:`TapSink` as each call
  arrives (``sink``: request captures, any size; nothing is buffered for the whole run).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch


class TapSink(Protocol):
    def write(self, name: str, value: torch.Tensor, step: int, call: int, in_loop: bool) -> None: ...


def output_tensor(x: object) -> torch.Tensor | None:
    """The tensor a module's output stands for: the output itself when it is a tensor, else the first tensor found
    depth-first in a tuple/list (HF modules return ``(hidden, weights, …)``; ModelOutputs are tuples too). None when
    the output holds no tensor (nothing is recorded then). A ``ModelOutput`` (a dict) records nothing: the
    modules inside it are recorded on their own."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for item in x:
            t = output_tensor(item)
            if t is not None:
                return t
    return None


@dataclass
class Recorder:
    """Collects taps by name; see the module docstring. ``steps``: the decode steps to keep (None = all)."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()  # globs left out even when ``include`` matches
    steps: frozenset[int] | None = None
    sink: TapSink | None = None
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None  # applied to each kept value (a copy)
    observe: Callable[[str, torch.Tensor], None] | None = None  # sees every call, kept or not (no copy)
    step: int = 0  # decode step of the talker forward running now (0 outside generation)
    in_loop: bool = False  # True while the talker's decode loop runs (only then does ``steps`` filter)
    records: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    step_of: dict[str, list[int]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # every call seen per tap, kept or not
    left_out: set[str] = field(default_factory=set)  # tap names ``include`` dropped
    left_out_steps: set[int] = field(default_factory=set)  # decode steps ``steps`` dropped
    loop_steps: set[int] = field(default_factory=set)  # decode steps that ran

    def wants(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.include) and \
            not any(fnmatch.fnmatchcase(name, g) for g in self.exclude)

    def add(self, name: str, value: torch.Tensor) -> None:
        call = self.calls.get(name, 0)
        self.calls[name] = call + 1
        if self.in_loop:
            self.loop_steps.add(self.step)
        if self.observe is not None:
            self.observe(name, value)
        if not self.wants(name):
            self.left_out.add(name)
            return
        if self.steps is not None and self.in_loop and self.step not in self.steps:
            self.left_out_steps.add(self.step)
            return
        t = value.detach().to("cpu", copy=True)  # a copy: later in-place ops (caches) must not change it
        if self.transform is not None:
            t = self.transform(name, t)
        if self.sink is not None:
            self.sink.write(name, t, self.step, call, self.in_loop)
            return
        self.records.setdefault(name, []).append(t)
        self.step_of.setdefault(name, []).append(self.step)

    def add_io(self, path: str, args: tuple, out: object, inputs: bool) -> None:
        """A forward hook's record: ``<path>:out`` and, with ``inputs``, ``<path>:in`` (the first positional
        argument's tensor)."""
        t = output_tensor(out)
        if t is not None:
            self.add(f"{path}:out", t)
        if inputs and args:
            ti = output_tensor(args[0])
            if ti is not None:
                self.add(f"{path}:in", ti)

    def unmatched(self, globs: Iterable[str]) -> list[str]:
        """The globs of ``globs`` that matched no tap seen (kept or left out)."""
        seen = list(self.calls)
        return [g for g in globs if not any(fnmatch.fnmatchcase(n, g) for n in seen)]


def parse_steps(spec: str) -> frozenset[int]:
    """``"0:8,100"`` -> {0, …, 7, 100}: comma-separated decode steps or half-open ranges ``a:b`` (as Python
    slices; ``a:`` is not allowed: say where it ends). Raises ``ValueError`` naming ``--steps``."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if ":" in part:
                a, b = part.split(":", 1)
                lo, hi = int(a), int(b)
                if lo < 0 or hi <= lo:
                    raise ValueError
                out.update(range(lo, hi))
            else:
                v = int(part)
                if v < 0:
                    raise ValueError
                out.add(v)
        except ValueError:
            raise ValueError(f"--steps {spec!r}: {part!r} is not a step (N >= 0) or a range A:B with 0 <= A < B") \
                from None
    if not out:
        raise ValueError(f"--steps {spec!r}: no step given")
    return frozenset(out)
