"""Build upstream ``qwen-tts`` 0.1.1 models from a local checkpoint folder, with no hub access.

``import qwen_tts.<anything>`` runs the package ``__init__``s, which import the 25 Hz tokenizer and so
``torchaudio.compliance.kaldi``. The 12 Hz path never calls it, and a ``torchaudio`` wheel needs a torch rebuilt
for it (the torch 2.9.1 route costs ~7 GB), so we insert a stand-in module that raises if anything actually uses
it. ``sox``, ``onnxruntime``, ``librosa`` and ``soundfile`` are the real packages (the speaker-encoder mel must
come from real librosa: that is part of what the reference is for).

Models are constructed directly from the folder's config dicts (never ``from_pretrained`` on a hub id) and
weights are loaded with ``strict=True`` from the folder's safetensors.

Memory: the model's weights exist once, in the requested dtype. Parameters are built on the meta device (no
storage; buffers such as the RoPE tables are computed on the CPU as upstream's constructors compute them), each
tensor is read from the file into its final tensor on ``device`` in its final dtype through one bounded buffer,
and the model takes those tensors themselves (``load_state_dict(assign=True)``). Values are those of building in
fp32, loading and then ``.to(dtype)``: the same rounding, cast elementwise. The code is the harness's own (not
``impl.loading``), so a loader bug cannot hit both sides alike.
"""

from __future__ import annotations

import importlib.machinery
import json
import struct
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

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


# safetensors dtype names -> torch dtypes (the header's ``dtype`` field).
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_CHUNK = 1 << 24  # bytes: the one buffer every tensor is read through


