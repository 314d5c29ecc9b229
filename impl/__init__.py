"""From-scratch Qwen3-TTS (12 Hz). ``from impl import Qwen3TTS`` loads the public API lazily, so ``import impl``
stays light (no model code imported until it is used)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import Qwen3TTS

__all__ = ["Qwen3TTS"]


def __getattr__(name: str) -> Any:
    if name == "Qwen3TTS":
        from .model import Qwen3TTS

        return Qwen3TTS
    raise AttributeError(f"module 'impl' has no attribute {name!r}")
