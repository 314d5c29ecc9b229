"""Talker stack cases: text ids -> text embedding -> text projection -> decoder layers -> final norm.

``talker_stack``: one prefill over a chat-templated text, positions 0..T-1 (three equal M-RoPE rows, as upstream
inference feeds them). ``talker_stack_mrope``: the same with three *distinct* position rows, so the interleaved
section merge itself is exercised (in inference it is invisible). Both under eager attention, so attention
probabilities exist.
"""

from __future__ import annotations

import torch

from ..registry import register_taps
from . import Case, CaseEnv, register

TEXT = "Hello world! Parity is checked layer by layer, 逐层检查。"


def _inputs(env: CaseEnv) -> dict[str, torch.Tensor]:
    ids = env.tokenize(f"<|im_start|>assistant\n{TEXT}<|im_end|>\n<|im_start|>assistant\n")
    return {"text_ids": torch.tensor([ids], dtype=torch.long)}


def _inputs_mrope(env: CaseEnv) -> dict[str, torch.Tensor]:
    d = _inputs(env)
    T = d["text_ids"].shape[1]
    t = torch.arange(T)
    # Distinct rows: temporal, height, width positions as a vision-style grid would give.
    d["position_ids"] = torch.stack([t, t // 3, t % 5 + 7])[:, None, :]  # (3, 1, T)
    return d


def run_stack(up, inputs: dict[str, torch.Tensor], rec) -> None:
    """The upstream computation the talker_stack cases capture (hooks record every module)."""
    talker = up.model.talker
    dev = next(talker.parameters()).device
    ids = inputs["text_ids"].to(dev)
    with torch.no_grad():
        emb = talker.text_projection(talker.model.text_embedding(ids))
        pos = inputs.get("position_ids")
        talker.model(inputs_embeds=emb, position_ids=None if pos is None else pos.to(dev), use_cache=False)


register(Case(
    name="talker_stack", component="talker_stack", roots=("talker",), attn="eager", record_inputs=True,
    description="text ids -> text embedding/projection -> every talker layer -> final norm (prefill, eager)",
    make_inputs=_inputs, run=run_stack, settings={"text": TEXT, "template": "assistant"},
    include=("talker.model.*", "talker.text_projection*"),
))
register(Case(
    name="talker_stack_mrope", component="talker_stack", roots=("talker",), attn="eager", record_inputs=True,
    description="as talker_stack, with three distinct M-RoPE position rows",
    make_inputs=_inputs_mrope, run=run_stack, settings={"text": TEXT, "distinct_mrope_rows": True},
    include=("talker.model.*", "talker.text_projection*"),
))


LAYER_POINTS = [
    "input_layernorm:out", "self_attn.q_proj:out", "self_attn.k_proj:out", "self_attn.v_proj:out",
    "self_attn.q_norm:out", "self_attn.k_norm:out", "self_attn:q_rope", "self_attn:k_rope", "self_attn:attn_probs",
    "self_attn.o_proj:in", "self_attn.o_proj:out", "self_attn:out", "post_attention_layernorm:out",
    "mlp.gate_proj:out", "mlp.up_proj:out", "mlp.down_proj:in", "mlp:out", ":out",
]


def layer_taps(prefix: str, i: int) -> list[str]:
    base = f"{prefix}.layers.{i}"
    return [f"{base}{p}" if p.startswith(":") else f"{base}.{p}" for p in LAYER_POINTS]


@register_taps("talker_stack")
def _talker_stack_taps(cfg: dict, st_cfg: dict, settings: dict) -> list[str]:
    n = cfg["talker_config"]["num_hidden_layers"]
    taps = ["talker.model.text_embedding:out", "talker.text_projection.linear_fc1:out",
            "talker.text_projection:out", "talker.model.layers.0:in"]
    for i in range(n):
        taps += layer_taps("talker.model", i)
    return taps + ["talker.model.norm:out"]
