"""Synthetic checkpoints: the released folder layout with random weights that behave like a model.

``build_checkpoint(preset, variant, seed, out)`` writes::

    out/config.json  generation_config.json  model.safetensors  vocab.json  merges.txt  tokenizer_config.json
    out/speech_tokenizer/{config.json, preprocessor_config.json, model.safetensors}
    out/SYNTHETIC.md  out/synth.json      (how the weights were drawn; provenance)

The key set and shapes come from constructing upstream's own classes from the config (so the layout is the real
one by construction); every parameter and persistent buffer is then drawn under the seed by the rules in
``RULES``. A key no rule claims is an error, never a silent default. Why these scales (measured, see
upstream-offline.md): upstream's own init leaves codebooks at zero (decoded audio is exactly 0) and makes logits
near uniform (greedy argmax margins at fp32 noise level), which would make parity tests vacuous.

Each tensor's generator is seeded from (seed, variant salt, key) (``variant_salt``): a tensor's values do not depend
on which other keys exist, and the variants of one preset get different weights (with one seed per key only, the
tiny base, custom_voice and voice_design talkers were identical and their parity rows counted the same work three
times).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from impl.config import generation_config_dict, preset_config_dicts
from impl.outfile import (
    OutputError,
    atomic_dir,
    atomic_path,
    check_folder,
    check_free_space,
    check_writable,
    write_text,
)

from .upstream import import_upstream, upstream_config_dict

PREPROCESSOR_CONFIG = {
    "chunk_length_s": None, "feature_extractor_type": "EncodecFeatureExtractor", "feature_size": 1,
    "overlap": None, "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
    "sampling_rate": 24000,
}
# What upstream's save_pretrained (transformers 4.57.3) writes; it also decides the text pre-tokenizer regex
# upstream's processor uses (fix_mistral_regex): recorded so both sides read the same folder the same way.
TRANSFORMERS_VERSION = "4.57.3"
HEAD_GAIN = 8.0  # logit std ≈ 8: decisive greedy margins
EOS_ROW_GAIN = 1.6  # lets some sequences stop by EOS while others run to the budget
DECODER_OUT_RMS = 0.2  # final decoder conv rescaled so decoded audio is neither silent nor clipped


def _gen(seed: int, key: str, salt: str = "") -> torch.Generator:
    """A generator for one tensor, seeded from (seed, salt, key); ``salt`` is ``variant_salt(preset, variant)``."""
    name = f"{salt}|{key}" if salt else key
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def variant_salt(preset: str, variant: str) -> str:
    """``base`` keeps the unsalted draw the scales above were tuned on (some greedy sequences stop by EOS, others run
    to the budget: with a fresh base draw every x-vector streaming item stopped within 27 frames, too short to
    exercise long generation); ``custom_voice`` and ``voice_design`` draw their own weights under "<preset>/<variant>",
    so the three variants are three different models."""
    return "" if variant == "base" else f"{preset}/{variant}"


def _normal(shape, std, g):
    return torch.randn(shape, generator=g) * std


def _uniform(shape, lo, hi, g):
    return torch.rand(shape, generator=g) * (hi - lo) + lo


def _fan_in(shape: tuple[int, ...], transposed: bool = False, stride: int = 1) -> float:
    if len(shape) == 2:  # Linear (out, in)
        return shape[1]
    if transposed:  # ConvTranspose1d (in, out/groups, k): each output sees in * k/stride taps
        return max(1.0, shape[0] * shape[2] / stride)
    return shape[1] * shape[2]  # Conv1d (out, in/groups, k)


@dataclass(frozen=True)
class Rule:
    pattern: str  # fnmatch over the full key
    why: str
    fn: Callable[[str, tuple[int, ...], torch.Generator, dict], torch.Tensor]


def _lin(key, shape, g, info):
    return _normal(shape, _fan_in(shape, info.get("transposed", False), info.get("stride", 1)) ** -0.5, g)


def _head(key, shape, g, info):
    return _normal(shape, HEAD_GAIN * shape[1] ** -0.5, g)


RULES: list[Rule] = [
    # codec codebooks (decoder: Parameters embedding_sum/cluster_usage; Mimi: buffers embed_sum/cluster_usage)
    Rule("*codebook.embedding_sum", "codebook vectors N(0,1) (upstream init: zeros → silent audio)",
         lambda k, s, g, i: _normal(s, 1.0, g)),
    Rule("*codebook.embed_sum", "codebook vectors N(0,1) (upstream init: zeros → one constant code)",
         lambda k, s, g, i: _normal(s, 1.0, g)),
    Rule("*codebook.cluster_usage", "cluster usage U(0.5, 2) (codebook = sum / usage)",
         lambda k, s, g, i: _uniform(s, 0.5, 2.0, g)),
    Rule("*codebook.initialized", "Mimi codebooks marked initialised", lambda k, s, g, i: torch.ones(s)),
    Rule("*.alpha", "SnakeBeta log-alpha U(-0.5, 0.5) (upstream init 0)", lambda k, s, g, i: _uniform(s, -0.5, 0.5, g)),
    Rule("*.beta", "SnakeBeta log-beta U(-0.5, 0.5) (upstream init 0)", lambda k, s, g, i: _uniform(s, -0.5, 0.5, g)),
    Rule("*layer_scale.scale", "layer scales U(0.05, 0.15) (upstream 0.01 shrinks the residual branch away)",
         lambda k, s, g, i: _uniform(s, 0.05, 0.15, g)),
    Rule("*.gamma", "ConvNeXt gamma U(0.05, 0.15) (upstream 1e-6)", lambda k, s, g, i: _uniform(s, 0.05, 0.15, g)),
    Rule("*codec_head.weight", "codec head N(0, 8²/fan_in): logit std ≈ 8; EOS row ×1.6", _head),
    Rule("*lm_head.*.weight", "predictor heads N(0, 8²/fan_in): logit std ≈ 8", _head),
    Rule("*embedding.weight", "embeddings N(0, 1)", lambda k, s, g, i: _normal(s, 1.0, g)),
    Rule("*codec_embedding.*.weight", "predictor codec embeddings N(0, 1)", lambda k, s, g, i: _normal(s, 1.0, g)),
    Rule("*decoder.decoder.*.block.*.conv2.conv.weight",
         "codec residual-unit output conv N(0, 1/fan_in) ×0.3: with 12 full-gain residual units the waveform path "
         "grew to ~500 and magnified fp32 rounding ~1000×; a damped residual branch keeps it O(1)",
         lambda k, s, g, i: 0.3 * _lin(k, s, g, i)),
    Rule("*.bias", "biases N(0, 0.02²)", lambda k, s, g, i: _normal(s, 0.02, g)),
    Rule("*norm*.weight", "norm weights U(0.7, 1.3)", lambda k, s, g, i: _uniform(s, 0.7, 1.3, g)),
    Rule("*.weight", "linear/conv weights N(0, 1/fan_in): variance preserving", _lin),
]


def _module_info(model: torch.nn.Module) -> dict[str, dict]:
    """Per parameter key: what kind of module owns it (norms, transposed convs and their stride)."""
    info: dict[str, dict] = {}
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        extra: dict = {}
        if isinstance(mod, torch.nn.ConvTranspose1d):
            extra = {"transposed": True, "stride": mod.stride[0]}
        is_norm = isinstance(mod, torch.nn.LayerNorm) or "Norm" in kind
        for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            key = f"{name}.{pname}" if name else pname
            info[key] = {"kind": kind, "norm": is_norm, **extra}
    return info


def fill(model: torch.nn.Module, seed: int, prefix: str = "", salt: str = "") -> dict[str, str]:
    """Draw every persistent tensor of ``model`` by ``RULES`` (generators salted by ``salt``, see ``_gen``);
    return {key: rule pattern} for the record."""
    info = _module_info(model)
    state = model.state_dict()
    used: dict[str, str] = {}
    with torch.no_grad():
        for key, t in state.items():
            full = prefix + key
            i = info.get(key, {})
            if i.get("norm") and key.endswith(".weight"):
                rule = next(r for r in RULES if r.pattern == "*norm*.weight")
            elif i.get("norm") and key.endswith(".bias"):
                rule = next(r for r in RULES if r.pattern == "*.bias")
            else:
                rule = next((r for r in RULES if fnmatch.fnmatchcase(full, r.pattern)), None)
            if rule is None:
                raise ValueError(f"synth: no rule draws {full} {tuple(t.shape)}; add one to RULES")
            v = rule.fn(full, tuple(t.shape), _gen(seed, full, salt), i)
            t.copy_(v.to(t.dtype))
            used[full] = rule.pattern
    return used


def _postprocess_model(model, cfg: dict) -> None:
    with torch.no_grad():
        eos = cfg["talker_config"]["codec_eos_token_id"]
        model.talker.codec_head.weight[eos] *= EOS_ROW_GAIN
        se = getattr(model, "speaker_encoder", None)
        if se is not None:
            # Zero-mean first-layer filters: otherwise x-vectors of unrelated audio correlate at 0.996.
            w = se.blocks[0].conv.weight
            w -= w.mean(dim=(1, 2), keepdim=True)


def _postprocess_codec(tok, seed: int, salt: str = "") -> float:
    """Rescale the decoder's final conv so decoded audio has rms ≈ DECODER_OUT_RMS before the clamp."""
    dec = tok.decoder
    last = dec.decoder[-1]
    g = _gen(seed, "synth.probe_codes", salt)
    n_q = dec.config.num_quantizers
    codes = torch.randint(0, dec.config.codebook_size, (1, n_q, 24), generator=g)
    seen = {}
    h = last.register_forward_hook(lambda m, a, o: seen.__setitem__("y", o))
    with torch.no_grad():
        dec(codes)
    h.remove()
    rms = float(seen["y"].pow(2).mean().sqrt())
    if rms > 0:
        with torch.no_grad():
            for p in last.parameters():
                p.mul_(DECODER_OUT_RMS / rms)
    return rms


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file``, whose I/O errors (``SafetensorError: … (os error 28)``) are not
    ``OSError``s: turned into one, so the atomic writer reports a full disk as a full disk."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except Exception as e:
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m is None or isinstance(e, OSError):
            raise
        raise OSError(int(m.group(1)), os.strerror(int(m.group(1))), str(path)) from None


