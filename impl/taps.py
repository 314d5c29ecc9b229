"""Activation taps: ``impl`` emits named tensors, a recorder (the harness, or a user) collects them.

A tap name is ``<module path>:<point>``. The module path equals the upstream checkpoint key prefix
(``talker.model.layers.3.self_attn``); ``point`` is ``out`` (module output) or ``in`` (first input), both taken
by forward hooks, or a named internal emitted explicitly with :func:`tap` (``q_rope``, ``k_rope``,
``attn_probs``, ``logits`` …). ``impl`` never knows which taps are expected; the harness's registry does.

Usage::

    with recording(model, prefix="talker") as rec:
        model(...)
    rec.records["talker.model.layers.0.self_attn:q_rope"]   # list of tensors, one per call (decode step)

When nothing records, :func:`tap` costs one global read and returns its argument unchanged.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

_ACTIVE: list[Recorder] = []


def set_tap_paths(model: nn.Module, prefix: str = "") -> None:
    """Give every submodule its module path (``_tap_path``) so explicit taps can name themselves."""
    for name, mod in model.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        object.__setattr__(mod, "_tap_path", full)


def tap(module: nn.Module, point: str, value: torch.Tensor) -> torch.Tensor:
    """Record ``value`` as ``<module path>:<point>`` if a recorder is active; always return ``value``."""
    if _ACTIVE:
        name = f"{getattr(module, '_tap_path', type(module).__name__)}:{point}"
        for rec in _ACTIVE:
            rec.add(name, value)
    return value


def first_tensor(x: object) -> torch.Tensor | None:
    """The tensor a hook records for a module output: the tensor itself, or the first tensor of a tuple/NamedTuple."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def record_io(rec: Recorder, path: str, args: tuple, out: object, inputs: bool) -> None:
    """What a forward hook records: ``<path>:out`` (first output tensor) and, with ``inputs``, ``<path>:in``."""
    t = first_tensor(out)
    if t is not None:
        rec.add(f"{path}:out", t)
    if inputs and args:
        ti = first_tensor(args[0])
        if ti is not None:
            rec.add(f"{path}:in", ti)


@dataclass
class Recorder:
    """Collects taps. ``include`` globs filter names (default: all). Tensors are detached copies on CPU.

    With ``sink`` set, each tap goes to ``sink(name, tensor, step)`` as it is produced instead of being kept (a
    caller that writes taps to disk step by step holds none of them in memory)."""

    include: tuple[str, ...] = ("*",)
    records: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    step: int = 0  # set by generation loops; stored alongside for autoregressive taps
    steps: dict[str, list[int]] = field(default_factory=dict)
    sink: Callable[[str, torch.Tensor, int], None] | None = None

    def wants(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.include)

    def add(self, name: str, value: torch.Tensor) -> None:
        if not self.wants(name):
            return
        if self.sink is not None:
            self.sink(name, value.detach().to("cpu", copy=True), self.step)
            return
        self.records.setdefault(name, []).append(value.detach().to("cpu", copy=True))
        self.steps.setdefault(name, []).append(self.step)


@contextlib.contextmanager
def recording(
    model: nn.Module | None = None, prefix: str = "", include: tuple[str, ...] = ("*",), inputs: bool = False,
    sink: Callable[[str, torch.Tensor, int], None] | None = None,
) -> Iterator[Recorder]:
    """Record explicit taps, and (if ``model`` is given) every submodule's output as ``<path>:out``.

    ``prefix`` is prepended to module names (use the upstream top-level name, e.g. ``"talker"`` when ``model`` is
    the talker). With ``inputs=True`` the first positional input is recorded as ``<path>:in`` too. ``sink``: see
    :class:`Recorder`.
    """
    rec = Recorder(include=include, sink=sink)
    handles = []
    if model is not None:
        set_tap_paths(model, prefix)
        for _, mod in model.named_modules():
            path = mod._tap_path  # type: ignore[attr-defined]

            def hook(m, args, out, _p=path):
                record_io(rec, _p, args, out, inputs)

            handles.append(mod.register_forward_hook(hook))
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.remove(rec)
        for h in handles:
            h.remove()
