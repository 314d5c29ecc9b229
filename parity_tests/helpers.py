"""Helpers the parity test files share: building ``impl`` models from a checkpoint folder, running them on a
reference case's inputs, and the row definitions several files judge (talker layer 0, generation, the code
predictor, the mel front end). Test files import from here, never from each other; fixtures live in
``parity_tests/conftest.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import impl.mel
from impl.config import Qwen3TTSConfig
from impl.generate import GenerationSettings, generate
from impl.layers import attention, causal_mask
from impl.loading import load_into, read_state_dict
from impl.model import Qwen3TTS
from impl.prompt import PromptRequest, build
from impl.sampling import make_generator
from impl.talker import Talker
from impl.taps import recording
from reference_export.cases.lm import MODES
from reports.compare import CompareResult, compare, compare_exact

from .rows import Row

# ------------------------------------------------------------------------------------------ talker layer 0

L0 = "talker.model.layers.0"
LAYER0_ROWS = [
    Row("Text Embedding", ("talker.model.text_embedding:out",), "op"),
    Row("Text Projection", ("talker.text_projection.linear_fc1:out", "talker.text_projection:out"), "op"),
    Row("RMS Norm", (f"{L0}.input_layernorm:out", f"{L0}.post_attention_layernorm:out"), "op"),
    Row("QKV Projections", (f"{L0}.self_attn.q_proj:out", f"{L0}.self_attn.k_proj:out", f"{L0}.self_attn.v_proj:out"), "op"),
    Row("QK Norm", (f"{L0}.self_attn.q_norm:out", f"{L0}.self_attn.k_norm:out"), "op"),
    Row("RoPE", (f"{L0}.self_attn:q_rope", f"{L0}.self_attn:k_rope"), "op"),
    Row("Attention (probabilities)", (f"{L0}.self_attn:attn_probs",), "block"),
    Row("Attention (output)", (f"{L0}.self_attn.o_proj:in",), "block"),
    Row("O Projection", (f"{L0}.self_attn.o_proj:out",), "op"),
    Row("MLP", (f"{L0}.mlp.gate_proj:out", f"{L0}.mlp.up_proj:out", f"{L0}.mlp:out"), "block"),
    Row("Full Layer 0", (f"{L0}:out",), "block"),
]


def build_talker(ckpt: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, cfg_edit=None) -> Talker:
    """impl's talker stack from a checkpoint folder (text side + decoder layers)."""
    d = json.loads((ckpt / "config.json").read_text())
    if cfg_edit:
        cfg_edit(d)
    cfg = Qwen3TTSConfig.from_dict(d, where=str(ckpt / "config.json"))
    talker = Talker(cfg.talker_config)
    where = str(ckpt / "model.safetensors")
    load_into(talker.model, read_state_dict(ckpt, "talker.model."), where, "talker.model.")
    load_into(talker.text_projection, read_state_dict(ckpt, "talker.text_projection."), where, "talker.text_projection.")
    return talker.to(device=device, dtype=dtype).eval()


def run_stack(talker: Talker, ref, device: str, attn: str) -> dict[str, torch.Tensor]:
    """Run impl on the reference's inputs with attention ``attn`` (the talker's module setting, for this run only);
    return {tap name: tensor}."""
    ids = ref.input("text_ids").to(device)
    B, T = ids.shape
    if "position_ids" in ref.inputs():
        pos = ref.input("position_ids").to(device)  # (3, B, T) distinct rows
    else:
        pos = torch.arange(T, device=device).expand(3, B, T)  # upstream's default: cache_position, 3 equal rows
    dtype = next(talker.parameters()).dtype
    with attention(talker, attn), recording(talker, prefix="talker", inputs=True) as rec, torch.no_grad():
        mask = causal_mask(T, T, dtype, torch.device(device), None)
        talker.model(talker.embed_text(ids), pos, mask)
    return {k: v[0] for k, v in rec.records.items()}


# ------------------------------------------------------------------------------------------ generation

GEN_CASES = [pytest.param(m, nsm, id=f"{m}-{'nonstream' if nsm else 'stream'}") for m in MODES for nsm in (False, True)]
TEXT_NAME = {False: "streaming text", True: "non-streaming text"}
MODE_NAME = {"custom_voice": "custom_voice", "voice_design": "voice_design", "xvec": "voice_clone x-vector",
             "icl": "voice_clone ICL"}


_MODELS: dict[tuple, Qwen3TTS] = {}


