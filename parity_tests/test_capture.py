"""Capture-side guarantees: every registry tap recorded, decode steps stamped, inputs stored for re-runs."""

from __future__ import annotations

import json

from reference_export.registry import expected_taps


def test_decode_steps_are_stamped_per_talker_forward(reference):
    ref = reference("lm_prefill", "custom_voice")
    name = next(n for n in ref.names() if n.startswith("talker.model.norm:"))
    steps = ref.tap_step_numbers(name)
    assert steps == list(range(len(steps))) and len(steps) >= 2  # prefill = 0, then one per decode step


def test_reference_holds_every_registry_tap_and_its_provenance(reference, checkpoint_dir):
    ref = reference("talker_stack", "base")
    meta = ref.meta
    layers = json.loads((checkpoint_dir("base") / "config.json").read_text())["talker_config"]["num_hidden_layers"]
    want = expected_taps("talker_stack", {"talker_config": {"num_hidden_layers": layers}}, {}, {})
    assert want == meta["expected_taps"] and all(ref.has(t) for t in want)
    for k in ("checkpoint_sha256", "qwen_tts_version", "transformers_version", "torch_version", "harness_git_sha"):
        assert meta[k], k
    assert meta["qwen_tts_version"] == "0.1.1" and meta["transformers_version"] == "4.57.3"
    assert ref.case["text"] and ref.inputs() == ["text_ids"]
