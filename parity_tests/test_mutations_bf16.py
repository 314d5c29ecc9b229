"""bf16-only mutations (issue 7, item 5): deliberate bugs that leave fp32 untouched must turn a bf16 row red.

Ours runs in bf16 on CPU against upstream in bf16 on CPU (and the fp64 truth, for the three-way rows of
``test_bf16.py``). Each mutation names the row that must turn red and a row upstream of the bug that must stay
green (so the red is the mutation's doing). Measured on tiny (direct = RMS(ours - upstream bf16) / upstream's own
bf16 error; the three-way bar is 2):

- ``rmsnorm-eps-1e-2`` (the audit's case; "Full Layer 0 (bf16)" passed the referee at 2.64): the talker's RMS Norm
  three-way row goes red (input_layernorm direct 3.95, post_attention_layernorm 2.15; Full Layer 0 2.58).
- ``rope-angles-in-bf16`` (cos/sin from bf16 positions x bf16 inv_freq): red on the Mimi encoder's RoPE three-way
  row (302 positions: q/k after RoPE direct 10-16, SNR 16-18 dB, under the 20 dB floor too). On the talker's 24
  positions the angles round little (direct 0.41 at q_rope): the three-way cannot see it there, the exact row can.
- ``softmax-in-bf16`` (the softmax's arithmetic -- max subtraction, exp, sum, division -- in bf16): no three-way
  row can see it (talker attn_probs direct 0.45; Mimi eager transformer ≤ 0.55; decoder pre-transformer ≤ 0.37):
  upstream's logits are already bf16 when its fp32 softmax starts, so fp32 there only saves ~2 roundings. It is
  red on the exact row (ours bf16 vs upstream bf16, bit for bit on CPU). ``torch.softmax`` on a bf16 tensor is no
  bug at all on CPU: it accumulates in fp32 and rounds once, bit-identical to upstream (0 of every tap differs).
- ``cp-residual-in-fp32`` (the code predictor's residual stream kept fp32 through a layer, cast to bf16 at the
  layer output instead of after each residual add): three-way direct 0.7-0.8 (it makes ours *more* accurate);
  red on the exact row. Other cast boundaries measured: the MTP projection in fp32 then cast (bit-identical to
  upstream: the CPU bf16 GEMM accumulates in fp32 and rounds once), its product and bias rounded separately
  (direct 0.96-1.06), the final norm and heads in fp32 (direct 0.27-0.35): none reaches 2x, all are exact-row red.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import impl.layers as layers
from impl.model import Qwen3TTS
from impl.taps import recording

from .helpers import LAYER0_ROWS, build_talker, run_stack, teacher_run
from .helpers_codec import ENC, build_encoder
from .rows import Row, compare_row, compare_row_three_way

BF16 = torch.bfloat16
ROW = {r.name: r for r in LAYER0_ROWS}
CP = "talker.code_predictor"


def _rope_angles_in_bf16(self, x: torch.Tensor, positions: torch.Tensor):
    # The bug: positions and inverse frequencies in bf16, the product rounded to 8 bits (upstream: fp32, autocast off)
    freqs = positions.to(BF16).unsqueeze(-1) * self.inv_freq.to(BF16)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class _SoftmaxInBf16:
    """``torch.nn.functional`` with a softmax whose arithmetic runs in the activation dtype (dtype= ignored)."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def softmax(w: torch.Tensor, dim: int = -1, dtype=None) -> torch.Tensor:
        w = w - w.amax(dim, keepdim=True)
        e = w.exp()
        return e / e.sum(dim, keepdim=True)


def _residual_in_fp32(self, x, cos, sin, mask, cache=None, layer=0):
    # The bug: the residual stream kept fp32 through the layer, one cast at its output (upstream adds in bf16).
    a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
    h = x.float() + a.float()
    m = self.mlp(self.post_attention_layernorm(h.to(x.dtype)))
    return (h + m.float()).to(x.dtype)


def _worst_direct(results) -> str:
    d = [r.extra.get("direct_ratio", 0.0) for r in results]
    return f"three-way direct ratio at most {max(d):.2f} (bar 2)"


@pytest.mark.mutation
def test_rmsnorm_eps_1e2(checkpoint_dir, reference, record):
    ref16 = reference("talker_stack", "custom_voice", dtype="bfloat16", device="cpu")
    truth = reference("talker_stack", "custom_voice", dtype="float64", device="cpu")
    talker = build_talker(checkpoint_dir("custom_voice"), "cpu", BF16)
    for m in talker.modules():
        if isinstance(m, layers.RMSNorm):
            m.eps = 1e-2
    got = run_stack(talker, ref16, "cpu", "eager")
    red = compare_row_three_way(ROW["RMS Norm"], got, ref16, truth, "bfloat16", "cpu bf16")
    green = compare_row_three_way(ROW["Text Projection"], got, ref16, truth, "bfloat16", "cpu bf16")
    for r in red:
        record(r, row="mutation rmsnorm-eps-1e-2 → RMS Norm (bf16 three-way)", component="Mutation self-test",
               variant="custom_voice", expect_fail=True)
    assert not all(red), "RMSNorm eps 1e-2 left the bf16 three-way RMS Norm row green: " + _worst_direct(red)
    assert all(green), " | ".join(r.message for r in green if not r)


