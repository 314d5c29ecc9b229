"""The harness can fail: deliberate bugs in ``impl`` must turn named parity rows red.

Each mutation is one bug other ports shipped (see parity-practice.md). The talker's layer-0 rows are re-run on the
mutated model against the same upstream reference; the test passes only if the named row FAILS (and the rows
the mutation cannot reach still pass, so a red row is the mutation's doing, not noise).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import impl.layers as layers
from reports.compare import CompareResult

from .helpers import LAYER0_ROWS, build_talker, compare_row_calls, run_stack
from .helpers_bf16 import norm_weight_in_fp32
from .rows import Row

ROWS = LAYER0_ROWS

ROW = {r.name: r for r in ROWS}


def _swap_rope_sign(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, -x1), dim=-1)  # the other sign convention: rotates the wrong way


def _drop_qk_norm(talker) -> None:
    for layer in talker.model.layers:
        layer.self_attn.q_norm = nn.Identity()
        layer.self_attn.k_norm = nn.Identity()


MUTATIONS = {
    # name: (how to mutate, the row that must turn red, a row upstream of the bug that must stay green, dtype)
    "rope-sign-swapped": ("patch", ("rotate_half", _swap_rope_sign), "RoPE", "QK Norm", "float32"),
    "qk-norm-dropped": ("model", _drop_qk_norm, "QK Norm", "QKV Projections", "float32"),
    # a bf16-only bug: judged on the same-dtype row (ours bf16 vs upstream bf16, exact), which can see it
    "norm-weight-multiplied-in-fp32": ("patch_cls", ("forward", norm_weight_in_fp32), "RMS Norm", "Text Projection",
                                       "bfloat16"),
}


@pytest.mark.mutation
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_turns_row_red(name, checkpoint_dir, reference, monkeypatch, record):
    kind, what, red_row, green_row, dtype = MUTATIONS[name]
    ckpt = checkpoint_dir("custom_voice")
    ref = reference("talker_stack", "custom_voice", dtype=dtype)
    if kind == "patch":
        monkeypatch.setattr(layers, what[0], what[1])
    elif kind == "patch_cls":
        monkeypatch.setattr(layers.RMSNorm, what[0], what[1])
    talker = build_talker(ckpt, dtype=getattr(torch, dtype))
    if kind == "model":
        what(talker)
    got = run_stack(talker, ref, "cpu", "eager")
    # bf16: the same-dtype rows compare exactly (test_layer0_bf16_same_dtype: unmutated, every tap is equal)
    rows = {n: Row(r.name, r.taps, "exact") for n, r in ROW.items()} if dtype == "bfloat16" else ROW
    red = compare_row_calls(rows[red_row], got, ref)
    green = compare_row_calls(rows[green_row], got, ref)
    label = red_row + (" (bf16 vs upstream bf16)" if dtype == "bfloat16" else "")
    for r in red:
        record(r, row=f"mutation {name} → {label}", component="Mutation self-test", variant="custom_voice",
               expect_fail=True)
    assert not all(red), f"mutation {name} left row {red_row!r} green: the harness cannot see this bug"
    assert all(green), f"mutation {name} also broke {green_row!r}, which it cannot reach: " + \
        " | ".join(r.message for r in green if not r)


@pytest.mark.mutation
def test_mutation_head_dim_fallback(checkpoint_dir, record):
    """head_dim = hidden/heads (the silent fallback that gave other ports 64 instead of 128): the strict loader
    refuses the checkpoint, naming q_proj and both shapes, so the QKV Projections row cannot be produced: it is
    recorded red with the loader's message."""
    from impl.loading import CheckpointError

    ckpt = checkpoint_dir("custom_voice")

    def fallback(d):
        t = d["talker_config"]
        t["head_dim"] = t["hidden_size"] // t["num_attention_heads"]
        t["rope_scaling"]["mrope_section"] = [t["head_dim"] // 2 - 2 * (t["head_dim"] // 6), t["head_dim"] // 6,
                                              t["head_dim"] // 6]

    with pytest.raises(CheckpointError, match=r"q_proj.weight has shape") as err:
        build_talker(ckpt, cfg_edit=fallback)
    r = CompareResult(f"{ROW['QKV Projections'].taps[0]}", "op", False, [], [], "", message=str(err.value),
                      judged_by="the strict loader refused the checkpoint (no tensor was compared)")
    record(r, row="mutation head-dim-fallback → QKV Projections", component="Mutation self-test",
           variant="custom_voice", expect_fail=True)


def test_comparing_nothing_fails():
    from reports.compare import compare

    r = compare("empty", torch.zeros(0), torch.zeros(0), "op")
    assert isinstance(r, CompareResult) and not r and "zero elements" in r.message
