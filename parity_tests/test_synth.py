"""Synthetic checkpoints: the three variants of a preset are different models, so their rows count distinct work."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors import safe_open

VARIANTS = ("base", "custom_voice", "voice_design")
KEYS = ("talker.model.layers.0.self_attn.q_proj.weight", "talker.model.text_embedding.weight",
        "talker.codec_head.weight")


def _tensor(ckpt, key: str) -> torch.Tensor:
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return f.get_tensor(key)


@pytest.mark.parametrize("key", KEYS)
def test_variants_draw_different_weights(key, checkpoint_dir):
    """Seeded per (preset, variant): a key shared by the variants holds different values in each."""
    w = {v: _tensor(checkpoint_dir(v), key) for v in VARIANTS}
    for a, b in itertools.combinations(VARIANTS, 2):
        assert w[a].shape == w[b].shape
        assert not torch.equal(w[a], w[b]), f"{key}: {a} and {b} hold identical weights"


def test_variants_give_different_talker_references(reference):
    """The talker_stack references of the three variants differ (they were byte-identical with one seed per key)."""
    name = "talker.model.layers.0:out"
    outs = {v: reference("talker_stack", v).tap(name) for v in VARIANTS}
    for a, b in itertools.combinations(VARIANTS, 2):
        assert not torch.equal(outs[a], outs[b]), f"{name}: the {a} and {b} references are identical"
