"""Configs for every sub-model, parsed strictly from a checkpoint's ``config.json`` or built from a preset.

One dataclass per sub-model (``TalkerConfig``, ``CodePredictorConfig``, ``SpeakerEncoderConfig``,
``CodecDecoderConfig``, ``CodecEncoderConfig``) under ``Qwen3TTSConfig`` / ``SpeechTokenizerConfig``.
Unknown keys raise ``ConfigError`` naming the file and key, except the generic keys every transformers
``PretrainedConfig`` serialises (listed in ``HF_GENERIC_KEYS``) and a short named list per config that upstream
stores but never reads. A silently dropped ``head_dim`` is how other ports got 64 instead of 128, so required
keys that upstream only reads through ``**kwargs`` (``head_dim``, ``text_vocab_size``, ``rope_scaling``,
``codebook_dim``) are required here too.

Presets: ``preset_config_dicts(preset, variant)`` returns the two JSON dicts (``config.json`` and
``speech_tokenizer/config.json``) for ``tiny``, ``0.6b`` or ``1.7b``; the released ones are copied from the
published checkpoints' configs into ``impl/presets/``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "presets"
VARIANTS = ("base", "custom_voice", "voice_design")
PRESET_NAMES = ("tiny", "0.6b", "1.7b")


class ConfigError(ValueError):
    """A config file or dict that does not describe a model we can build."""


# Keys every transformers PretrainedConfig serialises (transformers 4.57.3, ``PretrainedConfig().to_dict()``),
# plus a few attribute names ``save_pretrained`` adds. None of them changes what the 12 Hz model computes.
HF_GENERIC_KEYS = frozenset(
    """_name_or_path add_cross_attention architectures bad_words_ids begin_suppress_tokens bos_token_id
    chunk_size_feed_forward cross_attention_hidden_size decoder_start_token_id diversity_penalty do_sample dtype
    early_stopping encoder_no_repeat_ngram_size eos_token_id exponential_decay_length_penalty finetuning_task
    forced_bos_token_id forced_eos_token_id id2label is_decoder is_encoder_decoder label2id length_penalty
    max_length min_length model_type no_repeat_ngram_size num_beam_groups num_beams num_return_sequences
    output_attentions output_hidden_states output_scores pad_token_id prefix problem_type pruned_heads
    remove_invalid_values repetition_penalty return_dict return_dict_in_generate sep_token_id suppress_tokens
    task_specific_params temperature tf_legacy_loss tie_encoder_decoder tie_word_embeddings tokenizer_class
    top_k top_p torchscript transformers_version typical_p use_bfloat16 torch_dtype _attn_implementation_autoset
    initializer_range use_cache attention_dropout""".split()
)


def _take(d: dict[str, Any], cls: type, where: str, ignored: frozenset[str] = frozenset(),
          given: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Split ``d`` into the dataclass fields of ``cls``; raise on keys that are neither fields nor ignored.
    ``given`` names required fields the caller supplies itself (nested configs)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names and k not in HF_GENERIC_KEYS and k not in ignored)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (not read by impl; refusing to drop them silently)")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    missing = [k for k in required if k not in d and k not in given]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in d.items():
        if k in fields:
            _check_type(v, str(fields[k].type), f"{where}: {k}")
    return {k: v for k, v in d.items() if k in names}


# Sizes and counts: a zero or negative value would fail deep inside torch (or build an empty model).
_POSITIVE = ("size", "dim", "layers", "heads", "groups", "quantizers", "filters", "rate", "window")


def _check_type(v: Any, ann: str, what: str) -> None:
    """Raise ``ConfigError`` naming ``what`` if ``v`` does not fit the field annotation ``ann`` (a string under
    ``from __future__ import annotations``: "int", "float | None", "list[int]", "dict[str, int]", ...).
    Nested config classes are checked by their own ``_take``."""
    kinds = [a.strip() for a in ann.split("|")]
    if v is None:
        if "None" in kinds:
            return
        raise ConfigError(f"{what} is null, expected {ann}")
    for kind in kinds:
        base = kind.split("[", 1)[0]
        if base == "int" and isinstance(v, int) and not isinstance(v, bool):
            if what.rsplit(": ", 1)[-1].endswith(_POSITIVE) and v < 1:
                raise ConfigError(f"{what} = {v} must be >= 1")
            return
        if base == "float" and isinstance(v, (int, float)) and not isinstance(v, bool):
            if v != v or v in (float("inf"), float("-inf")):
                raise ConfigError(f"{what} = {v} is not a finite number")
            return
        if base == "bool" and isinstance(v, bool):
            return
        if base == "str" and isinstance(v, str):
            return
        if base == "dict" and isinstance(v, dict):
            return
        if base == "list" and isinstance(v, list):
            inner = kind[5:-1] if kind.startswith("list[") else ""
            for i, x in enumerate(v):
                if inner:
                    _check_type(x, inner, f"{what}[{i}]")
            return
        if base not in ("int", "float", "bool", "str", "dict", "list", "None", "Any"):
            return  # a nested config (its own _take checks it)
        if base == "Any":
            return
    raise ConfigError(f"{what} = {v!r} is a {type(v).__name__}, expected {ann}")


@dataclass
class CodePredictorConfig:
    """``talker_config.code_predictor_config``: the 5-layer multi-token predictor (upstream ``Qwen3TTSTalkerCodePredictorConfig``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_code_groups: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    hidden_act: str = "silu"
    attention_bias: bool = False
    max_position_embeddings: int = 65536
    rope_scaling: dict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    IGNORED = frozenset({"max_window_layers"})


@dataclass
class TalkerConfig:
    """``talker_config`` (upstream ``Qwen3TTSTalkerConfig``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # upstream falls back to hidden/heads when absent: wrong for every release, so required
    vocab_size: int
    text_vocab_size: int
    text_hidden_size: int
    num_code_groups: int
    rope_scaling: dict  # {"mrope_section": [...], "interleaved": bool}; upstream indexes it directly
    code_predictor_config: CodePredictorConfig
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    hidden_act: str = "silu"
    attention_bias: bool = False
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    sliding_window: int | None = None
    codec_pad_id: int = 2148
    codec_bos_id: int = 2149
    codec_eos_token_id: int = 2150
    codec_think_id: int = 2154
    codec_nothink_id: int = 2155
    codec_think_bos_id: int = 2156
    codec_think_eos_id: int = 2157
    codec_language_id: dict[str, int] = field(default_factory=dict)
    spk_id: dict[str, Any] = field(default_factory=dict)
    spk_is_dialect: dict[str, Any] = field(default_factory=dict)

    # Stored in released configs but never read by the 12 Hz computation (upstream-notes §1.2).
    IGNORED = frozenset({"position_id_per_seconds"})


@dataclass
class SpeakerEncoderConfig:
    """``speaker_encoder_config`` (upstream ``Qwen3TTSSpeakerEncoderConfig``); Base checkpoints only."""

    enc_dim: int
    mel_dim: int = 128
    enc_channels: list[int] = field(default_factory=lambda: [512, 512, 512, 512, 1536])
    enc_kernel_sizes: list[int] = field(default_factory=lambda: [5, 3, 3, 3, 1])
    enc_dilations: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 1])
    enc_attention_channels: int = 128
    enc_res2net_scale: int = 8
    enc_se_channels: int = 128
    sample_rate: int = 24000

    IGNORED = frozenset()


@dataclass
class Qwen3TTSConfig:
    """Top-level ``config.json`` of a TTS checkpoint (upstream ``Qwen3TTSConfig``)."""

    talker_config: TalkerConfig
    tts_model_type: str
    tts_model_size: str
    speaker_encoder_config: SpeakerEncoderConfig | None = None
    tokenizer_type: str = "qwen3_tts_tokenizer_12hz"
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    tts_pad_token_id: int = 151671
    tts_bos_token_id: int = 151672
    tts_eos_token_id: int = 151673
    transformers_version: str | None = None  # decides the text pre-tokenizer regex upstream uses

    IGNORED = frozenset({"assistant_token_id", "harness"})

    @property
    def variant(self) -> str:
        return self.tts_model_type

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config.json") -> Qwen3TTSConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, got a {type(d).__name__}")
        d = copy.deepcopy(d)
        for key in ("talker_config", "speaker_encoder_config"):
            if key in d and not isinstance(d[key], dict):
                raise ConfigError(f"{where}: {key} must be an object, got a {type(d[key]).__name__}")
        if isinstance(d.get("talker_config"), dict) and not isinstance(
                d["talker_config"].get("code_predictor_config", {}), dict):
            raise ConfigError(f"{where}: talker_config.code_predictor_config must be an object")
        if d.get("tokenizer_type", "qwen3_tts_tokenizer_12hz") != "qwen3_tts_tokenizer_12hz":
            raise ConfigError(f"{where}: tokenizer_type {d['tokenizer_type']!r} is not the 12 Hz tokenizer")
        if "talker_config" not in d:
            raise ConfigError(f"{where}: missing required key 'talker_config'")
        t = dict(d["talker_config"])
        if "code_predictor_config" not in t:
            raise ConfigError(f"{where}: talker_config: missing required key 'code_predictor_config'")
        cp_where = f"{where}: talker_config.code_predictor_config"
        cp = CodePredictorConfig(**_take(t.pop("code_predictor_config"), CodePredictorConfig, cp_where,
                                         CodePredictorConfig.IGNORED))
        rs = t.get("rope_scaling")
        if not isinstance(rs, dict) or "mrope_section" not in rs or "interleaved" not in rs:
            raise ConfigError(f"{where}: talker_config.rope_scaling must hold 'mrope_section' and 'interleaved', got {rs!r}")
        talker = TalkerConfig(code_predictor_config=cp, **_take(
            t, TalkerConfig, f"{where}: talker_config", TalkerConfig.IGNORED, given=frozenset({"code_predictor_config"})))
        if sum(rs["mrope_section"]) * 2 != talker.head_dim:
            raise ConfigError(f"{where}: talker_config.rope_scaling.mrope_section {rs['mrope_section']} must sum to head_dim/2 = {talker.head_dim // 2}")
        if talker.vocab_size < 2048 + 1024 and talker.vocab_size - 1024 < 0:
            raise ConfigError(f"{where}: talker_config.vocab_size {talker.vocab_size} leaves no special-token tail")
        se = None
        mtype = d.get("tts_model_type")
        if mtype not in VARIANTS:
            raise ConfigError(f"{where}: tts_model_type {mtype!r} is not one of {VARIANTS}")
        if mtype == "base":
            if "speaker_encoder_config" not in d:
                raise ConfigError(f"{where}: a base checkpoint needs 'speaker_encoder_config'")
            se_d = {k: v for k, v in d["speaker_encoder_config"].items() if k != "model_type"}
            se = SpeakerEncoderConfig(**_take(se_d, SpeakerEncoderConfig, f"{where}: speaker_encoder_config"))
        top = {k: v for k, v in d.items() if k not in ("talker_config", "speaker_encoder_config")}
        kw = _take(top, cls, where, cls.IGNORED, given=frozenset({"talker_config"}))
        return cls(talker_config=talker, speaker_encoder_config=se, **kw)

    @classmethod
    def from_file(cls, path: str | Path) -> Qwen3TTSConfig:
        path = Path(path)
        return cls.from_dict(_read_json(path), where=str(path))


@dataclass
class CodecDecoderConfig:
    """``speech_tokenizer/config.json`` ``decoder_config`` (upstream ``Qwen3TTSTokenizerV2DecoderConfig``)."""

    codebook_size: int
    codebook_dim: int  # upstream reads it through **kwargs only
    head_dim: int  # likewise; the fallback hidden/heads is wrong for the release
    hidden_size: int
    intermediate_size: int
    latent_dim: int
    decoder_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    num_quantizers: int
    upsample_rates: list[int]
    upsampling_ratios: list[int]
    sliding_window: int = 72
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    layer_scale_initial_scale: float = 0.01
    max_position_embeddings: int = 8000
    num_semantic_quantizers: int = 1
    hidden_act: str = "silu"
    attention_bias: bool = False

    # In the released file but unused by the 12 Hz decoder (upstream-notes §1.5.2).
    IGNORED = frozenset({"semantic_codebook_size", "vector_quantization_hidden_dimension"})


@dataclass
class CodecEncoderConfig:
    """``speech_tokenizer/config.json`` ``encoder_config``: a Kyutai Mimi config (transformers ``MimiConfig``)."""

    audio_channels: int
    codebook_dim: int
    codebook_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    head_dim: int
    num_filters: int
    num_quantizers: int
    upsampling_ratios: list[int]
    sampling_rate: int = 24000
    compress: int = 2
    dilation_growth_rate: int = 2
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    num_residual_layers: int = 1
    num_semantic_quantizers: int = 1
    vector_quantization_hidden_dimension: int = 256
    hidden_act: str = "gelu"
    norm_eps: float = 1e-5
    layer_scale_initial_scale: float = 0.01
    max_position_embeddings: int = 8000
    rope_theta: float = 10000.0
    sliding_window: int = 250
    pad_mode: str = "constant"
    use_causal_conv: bool = True
    trim_right_ratio: float = 1.0
    use_conv_shortcut: bool = False
    upsample_groups: int = 512
    frame_rate: float = 12.5
    _frame_rate: float = 12.5

    IGNORED = frozenset({"attention_bias", "rope_scaling", "use_streaming"})


@dataclass
class SpeechTokenizerConfig:
    """``speech_tokenizer/config.json`` (upstream ``Qwen3TTSTokenizerV2Config``)."""

    decoder_config: CodecDecoderConfig
    encoder_config: CodecEncoderConfig
    encoder_valid_num_quantizers: int = 16
    input_sample_rate: int = 24000
    output_sample_rate: int = 24000
    decode_upsample_rate: int = 1920
    encode_downsample_rate: int = 1920

    IGNORED = frozenset({"harness"})

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "speech_tokenizer/config.json") -> SpeechTokenizerConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, got a {type(d).__name__}")
        for key in ("decoder_config", "encoder_config"):
            if key in d and not isinstance(d[key], dict):
                raise ConfigError(f"{where}: {key} must be an object, got a {type(d[key]).__name__}")
        if d.get("model_type", "qwen3_tts_tokenizer_12hz") != "qwen3_tts_tokenizer_12hz":
            raise ConfigError(f"{where}: model_type {d['model_type']!r} is not the 12 Hz speech tokenizer")
        for k in ("decoder_config", "encoder_config"):
            if k not in d:
                raise ConfigError(f"{where}: missing required key {k!r}")
        dec = CodecDecoderConfig(**_take(d["decoder_config"], CodecDecoderConfig, f"{where}: decoder_config",
                                         CodecDecoderConfig.IGNORED))
        enc = CodecEncoderConfig(**_take(d["encoder_config"], CodecEncoderConfig, f"{where}: encoder_config",
                                         CodecEncoderConfig.IGNORED))
        top = {k: v for k, v in d.items() if k not in ("decoder_config", "encoder_config")}
        kw = _take(top, cls, where, cls.IGNORED, given=frozenset({"decoder_config", "encoder_config"}))
        cfg = cls(decoder_config=dec, encoder_config=enc, **kw)
        hop = 1
        for r in dec.upsample_rates + dec.upsampling_ratios:
            hop *= r
        if hop != cfg.decode_upsample_rate:
            raise ConfigError(f"{where}: decoder upsample product {hop} != decode_upsample_rate {cfg.decode_upsample_rate}")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> SpeechTokenizerConfig:
        path = Path(path)
        return cls.from_dict(_read_json(path), where=str(path))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a JSON file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------- presets

_RELEASED = {
    ("0.6b", "base"): "0.6b-base.json",
    ("0.6b", "custom_voice"): "0.6b-custom_voice.json",
    ("1.7b", "base"): "1.7b-base.json",
    ("1.7b", "custom_voice"): "1.7b-custom_voice.json",
    ("1.7b", "voice_design"): "1.7b-voice_design.json",
}

# Released CustomVoice speakers (ids into the 3072-entry codec embedding) and dialect overrides.
_CV_SPEAKERS = {"serena": 3066, "vivian": 3065, "uncle_fu": 3010, "ryan": 3061, "aiden": 2861,
                "ono_anna": 2873, "sohee": 2864, "eric": 2875, "dylan": 2878}
_CV_DIALECT = {"eric": "sichuan_dialect", "dylan": "beijing_dialect"}
_LANGS = {"chinese": 2055, "english": 2050, "german": 2053, "italian": 2070, "portuguese": 2071,
          "spanish": 2054, "japanese": 2058, "korean": 2064, "french": 2061, "russian": 2069}


def _tiny_config(variant: str) -> dict[str, Any]:
    """The ``tiny`` preset: seconds on CPU, every code path.

    - head_dim (32) != hidden/heads (64/4 = 16), GQA (4 query heads over 2 kv heads), interleaved M-RoPE with
      sections summing to head_dim/2;
    - base uses a 48-wide code predictor, so ``small_to_mtp_projection`` is a Linear (the 1.7B form); the other
      variants use a 64-wide one (Identity, the 0.6B form);
    - real text vocabulary size and special ids, real codec vocabulary (2048 codes + 1024 special tail).
    """
    cp_hidden = 48 if variant == "base" else 64
    talker = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000, "rope_scaling": {"interleaved": True, "mrope_section": [6, 5, 5],
                                                "rope_type": "default", "type": "default"},
        "vocab_size": 3072, "text_vocab_size": 151936, "text_hidden_size": 48, "num_code_groups": 16,
        "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
        "position_id_per_seconds": 13,
        "codec_bos_id": 2149, "codec_eos_token_id": 2150, "codec_pad_id": 2148, "codec_think_id": 2154,
        "codec_nothink_id": 2155, "codec_think_bos_id": 2156, "codec_think_eos_id": 2157,
        "codec_language_id": dict(_LANGS), "spk_id": {}, "spk_is_dialect": {},
        "code_predictor_config": {
            "hidden_size": cp_hidden, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 65536, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000, "vocab_size": 2048, "num_code_groups": 16, "hidden_act": "silu",
            "attention_bias": False, "use_sliding_window": False, "rope_scaling": None,
            "layer_types": ["full_attention"] * 2,
        },
    }
    if variant == "custom_voice":
        talker["codec_language_id"].update({"beijing_dialect": 2074, "sichuan_dialect": 2062})
        talker["spk_id"] = dict(_CV_SPEAKERS)
        talker["spk_is_dialect"] = {k: _CV_DIALECT.get(k, False) for k in _CV_SPEAKERS}
    cfg = {
        "architectures": ["Qwen3TTSForConditionalGeneration"], "model_type": "qwen3_tts",
        "tokenizer_type": "qwen3_tts_tokenizer_12hz", "tts_model_size": "tiny", "tts_model_type": variant,
        "im_start_token_id": 151644, "im_end_token_id": 151645, "tts_pad_token_id": 151671,
        "tts_bos_token_id": 151672, "tts_eos_token_id": 151673, "assistant_token_id": 77091,
        "talker_config": talker,
    }
    if variant == "base":
        cfg["speaker_encoder_config"] = {
            "enc_dim": 64, "sample_rate": 24000, "mel_dim": 128, "enc_channels": [32, 32, 32, 32, 96],
            "enc_kernel_sizes": [5, 3, 3, 3, 1], "enc_dilations": [1, 2, 3, 4, 1],
            "enc_attention_channels": 16, "enc_res2net_scale": 4, "enc_se_channels": 16,
        }
    return cfg


def _tiny_speech_tokenizer() -> dict[str, Any]:
    """Tiny codec: fewer channels, the real rates (1920 samples per 12.5 Hz frame), the real 72-frame window."""
    d = json.loads((PRESET_DIR / "speech_tokenizer.json").read_text())
    d["decoder_config"].update({
        "latent_dim": 64, "codebook_dim": 64, "decoder_dim": 96, "hidden_size": 32, "intermediate_size": 64,
        "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
        "vector_quantization_hidden_dimension": 64,
    })
    d["encoder_config"].update({
        "codebook_dim": 16, "vector_quantization_hidden_dimension": 16, "hidden_size": 32,
        "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8,
        "num_hidden_layers": 2, "num_filters": 4, "upsample_groups": 32,
    })
    return d


def preset_config_dicts(preset: str, variant: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json dict, speech_tokenizer/config.json dict) for a built-in preset and variant."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    if preset == "tiny":
        return _tiny_config(variant), _tiny_speech_tokenizer()
    if preset not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {PRESET_NAMES} or checkpoint:PATH")
    name = _RELEASED.get((preset, variant))
    if name is None:
        raise ConfigError(f"preset {preset!r} has no {variant!r} release (VoiceDesign exists only at 1.7b)")
    cfg = json.loads((PRESET_DIR / name).read_text())
    cfg.setdefault("architectures", ["Qwen3TTSForConditionalGeneration"])
    cfg.setdefault("assistant_token_id", 77091)
    return cfg, json.loads((PRESET_DIR / "speech_tokenizer.json").read_text())


def generation_config_dict() -> dict[str, Any]:
    """The released ``generation_config.json`` (sampling defaults)."""
    return json.loads((PRESET_DIR / "generation_config.json").read_text())


# PRESETS[name](variant) -> (config.json dict, speech_tokenizer/config.json dict)
PRESETS = {p: (lambda variant, _p=p: preset_config_dicts(_p, variant)) for p in PRESET_NAMES}