def load_model(ckpt: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, attn: str = "eager") -> Qwen3TTS:
    key = (str(ckpt), device, dtype, attn)
    if key not in _MODELS:
        if len(_MODELS) > 4:
            _MODELS.clear()
        _MODELS[key] = Qwen3TTS.from_pretrained(ckpt, device=device, dtype=dtype, attn=attn)
    return _MODELS[key]


def requests_from_ref(ref) -> list[PromptRequest]:
    """The case's batch as impl requests: stored ids, settings, and upstream's recorded x-vectors / ref codes."""
    s = ref.case
    names = set(ref.inputs())
    n = len(s["texts"])
    reqs = []
    for i in range(n):
        r = PromptRequest(ref.input(f"text_ids_{i}").tolist(), language=s["languages"][i],
                          non_streaming=bool(s["non_streaming"]))
        if f"instruct_ids_{i}" in names:
            r.instruct_ids = ref.input(f"instruct_ids_{i}").tolist()
        if s.get("speakers"):
            r.speaker = s["speakers"][i]
        if ref.has("generate:xvector"):
            r.xvector = ref.tap_steps("generate:xvector")[i]
            if s.get("icl"):
                r.ref_ids = ref.input(f"ref_ids_{i}").tolist()
                r.ref_codes = ref.tap_steps("generate:ref_codes")[i].long()
        reqs.append(r)
    return reqs


def settings_from_ref(tts: Qwen3TTS, ref) -> tuple[GenerationSettings, int | None]:
    s = ref.case
    if s.get("greedy"):
        return GenerationSettings.greedy(int(s["max_new_tokens"])), None
    return tts.settings(max_new_frames=int(s["max_new_tokens"]) - 1, **s["sampling"]), int(s["seed"])


def run_impl(tts: Qwen3TTS, ref, record_taps: bool = True):
    """impl's generation on a case: (GenerationResult, {tap: [tensor per call]})."""
    reqs = requests_from_ref(ref)
    settings, seed = settings_from_ref(tts, ref)
    with torch.inference_mode(), recording(tts.talker if record_taps else None, prefix="talker") as rec:
        prompt = build(tts.talker, tts.config, reqs)
        res = generate(tts.talker, prompt, settings, make_generator(seed, tts.device))
    return res, rec.records


_RUNS: dict[tuple, tuple] = {}  # gen_run's cache (parity_tests/conftest.py)


def compare_codes(name: str, ours: torch.Tensor, ref: torch.Tensor, margins: torch.Tensor) -> CompareResult:
    """Exact codes (frames, 16); on mismatch the first differing (frame, codebook) and our margin there."""
    n = min(ours.shape[0], ref.shape[0])
    if n and not torch.equal(ours[:n].cpu(), ref[:n].cpu()):
        r = compare_exact(name, ours[:n], ref[:n], axes=("frame", "codebook"))
        f, c = r.first_diff
        r.extra["margin_at_first_diff"] = float(margins[f, c])
        r.message += f"; our top1-top2 margin there {float(margins[f, c]):.3g} (a tie if ~0)"
    else:
        r = compare_exact(name, ours, ref, axes=("frame", "codebook"))
        if ours.shape[0] != ref.shape[0]:
            r.message += f" (frames: ours {ours.shape[0]}, upstream {ref.shape[0]}; equal up to frame {n})"
    r.extra.update(frames=int(ref.shape[0]), frames_ours=int(ours.shape[0]),
                   min_margin=float(margins.min()) if margins.numel() else math.inf)
    return r


# ------------------------------------------------------------------------------------------ code predictor, mel


def teacher_run(tts, ref, dtype=torch.float32):
    """impl's teacher-forced predictor on the case inputs -> {tap: tensor}, under ``tts.attn`` (a loaded model's
    own setting, or the one a stand-in names)."""
    t = tts.talker
    dev = tts.device
    hidden = ref.input("hidden").to(dev, dtype)
    codes = ref.input("codes").to(dev)
    with attention(t, tts.attn), torch.inference_mode(), recording(t, prefix="talker") as rec:
        c0 = t.embed_codec(codes[:, :1])
        t.code_predictor.forward_teacher(hidden, codes, c0)
    return {k: v[0] for k, v in rec.records.items()}


def mel_results(ref, device: str = "cpu") -> list[CompareResult]:
    wav = ref.tap("speaker_encoder:wav24k").to(device)
    got = impl.mel.mel_spectrogram(wav[None]).transpose(1, 2)  # (1, F, 128), as upstream feeds the encoder
    return [compare("speaker_encoder:in (mel)", got, ref.tap("speaker_encoder:in"), "op")]