def _check_out(out: Path, force: bool) -> None:
    """Before any work: ``out`` is a folder or a new name (not a file), empty unless ``force``, and its parent can
    be written (made when missing). One line naming ``out`` otherwise."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file; --out names the checkpoint folder to write")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: exists and is not empty (use --force to replace it)")
    parent = Path(os.path.realpath(out)).parent
    if parent.is_dir():
        check_writable(parent, out)  # the new folder is built beside ``out``: that folder must take it
    else:
        check_folder(parent, create=True)  # made when missing (as before); a file in the way is one line


def build_checkpoint(preset: str, variant: str, seed: int, out: str | Path, force: bool = False,
                     progress: bool = True) -> Path:
    """Write a synthetic checkpoint folder for ``preset``/``variant`` under ``seed``; return its path.

    The folder is built in a hidden temporary folder beside ``out`` and renamed into place when complete
    (``impl.outfile.atomic_dir``): a failure — a full disk, Ctrl-C, SIGTERM — removes it and leaves an old ``out``
    as it was."""
    from tqdm import tqdm

    out = Path(out)
    cfg, st_cfg = preset_config_dicts(preset, variant)
    cfg = dict(cfg, transformers_version=TRANSFORMERS_VERSION)
    st_cfg = dict(st_cfg, transformers_version=TRANSFORMERS_VERSION)
    _check_out(out, force)
    steps = tqdm(total=5, desc=f"synth {preset}/{variant}", disable=not progress, leave=False)
    try:
        with atomic_dir(out) as tmp:
            (tmp / "speech_tokenizer").mkdir()
            up = import_upstream()
            from transformers.modeling_utils import no_init_weights

            with no_init_weights():
                model = up.M.Qwen3TTSForConditionalGeneration(up.Qwen3TTSConfig(**upstream_config_dict(cfg)))
                tok = up.T.Qwen3TTSTokenizerV2Model(up.Qwen3TTSTokenizerV2Config(**upstream_config_dict(st_cfg)))
            steps.update()
            salt = variant_salt(preset, variant)
            rules_used = fill(model, seed, salt=salt)
            _postprocess_model(model, cfg)
            steps.update()
            rules_used.update(fill(tok, seed, prefix="speech_tokenizer.", salt=salt))
            probe_rms = _postprocess_codec(tok.float().eval(), seed, salt)
            steps.update()
            # The weights' size is known now: refuse a full disk before writing them (+ 16 MB: tokenizer files).
            weights = sum(v.numel() * v.element_size() for m in (model, tok) for v in m.state_dict().values())
            check_free_space(out, weights + 16_000_000, "the synthetic checkpoint")
            for m, rel in ((model, "model.safetensors"), (tok, "speech_tokenizer/model.safetensors")):
                with atomic_path(tmp / rel) as t:
                    _save_file({k: v.contiguous() for k, v in m.state_dict().items()}, t)
            del model, tok
            steps.update()
            write_text(tmp / "config.json", json.dumps(cfg, indent=2))
            write_text(tmp / "generation_config.json", json.dumps(generation_config_dict(), indent=2))
            write_text(tmp / "speech_tokenizer" / "config.json", json.dumps(st_cfg, indent=2))
            write_text(tmp / "speech_tokenizer" / "preprocessor_config.json", json.dumps(PREPROCESSOR_CONFIG, indent=2))
            from .tokenizer_files import write_text_tokenizer

            tok_facts = write_text_tokenizer(tmp)
            record = {
                "preset": preset, "variant": variant, "seed": seed, "seed_salt": salt, "head_gain": HEAD_GAIN,
                "eos_row_gain": EOS_ROW_GAIN, "decoder_out_rms": DECODER_OUT_RMS,
                "decoder_probe_rms_before": probe_rms, "text_tokenizer": tok_facts,
                "rules": {r.pattern: r.why for r in RULES},
                "rule_per_key": rules_used,
            }
            write_text(tmp / "synth.json", json.dumps(record, indent=1))
            write_text(tmp / "SYNTHETIC.md", _readme(preset, variant, seed))
            steps.update()
    finally:
        steps.close()
    return out


def _readme(preset: str, variant: str, seed: int) -> str:
    lines = [f"# Synthetic Qwen3-TTS checkpoint: preset `{preset}`, variant `{variant}`, seed {seed}", "",
             "Real folder layout, random weights. Not a speech model. Drawn by `reference_export synth`:", ""]
    lines += [f"- `{r.pattern}`: {r.why}" for r in RULES]
    lines += ["", f"Post-processing: speaker-encoder first-layer filters made zero-mean; codec_head EOS row ×{EOS_ROW_GAIN};",
              f"final decoder conv rescaled to output rms {DECODER_OUT_RMS} on random codes.",
              "Per-key rules and the probe rms are in `synth.json`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- hashing

HASHED_FILES = ("config.json", "model.safetensors", "speech_tokenizer/config.json",
                "speech_tokenizer/model.safetensors")


def _sha_cache_file(folder: Path) -> Path:
    """Where the per-file hashes of a checkpoint folder are kept: in the harness's own cache (``$QWEN3TTS_CACHE``,
    default ``<repo>/.cache``), keyed by the folder's real path, never inside the folder (a real checkpoint may sit
    in a shared, read-only model cache)."""
    root = Path(os.environ.get("QWEN3TTS_CACHE") or Path(__file__).resolve().parent.parent / ".cache")
    key = hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:32]
    return root / "checkpoint-sha256" / f"{key}.json"


def checkpoint_sha256(folder: str | Path) -> str:
    """sha256 over the configs and weights (the files both sides load). Cached per file by (size, mtime) in the
    harness's cache (``_sha_cache_file``), so a changed file is hashed again."""
    folder = Path(folder)
    cache_path = _sha_cache_file(folder)
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    total = hashlib.sha256()
    changed = False
    files = list(HASHED_FILES)
    if not (folder / "model.safetensors").exists() and (folder / "model.safetensors.index.json").exists():
        idx = json.loads((folder / "model.safetensors.index.json").read_text())
        files = ["config.json", *sorted(set(idx["weight_map"].values())), *HASHED_FILES[2:]]
    for rel in files:
        p = folder / rel
        st = p.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        ent = cache.get(rel)
        if isinstance(ent, dict) and ent.get("stamp") == stamp and isinstance(ent.get("sha256"), str):
            digest = ent["sha256"]
        else:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            digest = h.hexdigest()
            cache[rel] = {"stamp": stamp, "sha256": digest}
            changed = True
        total.update(f"{rel}:{digest}\n".encode())
    if changed:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_text(cache_path, json.dumps(cache))
        except (OSError, OutputError):
            pass  # a read-only cache: just hash again next time
    return total.hexdigest()
