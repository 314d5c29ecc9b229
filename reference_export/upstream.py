"""Build upstream ``qwen-tts`` 0.1.1 models from a local checkpoint folder, with no hub access.

``import qwen_tts.<anything>`` runs the package ``__init__``s, which import the 25 Hz tokenizer and so
``torchaudio.compliance.kaldi``. The 12 Hz path never calls it, and a ``torchaudio`` wheel needs a torch rebuilt
for it (the torch 2.9.1 route costs ~7 GB), so we insert a stand-in module that raises if anything actually uses
it. ``sox``, ``onnxruntime``, ``librosa`` and ``soundfile`` are the real packages (the speaker-encoder mel must
come from real librosa: that is part of what the reference is for).

Models are constructed directly from the folder's config dicts (never ``from_pretrained`` on a hub id) and
weights are loaded with ``strict=True`` from the folder's safetensors.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

UPSTREAM_VERSION = "0.1.1"


def _standin(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # transformers probes find_spec()

    def _unavailable(attr: str):
        # AttributeError (not RuntimeError) so hasattr/getattr probes by importers behave normally.
        raise AttributeError(f"{name}.{attr}: stand-in module (torchaudio is not installed; only the 25 Hz path uses it)")

    mod.__getattr__ = _unavailable  # type: ignore[method-assign]
    return mod


def install_standins() -> None:
    """Put the ``torchaudio`` stand-in into ``sys.modules`` unless a real one imports."""
    try:
        import torchaudio.compliance.kaldi  # noqa: F401
        return
    except Exception:
        pass
    ta = _standin("torchaudio")
    comp = _standin("torchaudio.compliance")
    kaldi = _standin("torchaudio.compliance.kaldi")
    ta.compliance = comp  # type: ignore[attr-defined]
    comp.kaldi = kaldi  # type: ignore[attr-defined]
    sys.modules.update({"torchaudio": ta, "torchaudio.compliance": comp, "torchaudio.compliance.kaldi": kaldi})


def import_upstream() -> types.SimpleNamespace:
    """Import the upstream classes the 12 Hz path uses (quietly)."""
    install_standins()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers
        from qwen_tts.core.models import modeling_qwen3_tts as M
        from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSConfig
        from qwen_tts.core.tokenizer_12hz import modeling_qwen3_tts_tokenizer_v2 as T
        from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import (
            Qwen3TTSTokenizerV2Config,
        )
    transformers.logging.set_verbosity_error()
    return types.SimpleNamespace(M=M, T=T, Qwen3TTSConfig=Qwen3TTSConfig,
                                 Qwen3TTSTokenizerV2Config=Qwen3TTSTokenizerV2Config, transformers=transformers)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": str(torch.__version__)}
    for pkg in ("qwen-tts", "transformers", "librosa", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


@dataclass
class Upstream:
    model: Any  # Qwen3TTSForConditionalGeneration (talker, speaker_encoder)
    speech_tokenizer: Any  # Qwen3TTSTokenizerV2Model (encoder, decoder)
    config: dict
    st_config: dict
    attn: str

    def roots(self) -> dict[str, torch.nn.Module]:
        """Module roots by the top-level name their checkpoint keys start with."""
        r = {"talker": self.model.talker, "speech_tokenizer": self.speech_tokenizer}
        if getattr(self.model, "speaker_encoder", None) is not None:
            r["speaker_encoder"] = self.model.speaker_encoder
        return r


def _strict_load(module: torch.nn.Module, path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights not found")
    state = load_file(str(path))
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Upstream keeps RoPE inv_freq as a non-persistent buffer; nothing else may be missing.
    if missing or unexpected:
        raise ValueError(f"{path}: upstream strict load failed: missing {missing[:5]} unexpected {unexpected[:5]}")


def upstream_config_dict(config: dict) -> dict:
    """The config dict upstream's constructor takes (harness bookkeeping keys removed)."""
    return {k: v for k, v in config.items() if k not in ("harness",)}


def load_upstream(ckpt: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  attn: str = "eager", codec_dtype: torch.dtype = torch.float32) -> Upstream:
    """Construct upstream models from ``ckpt`` and load its weights strictly.

    ``attn`` applies to the talker (and code predictor) as upstream's ``from_pretrained`` does; the codec gets
    ``attn`` too (upstream's loader leaves it at its default, sdpa; pass ``attn="sdpa"`` to mirror that).
    The codec runs in ``codec_dtype`` (fp32 by default, as upstream's codec overflows in bf16).
    """
    up = import_upstream()
    ckpt = Path(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    st_cfg = json.loads((ckpt / "speech_tokenizer" / "config.json").read_text())
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = up.M.Qwen3TTSForConditionalGeneration(up.Qwen3TTSConfig(**upstream_config_dict(cfg)))
        tok_cfg = up.Qwen3TTSTokenizerV2Config(**upstream_config_dict(st_cfg))
        # Mimi picks its attention class at construction: set_attn_implementation afterwards would leave the
        # encoder on its default kernel while the reference claims ``attn``.
        tok_cfg.encoder_config._attn_implementation = attn
        tok = up.T.Qwen3TTSTokenizerV2Model(tok_cfg)
    _strict_load(model, ckpt / "model.safetensors")
    _strict_load(tok, ckpt / "speech_tokenizer" / "model.safetensors")
    # Upstream's SpeakerEncoderConfig skips its parent __init__, so set the implementation on sub-models.
    model.talker.set_attn_implementation(attn)
    tok.set_attn_implementation(attn)
    model = _to_keep_rope_fp32(model, device, dtype).eval()
    tok = _to_keep_rope_fp32(tok, device, codec_dtype).eval()
    return Upstream(model, tok, cfg, st_cfg, attn)


def _to_keep_rope_fp32(module: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(device, dtype)`` with RoPE ``inv_freq`` tables kept fp32, as upstream's own
    ``from_pretrained(dtype=...)`` leaves them (a plain ``.to(bf16)`` would round them)."""
    tables = {n: b.detach().clone() for n, b in module.named_buffers() if n.endswith("inv_freq")}
    module = module.to(device=device, dtype=dtype)
    for name, t in tables.items():
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        setattr(owner, name.rsplit(".", 1)[-1], t.to(device))
    return module