@pytest.mark.mutation
def test_rope_angles_in_bf16(checkpoint_dir, reference, monkeypatch, record):
    ref16 = reference("codec_encoder", "base", device="cpu", codec_dtype="bfloat16")
    truth = reference("codec_encoder", "base", dtype="float64", device="cpu")
    monkeypatch.setattr(layers.RotaryEmbedding, "forward", _rope_angles_in_bf16)
    attn = ref16.meta["attn"]
    enc = build_encoder(checkpoint_dir("base"), "cpu", BF16, attn=attn)
    with recording(enc, ENC) as rec, torch.no_grad():
        enc(ref16.input("audio").to(BF16), ref16.input("padding_mask"))
    got = {k: v[0] for k, v in rec.records.items()}
    n = enc.cfg.num_hidden_layers
    L = f"{ENC}.encoder_transformer.layers"
    rope = Row("Mimi RoPE", tuple(f"{L}.{i}.self_attn:{p}" for i in range(n) for p in ("q_rope", "k_rope")), "three_way")
    before = Row("Mimi SEANet + first norm", (f"{ENC}.encoder:out", f"{L}.0.input_layernorm:out"), "three_way")
    red = compare_row_three_way(rope, got, ref16, truth, "bfloat16", "cpu bf16")
    green = compare_row_three_way(before, got, ref16, truth, "bfloat16", "cpu bf16")
    for r in red:
        record(r, row="mutation rope-angles-in-bf16 → Mimi RoPE (bf16 three-way)", component="Mutation self-test",
               variant="base", expect_fail=True, notes="302 positions")
    assert not all(red), "RoPE angles in bf16 left the Mimi RoPE three-way row green: " + _worst_direct(red)
    assert all(green), " | ".join(r.message for r in green if not r)


@pytest.mark.mutation
def test_softmax_in_bf16(checkpoint_dir, reference, monkeypatch, record):
    ref16 = reference("talker_stack", "custom_voice", dtype="bfloat16", device="cpu")
    truth = reference("talker_stack", "custom_voice", dtype="float64", device="cpu")
    monkeypatch.setattr(layers, "F", _SoftmaxInBf16())
    got = run_stack(build_talker(checkpoint_dir("custom_voice"), "cpu", BF16), ref16, "cpu", "eager")
    probs = ROW["Attention (probabilities)"]
    three = compare_row_three_way(probs, got, ref16, truth, "bfloat16", "cpu bf16")
    red = compare_row(Row(probs.name, probs.taps, "exact"), got, ref16)
    green = compare_row(Row("RoPE", ROW["RoPE"].taps, "exact"), got, ref16)
    for r in red:
        record(r, row="mutation softmax-in-bf16 → Attention (probabilities) (bf16 vs upstream bf16)",
               component="Mutation self-test", variant="custom_voice", expect_fail=True,
               notes="invisible to the three-way row: " + _worst_direct(three))
    assert not all(red), "softmax arithmetic in bf16 left the exact bf16 attention row green"
    assert all(green), " | ".join(r.message for r in green if not r)


@pytest.mark.mutation
def test_code_predictor_cast_boundary(checkpoint_dir, reference, record):
    ref16 = reference("lm_cp_teacher", "base", dtype="bfloat16", device="cpu")
    truth = reference("lm_cp_teacher", "base", dtype="float64", device="cpu")
    tts = Qwen3TTS.from_pretrained(checkpoint_dir("base"), device="cpu", dtype=BF16, attn="eager")  # fresh, uncached
    for layer in tts.talker.code_predictor.model.layers:
        layer.forward = types.MethodType(_residual_in_fp32, layer)
    got = teacher_run(tts, ref16, BF16)
    n = len(tts.talker.code_predictor.model.layers)
    outs = tuple(f"{CP}.model.layers.{i}:out" for i in range(n)) + (f"{CP}:teacher_logits",)
    three = compare_row_three_way(Row("Layers", outs, "three_way"), got, ref16, truth, "bfloat16", "cpu bf16")
    red = compare_row(Row("Layers", outs, "exact"), got, ref16)
    green = compare_row(Row("before the first residual add", (f"{CP}.small_to_mtp_projection:out",
                                                              f"{CP}.model.layers.0.self_attn:out"), "exact"), got, ref16)
    for r in red:
        record(r, row="mutation cp-residual-in-fp32 → Code predictor layers (bf16 vs upstream bf16)",
               component="Mutation self-test", variant="base", expect_fail=True,
               notes="invisible to the three-way row: " + _worst_direct(three))
    assert not all(red), "a residual cast boundary in the code predictor left the exact bf16 row green"
    assert all(green), " | ".join(r.message for r in green if not r)
