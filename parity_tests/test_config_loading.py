"""Strict config parsing and strict checkpoint loading: clear one-line errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from impl.config import ConfigError, Qwen3TTSConfig, SpeechTokenizerConfig, preset_config_dicts
from impl.loading import CheckpointError, load_into, read_state_dict


@pytest.mark.parametrize("preset,variant", [("tiny", "base"), ("tiny", "custom_voice"), ("tiny", "voice_design"),
                                            ("0.6b", "base"), ("0.6b", "custom_voice"), ("1.7b", "base"),
                                            ("1.7b", "custom_voice"), ("1.7b", "voice_design")])
def test_presets_parse(preset, variant):
    c, s = preset_config_dicts(preset, variant)
    cfg = Qwen3TTSConfig.from_dict(c)
    SpeechTokenizerConfig.from_dict(s)
    t = cfg.talker_config
    assert t.head_dim * t.num_attention_heads != t.hidden_size or preset == "1.7b"  # head_dim is not hidden/heads
    assert (cfg.speaker_encoder_config is not None) == (variant == "base")


def test_unknown_key_raises_naming_it():
    c, _ = preset_config_dicts("tiny", "base")
    c["talker_config"]["hiden_size"] = 3
    with pytest.raises(ConfigError, match=r"talker_config: unknown key\(s\) \['hiden_size'\]"):
        Qwen3TTSConfig.from_dict(c)


@pytest.mark.parametrize("path", [("talker_config", "head_dim"), ("talker_config", "text_vocab_size"),
                                  ("talker_config", "rope_scaling")])
def test_keys_upstream_reads_through_kwargs_are_required(path):
    c, _ = preset_config_dicts("tiny", "custom_voice")
    del c[path[0]][path[1]]
    with pytest.raises(ConfigError, match=path[1]):
        Qwen3TTSConfig.from_dict(c)


def test_codec_head_dim_required_and_bad_rates_rejected():
    _, s = preset_config_dicts("tiny", "base")
    s2 = copy.deepcopy(s)
    del s2["decoder_config"]["head_dim"]
    with pytest.raises(ConfigError, match="head_dim"):
        SpeechTokenizerConfig.from_dict(s2)
    s3 = copy.deepcopy(s)
    s3["decoder_config"]["upsample_rates"] = [8, 5, 4, 2]
    with pytest.raises(ConfigError, match="1920"):
        SpeechTokenizerConfig.from_dict(s3)


def test_upstream_serialised_config_parses():
    """The full transformers-serialised form (every PretrainedConfig attribute) is accepted."""
    from reference_export.upstream import import_upstream

    up = import_upstream()
    c, _ = preset_config_dicts("tiny", "custom_voice")
    full = up.Qwen3TTSConfig(**c).to_dict()
    cfg = Qwen3TTSConfig.from_dict(json.loads(json.dumps(full, default=str)))
    assert cfg.talker_config.head_dim == 32


def test_loader_errors_name_file_key_and_shapes(tmp_path):
    lin = torch.nn.Linear(3, 2)
    save_file({"m.weight": torch.ones(2, 3), "m.bias": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    load_into(lin, read_state_dict(tmp_path, "m."), "f", "m.")
    save_file({"m.weight": torch.ones(2, 4), "m.bias": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"f: key m.weight has shape \(2, 4\), model expects \(2, 3\)"):
        load_into(lin, read_state_dict(tmp_path, "m."), "f", "m.")
    save_file({"m.weight": torch.ones(2, 3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \[m.bias\]"):
        load_into(lin, read_state_dict(tmp_path, "m."), "f", "m.")
    save_file({"m.weight": torch.ones(2, 3), "m.bias": torch.zeros(2), "m.extra": torch.zeros(1)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \[m.extra\]"):
        load_into(lin, read_state_dict(tmp_path, "m."), "f", "m.")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        read_state_dict(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        read_state_dict(tmp_path)


def test_sampling_hard_defaults_are_upstreams():
    """Where generation_config.json lacks a key, ours falls back to ``impl.model.HARD_DEFAULTS``: the same values as
    upstream's wrapper (``Qwen3TTSModel._merge_generate_kwargs`` with no generate_config.json), key for key (found
    by generated mutants, temperature 0.9 → 9.0 and SamplingConfig's top_p 1.0 → 0.1, that no row caught: every
    synthetic checkpoint has all keys)."""
    from impl.model import HARD_DEFAULTS
    from reference_export.upstream import import_upstream

    import_upstream()
    from qwen_tts.inference.qwen3_tts_model import Qwen3TTSModel

    wrapper = Qwen3TTSModel.__new__(Qwen3TTSModel)  # the merge reads only generate_defaults
    wrapper.generate_defaults = {}
    merged = wrapper._merge_generate_kwargs()
    assert {k: merged[k] for k in HARD_DEFAULTS} == HARD_DEFAULTS
    assert set(merged) == set(HARD_DEFAULTS), "upstream merges keys ours does not know"
    # GenerationSettings() ("defaults are upstream's") and SamplingConfig's own defaults say the same
    from impl.generate import GenerationSettings

    s = GenerationSettings()
    ours = {"do_sample": s.talker.do_sample, "top_k": s.talker.top_k, "top_p": s.talker.top_p,
            "temperature": s.talker.temperature, "repetition_penalty": s.talker.repetition_penalty,
            "subtalker_dosample": s.predictor.do_sample, "subtalker_top_k": s.predictor.top_k,
            "subtalker_top_p": s.predictor.top_p, "subtalker_temperature": s.predictor.temperature,
            "max_new_tokens": s.max_new_tokens}
    assert ours == {k: merged[k] for k in ours}
    assert s.predictor.repetition_penalty == 1.0 and s.predictor.min_new_tokens == 0  # the predictor has neither
    g = GenerationSettings.greedy()  # greedy: upstream's budget and repetition penalty, sampling off on both
    assert (g.max_new_tokens, g.talker.repetition_penalty) == (merged["max_new_tokens"], merged["repetition_penalty"])
    assert not g.talker.do_sample and not g.predictor.do_sample