def read_weights(path: Path, device: str | torch.device, dtype: torch.dtype,
                 map_keys: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, each in its own tensor on ``device``, floating ones in
    ``dtype`` (integer ones keep theirs, as ``Module.to(dtype)`` leaves them).

    One tensor at a time, read through a ``_CHUNK``-byte buffer and cast chunk by chunk into the destination (a
    cast is elementwise, so the values equal a whole-tensor ``.to(dtype)``): no copy of the file is held beside
    the result, not even for the 151k-row text embedding.

    ``map_keys``: lookup tables (embedding weights) that, when the file already holds them in ``dtype`` on a CPU
    load, are views of a private (copy-on-write) mapping of the file instead, as upstream's own loader
    (transformers) leaves its CPU weights: a row becomes resident only when a lookup reads it, so the 151k-row
    text embedding costs the rows a request uses. A lookup table the file holds in another dtype (an fp32 file,
    a bf16 capture) is cast chunk by chunk into an unlinked temporary file (``tempfile``'s folder, on disk) and
    mapped from there the same way (:func:`_cast_to_mapped_file`), as if the file had held it in ``dtype``. Only
    lookup tables: a matmul's result on the CPU may depend on its weight's address alignment (MKL), and a mapped
    tensor sits at the file's 8-byte alignment."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights not found")
    with safe_open(str(path), framework="pt", device="cpu"):
        pass  # safetensors validates the header: a truncated or foreign file raises its own message here
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        base = 8 + n
        buf = torch.empty(_CHUNK, dtype=torch.uint8)
        mapping = None
        for key in sorted(header, key=lambda k: header[k]["data_offsets"][0]):  # sequential reads
            info = header[key]
            src = _ST_DTYPES.get(info["dtype"])
            if src is None:
                raise ValueError(f"{path}: key {key} has dtype {info['dtype']}, which this loader does not read")
            start, end = info["data_offsets"]
            if (key in map_keys and src == dtype and torch.device(device).type == "cpu" and end > start
                    and (base + start) % src.itemsize == 0):
                if mapping is None:
                    mapping = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
                if base + end > mapping.nbytes():
                    raise ValueError(f"{path}: key {key} is truncated")
                view = torch.empty(0, dtype=torch.uint8).set_(mapping, base + start, (end - start,))
                out[key] = view.view(src).reshape(info["shape"])
                continue
            if (key in map_keys and src.is_floating_point and src != dtype and torch.device(device).type == "cpu"
                    and end > start):
                out[key] = _cast_to_mapped_file(fh, base + start, end - start, src, dtype, info["shape"], buf,
                                                f"{path}: key {key}")
                continue
            dst = torch.empty(info["shape"], dtype=dtype if src.is_floating_point else src, device=device)
            flat = dst.view(-1)
            item = src.itemsize
            step = _CHUNK // item * item  # whole elements per read
            fh.seek(base + start)
            done = 0
            while done < end - start:
                nb = min(step, end - start - done)
                if fh.readinto(buf[:nb].numpy()) != nb:
                    raise ValueError(f"{path}: key {key} is truncated")
                flat[done // item:(done + nb) // item].copy_(buf[:nb].view(src))  # cast (and move) one chunk
                done += nb
            out[key] = dst
    return out


def _cast_to_mapped_file(fh, offset: int, nbytes: int, src: torch.dtype, dtype: torch.dtype, shape: list[int],
                         buf: torch.Tensor, where: str) -> torch.Tensor:
    """The ``nbytes`` at ``offset`` of ``fh`` (``src`` values) cast to ``dtype``, as a view of a private mapping of
    an unlinked temporary file: written through ``buf`` chunk by chunk, so only the rows a lookup reads become
    resident. The file is unlinked once mapped (the mapping keeps it until the tensor dies); an error or Ctrl-C
    while it is written removes it. On a tmpfs temporary folder this would hold the table in memory after all, outside the RSS."""
    import os
    import tempfile

    item = src.itemsize
    step = _CHUNK // item * item
    fd, name = tempfile.mkstemp(prefix="qwen3tts-lookup-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as out:
            fh.seek(offset)
            done = 0
            while done < nbytes:
                nb = min(step, nbytes - done)
                if fh.readinto(buf[:nb].numpy()) != nb:
                    raise ValueError(f"{where} is truncated")
                out.write(buf[:nb].view(src).to(dtype).view(torch.uint8).numpy())  # the cast of one chunk
                done += nb
        size = nbytes // item * dtype.itemsize
        storage = torch.UntypedStorage.from_file(name, shared=False, nbytes=size)
    finally:
        os.unlink(name)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,)).view(dtype).reshape(shape)


def _strict_load(module: torch.nn.Module, path: Path, device: str | torch.device, dtype: torch.dtype) -> None:
    """Load ``path`` into ``module`` (built with parameters on meta), which takes the read tensors themselves."""
    lookups = frozenset(f"{n}.weight" if n else "weight" for n, m in module.named_modules()
                        if isinstance(m, torch.nn.Embedding))
    state = read_weights(path, device, dtype, map_keys=lookups)
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    # Upstream keeps RoPE inv_freq as a non-persistent buffer (not in state_dict); nothing else may be missing.
    if missing or unexpected:
        raise ValueError(f"{path}: upstream strict load failed: missing {missing[:5]} unexpected {unexpected[:5]}")
    module.load_state_dict(state, strict=True, assign=True)
    still_meta = [n for n, t in module.state_dict().items() if t.is_meta]
    if still_meta:
        raise ValueError(f"{path}: upstream load left {len(still_meta)} tensor(s) without values, e.g. {still_meta[:3]}")


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
    from transformers.modeling_utils import init_empty_weights, no_init_weights

    # Parameters on meta (no storage: the file's tensors become them), buffers real (RoPE tables as upstream
    # computes them at construction).
    with no_init_weights(), init_empty_weights(include_buffers=False):
        model = up.M.Qwen3TTSForConditionalGeneration(up.Qwen3TTSConfig(**upstream_config_dict(cfg)))
        tok_cfg = up.Qwen3TTSTokenizerV2Config(**upstream_config_dict(st_cfg))
        # Mimi picks its attention class at construction: set_attn_implementation afterwards would leave the
        # encoder on its default kernel while the reference claims ``attn``.
        tok_cfg.encoder_config._attn_implementation = attn
        tok = up.T.Qwen3TTSTokenizerV2Model(tok_cfg)
    _strict_load(model, ckpt / "model.safetensors", device, dtype)
    _strict_load(tok, ckpt / "speech_tokenizer" / "model.safetensors", device, codec_dtype)
    # Upstream's SpeakerEncoderConfig skips its parent __init__, so set the implementation on sub-models.
    model.talker.set_attn_implementation(attn)
    tok.set_attn_implementation(attn)
    model = _to_keep_rope_fp32(model, device, dtype).eval()
    tok = _to_keep_rope_fp32(tok, device, codec_dtype).eval()
    return Upstream(model, tok, cfg, st_cfg, attn)


def _to_keep_rope_fp32(module: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(device, dtype)`` with RoPE ``inv_freq`` tables kept fp32, as upstream's own
    ``from_pretrained(dtype=...)`` leaves them (a plain ``.to(bf16)`` would round them). The loaded weights are
    already on ``device`` in ``dtype`` (``.to`` leaves them as they are, no copy); this casts the buffers."""
    tables = {n: b.detach().clone() for n, b in module.named_buffers() if n.endswith("inv_freq")}
    module = module.to(device=device, dtype=dtype)
    for name, t in tables.items():
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        setattr(owner, name.rsplit(".", 1)[-1], t.to(device))
    return module
