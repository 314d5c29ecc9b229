"""Talker layer 0, op by op, against upstream (the harness's vertical slice; tests ``impl/layers.py`` and the
first layers of ``impl/talker.py``).

Our talker runs end to end on the reference's stored text ids (and positions); every tap of layer 0 is compared
with upstream's. Rows: Text Embedding, Text Projection, RMS Norm, QKV Projections, QK Norm, RoPE, Attention
(probabilities and output), O Projection, MLP, Full Layer 0 — for every variant on ``tiny``, and on 0.6b
dimensions behind ``-m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from impl.config import Qwen3TTSConfig
from impl.layers import causal_mask
from impl.loading import load_into, read_state_dict
from impl.talker import Talker
from impl.taps import recording

from .rows import Row, assert_row, compare_row

L0 = "talker.model.layers.0"
ROWS = [
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
VARIANTS = ["base", "custom_voice", "voice_design"]


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
    """Run impl on the reference's inputs; return {tap name: tensor}."""
    ids = ref.input("text_ids").to(device)
    B, T = ids.shape
    if "position_ids" in ref.inputs():
        pos = ref.input("position_ids").to(device)  # (3, B, T) distinct rows
    else:
        pos = torch.arange(T, device=device).expand(3, B, T)  # upstream's default: cache_position, 3 equal rows
    dtype = next(talker.parameters()).dtype
    with recording(talker, prefix="talker", inputs=True) as rec, torch.no_grad():
        mask = causal_mask(T, T, dtype, torch.device(device), None)
        talker.model(talker.embed_text(ids), pos, mask, impl=attn)
    return {k: v[0] for k, v in rec.records.items()}


@pytest.fixture(scope="module")
def stack_runs(checkpoint_dir, reference, device, attn):
    cache: dict = {}

    def get(variant: str, case: str = "talker_stack", preset: str | None = None):
        key = (variant, case, preset)
        if key not in cache:
            ref = reference(case, variant, preset)
            talker = build_talker(checkpoint_dir(variant, preset), device)
            cache[key] = (run_stack(talker, ref, device, attn), ref)
        return cache[key]

    return get


def _check(row: Row, got, ref, attn: str):
    if row.name == "Attention (probabilities)" and attn != "eager":
        pytest.skip("attention probabilities exist only on the eager path (run with --attn eager)")
    return compare_row(row, got, ref)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_layer0(row: Row, variant: str, stack_runs, record, attn):
    got, ref = stack_runs(variant)
    results = _check(row, got, ref, attn)
    for r in results:
        record(r, row=row.name, component="Talker layer 0", variant=variant)
    assert_row(row.name, results)


@pytest.mark.parametrize("row", [r for r in ROWS if r.name in ("RoPE", "Attention (output)", "Full Layer 0")],
                         ids=lambda r: r.name)
def test_layer0_distinct_mrope_rows(row: Row, stack_runs, record, attn):
    """Three distinct M-RoPE position rows: the interleaved section merge itself (invisible in inference)."""
    got, ref = stack_runs("custom_voice", "talker_stack_mrope")
    results = _check(row, got, ref, attn)
    for r in results:
        record(r, row=f"{row.name} (distinct M-RoPE rows)", component="Talker layer 0", variant="custom_voice")
    assert_row(row.name, results)


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_layer0_released_dims(row: Row, stack_runs, record, attn):
    """0.6b dimensions (random weights): head_dim 128 with a 1024-wide talker, 16/8 heads."""
    got, ref = stack_runs("base", preset="0.6b")
    results = _check(row, got, ref, attn)
    for r in results:
        record(r, row=row.name, component="Talker layer 0 (0.6b dims)", variant="base", preset_override="0.6b")
    assert_row(row.name, results)



def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


@pytest.mark.parametrize("row", [r for r in ROWS if r.name in ("RMS Norm", "RoPE", "Attention (output)", "MLP",
                                                               "Full Layer 0")], ids=lambda r: r.name)
def test_layer0_bf16_referee(row: Row, checkpoint_dir, reference, record):
    """impl in bf16 on CPU vs upstream fp32, judged against upstream's own bf16 error (the referee tier)."""
    from reports.compare import compare

    variant = "custom_voice"
    ref32 = reference("talker_stack", variant)
    ref16 = reference("talker_stack", variant, dtype="bfloat16")
    talker = build_talker(checkpoint_dir(variant), "cpu", torch.bfloat16)
    got = run_stack(talker, ref32, "cpu", "eager")
    results = []
    for name in row.taps:
        up_err = _rms(ref16.tap(name).double() - ref32.tap(name).double())
        r = compare(name, got[name].float(), ref32.tap(name).float(), "referee", referee_ref_err=up_err)
        record(r, row=f"{row.name} (bf16 vs fp32)", component="Talker layer 0, bf16", variant=variant)
        results.append(r)
    assert_row(row.name, results)


@pytest.mark.cuda
@pytest.mark.parametrize("impl_attn", ["eager", "sdpa"])
def test_layer0_cuda_fp32(impl_attn, checkpoint_dir, reference, record):
    """impl on CUDA in fp32 (TF32 off) vs upstream fp32 CPU references."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: CUDA rows are not measured here")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = reference("talker_stack", "custom_voice")
    got = run_stack(build_talker(checkpoint_dir("custom_voice"), "cuda"), ref, "cuda", impl_attn)
    results = []
    for row in ROWS:
        if row.name == "Attention (probabilities)" and impl_attn != "eager":
            continue
        for r in compare_row(Row(row.name, row.taps, "stack"), got, ref):
            record(r, row=f"{row.name} (CUDA fp32, {impl_attn})", component="Talker layer 0, CUDA", variant="custom_voice")
            results.append(r)
    assert_row("CUDA layer 0", results)
