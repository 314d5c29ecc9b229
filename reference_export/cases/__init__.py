"""Capture cases, declared in one place: this package (one module per area).

A case is everything needed to re-run a capture from its file alone: deterministic inputs (stored under
``/inputs``), settings (stored as ``/case`` attrs), which upstream roots to hook, and how to drive upstream.
``impl`` is driven from the same stored inputs by the parity tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from impl.config import VARIANTS


@dataclass
class CaseEnv:
    """What a case's ``make_inputs`` may use: the checkpoint folder, its configs and the seed."""

    checkpoint: Path
    config: dict
    st_config: dict
    seed: int

    def generator(self, salt: str = "") -> torch.Generator:
        import zlib

        return torch.Generator().manual_seed(self.seed * 7919 + zlib.crc32(salt.encode()))

    def tokenize(self, text: str) -> list[int]:
        """Upstream's text tokenizer on this folder, loaded as upstream's processor loads it."""
        from transformers import Qwen2TokenizerFast

        tok = _TOKENIZERS.get(self.checkpoint)
        if tok is None:
            tok = Qwen2TokenizerFast.from_pretrained(str(self.checkpoint), fix_mistral_regex=True)
            _TOKENIZERS[self.checkpoint] = tok
        return tok(text)["input_ids"]


_TOKENIZERS: dict[Path, object] = {}


@dataclass(frozen=True)
class Case:
    name: str
    component: str  # registry component naming the expected taps
    description: str
    make_inputs: Callable[[CaseEnv], dict[str, torch.Tensor]]
    run: Callable  # run(up: Upstream, inputs: dict[str, Tensor], rec: Recorder) -> None
    roots: tuple[str, ...]  # upstream roots to hook ("talker", "speaker_encoder", "speech_tokenizer")
    settings: dict = field(default_factory=dict)
    variants: tuple[str, ...] = VARIANTS
    record_inputs: bool = False  # also record each module's first input as ":in"
    attn: str | None = None  # force an attention implementation for this case (e.g. "eager" for probabilities)
    include: tuple[str, ...] = ("*",)  # globs of tap names to keep (memory on released sizes)


CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    if case.name in CASES:
        raise ValueError(f"case {case.name!r} registered twice")
    CASES[case.name] = case
    return case


def get_case(name: str) -> Case:
    _load_all()
    if name not in CASES:
        raise KeyError(f"unknown case {name!r}; known: {sorted(CASES)}")
    return CASES[name]


def all_cases() -> dict[str, Case]:
    _load_all()
    return dict(CASES)


_LOADED = False


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for m in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__name__}.{m.name}")

