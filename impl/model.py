"""The public API: ``Qwen3TTS.from_pretrained(path)`` -> ``generate_codes`` / ``synthesize`` / ``stream``.

Mirrors upstream's inference wrapper (``qwen_tts.inference.qwen3_tts_model.Qwen3TTSModel``: ``generate_custom_voice``,
``generate_voice_design``, ``generate_voice_clone``) on top of :mod:`impl.prompt`, :mod:`impl.generate` and the codec:
the same chat templates, per-mode defaults (text fed non-streaming for CustomVoice/VoiceDesign, streaming for voice
clone), sampling defaults (argument > ``generation_config.json`` > upstream's hard defaults), and the ICL decode
(reference frames decoded in front of the new ones, then cut; the 300-frame chunks wholly inside the cut are skipped,
with the kept audio bit-identical).

Deliberate differences: a dropped ``instruct`` (0.6B CustomVoice, voice clone) warns instead of vanishing;
``max_new_frames`` counts frames (upstream's ``max_new_tokens`` = frames + 1); budget exhaustion is reported per
item, and a budget far from what the text warrants is said before generation (:class:`BudgetWarning`); Base modes
accept a precomputed ``xvector=`` and ``ref_codes=`` (range-checked); ``progress=`` reports frames done / budget;
a text of only invisible characters (zero-width space, word joiner, BOM ...) is empty.

Devices (``from_pretrained(device=...)`` is "the model device"): user inputs -- reference wavs (numpy, or torch
tensors on any device, any float dtype), ``xvector=``, ``ref_codes=`` -- may be on CPU or on the model device; they
are moved once, at this API boundary. Tensors come back on the model device: :meth:`Qwen3TTS.xvector` (C,),
:meth:`Qwen3TTS.encode_reference` (F, 16) int64, and every tensor of :meth:`Qwen3TTS.generate_codes`'s result
(codes, hidden, margins, ref_codes), so they feed straight back in. Audio comes back on the host: float32 numpy
from :meth:`Qwen3TTS.decode`, :meth:`Qwen3TTS.synthesize` and :meth:`Qwen3TTS.stream`. Tensors impl creates take
their device from the weights or the input they meet (``parity_tests/test_device_placement.py`` scans for
factories without ``device=`` and runs the API with its weights on ``meta`` and its inputs on CPU).
"""

from __future__ import annotations

import json
import unicodedata
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Qwen3TTSConfig
from .generate import (
    GenerationResult,
    GenerationSettings,
    TalkerLoop,
    check_frame_budget,
    default_frame_budget,
    generate,
)
from .layers import check_attn_impl, check_linear_kernel, get_attention, set_attention, set_linear_kernel
from .loading import CheckpointError, load_module, weight_files
from .progress import resolve_progress
from .prompt import (
    PromptError,
    PromptRequest,
    assistant_text,
    build,
    instruct_honoured,
    instruct_text,
    ref_text,
    supported_languages,
    warn_dropped_instruct,
)
from .sampling import SamplingConfig, check_sampling_value, check_seed, make_generator
from .talker import Talker

MODES = ("custom_voice", "voice_design", "voice_clone")
SAMPLE_RATE = 24000
# Upstream's ``_merge_generate_kwargs`` hard defaults (used when generation_config.json lacks a key).
HARD_DEFAULTS = dict(do_sample=True, top_k=50, top_p=1.0, temperature=0.9, repetition_penalty=1.05,
                     subtalker_dosample=True, subtalker_top_k=50, subtalker_top_p=1.0, subtalker_temperature=0.9,
                     max_new_tokens=2048)
# Default ``non_streaming_mode`` of each upstream wrapper.
NON_STREAMING_DEFAULT = {"custom_voice": True, "voice_design": True, "voice_clone": False}
# An explicit ``max_new_frames`` above this many times the text's default budget (75 + 15 x text tokens) is said
# before generation starts (:class:`BudgetWarning`): a model that never emits EOS would run all of it.
BUDGET_WARN_FACTOR = 2
FRAME_RATE = 12.5  # codec frames per second of audio

# Characters that show and say nothing, beyond what ``str.isspace`` knows: the Unicode format (Cf: zero-width
# space/joiners U+200B..U+200D, word joiner U+2060, BOM U+FEFF, bidi marks), control (Cc) and separator (Z*)
# categories, and invisible code points filed elsewhere (combining grapheme joiner, Hangul fillers, braille blank,
# variation selectors). A text made only of these is empty.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Zs", "Zl", "Zp"})
_INVISIBLE_CHARS = frozenset({0x034F, 0x115F, 0x1160, 0x2800, 0x3164, 0xFFA0, *range(0xFE00, 0xFE10),
                              *range(0xE0100, 0xE01F0)})


class BudgetWarning(UserWarning):
    """The frame budget is far from what the text warrants; said before generation starts."""


def is_blank(text: str) -> bool:
    """True when ``text`` holds nothing to speak: only whitespace and invisible characters (``_INVISIBLE_*``)."""
    return all(c.isspace() or ord(c) in _INVISIBLE_CHARS or unicodedata.category(c) in _INVISIBLE_CATEGORIES
               for c in text)


def blank_text_error(text: str, what: str) -> str:
    """The one line for a blank ``text``: plain "is empty", or naming the invisible characters it holds."""
    shown = sorted({c for c in text if not c.isspace()})
    if not shown:
        return f"{what} is empty"
    names = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, '')}".rstrip() for c in shown[:3])
    return f"{what} is empty: it holds only invisible characters ({names}{', ...' if len(shown) > 3 else ''})"


def _as_list(x: Any, n: int, name: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) == 1 and n > 1:
            return list(x) * n
        if len(x) != n:
            raise ValueError(f"batch size mismatch: {n} texts but {len(x)} {name}")
        return list(x)
    return [x] * n


def _check_top_level_keys(folder: Path) -> None:
    """Every weight key belongs to a part impl loads (``talker.*``, ``speaker_encoder.*``): none dropped silently."""
    from .loading import weight_files, weight_keys

    for f in weight_files(folder):
        stray = [k for k in weight_keys(f) if not k.startswith(("talker.", "speaker_encoder."))]
        if stray:
            raise CheckpointError(f"{f}: unexpected key(s) {stray[:5]} (neither talker.* nor speaker_encoder.*)")


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists on this machine, or one ``ValueError`` line saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r}: MPS is not available on this machine (use --device cpu)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: impl runs on cpu, cuda or mps")
    return dev


def read_generation_config(path: Path) -> dict:
    """``generation_config.json`` (optional) as a dict; its sampling values are range-checked here, naming the file."""
    if not path.exists():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(d).__name__}")
    for name in HARD_DEFAULTS:
        if name in d:
            check_sampling_value(name, d[name], f"{path}: ")
    return d


def check_texts(text: object) -> list[str]:
    """A text or a non-empty list of texts -> list[str]; one ``ValueError`` line otherwise.

    Text that cannot be UTF-8 (lone surrogates: what Python makes of undecodable bytes on a command line) is
    refused here instead of failing inside the tokenizer."""
    if isinstance(text, str):
        texts = [text]
    elif isinstance(text, (list, tuple)) and text:
        texts = list(text)
    else:
        what = "an empty list" if isinstance(text, (list, tuple)) else type(text).__name__
        raise ValueError(f"text must be a string or a non-empty list of strings, got {what}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text item {i} is a {type(t).__name__}, not a string")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text item {i} is not valid UTF-8 (undecodable character at position {e.start}: "
                             f"{t[max(e.start - 10, 0):e.start]!r}…)") from None
        if is_blank(t):  # whitespace, or zero-width / invisible characters only (after the UTF-8 check: names)
            raise ValueError(blank_text_error(t, f"text item {i}"))
    return texts


def _finite_chunk(chunk: torch.Tensor, frame: int) -> np.ndarray:
    """A streamed chunk as float32 numpy; NaN/Inf audio raises instead of being played."""
    w = chunk.float().cpu().numpy()
    if not np.isfinite(w).all():
        raise RuntimeError(f"streamed audio from frame {frame} holds NaN/Inf samples: the codec weights or codes "
                           "are broken")
    return w


def _is_wav_pair(x: object) -> bool:
    """True for one ``(wav, sr)`` reference: a 2-tuple whose second item is a number, the first an array."""
    return (isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, float, np.integer))
            and not isinstance(x[1], bool) and not isinstance(x[0], (str, Path)))


def _check_xvector(x: object, i: int, size: int) -> torch.Tensor:
    """A speaker embedding (C,) that is finite and of the talker's width; one line naming the item otherwise."""
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        raise ValueError(f"xvector (item {i}): dtype {t.dtype} is not floating point")
    t = t.reshape(-1) if t.ndim == 2 and t.shape[0] == 1 else t
    if t.ndim != 1 or t.shape[0] != size:
        raise ValueError(f"xvector (item {i}): shape {tuple(t.shape)}, the talker expects ({size},)")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"xvector (item {i}): holds NaN/Inf (a NaN reference clip or speaker encoder?)")
    return t


def _check_ref_codes(x: object, i: int, groups: int, codebook_size: int, device: torch.device) -> torch.Tensor:
    """ICL reference codes (F, groups), integers in ``[0, codebook_size)``, F >= 1, as int64 on ``device``; one
    ``ValueError`` line naming the item (and frame and codebook) otherwise, before any embedding lookup."""
    from .codec.quantizer import check_codes, check_integer_codes

    t = torch.as_tensor(x, device=device)  # moved once, at this API boundary
    check_integer_codes(t, f"ref_codes (item {i})")
    if t.ndim != 2 or t.shape[1] != groups:
        raise ValueError(f"ref_codes (item {i}): shape {tuple(t.shape)} is not (frames, {groups})")
    if t.shape[0] == 0:
        raise ValueError(f"ref_codes (item {i}): 0 frames (an ICL reference needs at least one frame)")
    t = t.long()
    check_codes(t[None], codebook_size, "ref_codes", items=[i])
    return t


class Qwen3TTS:
    """A loaded checkpoint: talker (+ code predictor), text tokenizer; codec and speaker encoder on first use."""

    def __init__(self, folder: Path, config: Qwen3TTSConfig, talker: Talker, tokenizer, generation_config: dict,
                 device: torch.device, dtype: torch.dtype):
        self.folder, self.config, self.talker, self.tokenizer = folder, config, talker, tokenizer
        self.generation_config = generation_config
        self.device, self.dtype = device, dtype
        self._codec = None
        self.codec_dtype = torch.float32
        self._speaker_encoder = None
        self.fast: str | None = None  # from_pretrained(fast=...): greedy generate_codes on impl.fast_decode
        self.mmap = True  # from_pretrained(mmap=...): also how the codec and speaker encoder load on first use

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        attn: str = "sdpa", codec_dtype: torch.dtype = torch.float32,
                        fast: str | None = None, mmap: bool = True, linear: str = "aten") -> Qwen3TTS:
        """Load a checkpoint folder (never downloads). ``mmap`` (default on): on the CPU, lookup tables stored in
        ``dtype`` are used from a private mapping of the safetensors file (:func:`impl.loading.gathered_keys`), as
        upstream's loader does, so rows the model never reads (most of the text embedding) cost no memory;
        rewriting the files in place while the model lives then changes (or, shorter, crashes) it. ``mmap=False``
        reads every weight into process memory.
        ``linear``: the talker's matmul kernel (:class:`impl.layers.Linear`): ``"aten"`` (upstream's, bit-exact)
        or ``"onednn"`` (CPU float32: faster one-row products, equal to rounding only). ``fast``: None (the eager loop, every parity row's path) or a
        mode of :mod:`impl.fast_decode` (``"eager"``, ``"compile"``, ``"cudagraph"``, ``"compile-cudagraph"``;
        the CUDA-graph modes need a CUDA device): :meth:`generate_codes` / :meth:`synthesize` then run greedy
        generation on the static decode step (same codes as the eager loop, exactly in fp32). The fast path is
        greedy only: with ``fast`` set, a call that samples (``greedy=False`` with ``do_sample`` on) raises
        ``ValueError``. :meth:`stream` always runs the eager loop."""
        from .fast_decode import MODES as FAST_MODES
        from .text_tokenizer import TextTokenizer

        if fast is not None and fast not in FAST_MODES:
            raise ValueError(f"fast={fast!r} is not one of {FAST_MODES} (or None for the eager loop)")
        check_attn_impl(attn)
        check_linear_kernel(linear)

        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a checkpoint folder (impl never downloads)")
        device = resolve_device(device)  # before anything slow: a missing CUDA is the user's first mistake
        if fast is not None and "cudagraph" in fast and device.type != "cuda":
            raise ValueError(f"fast={fast!r} needs a CUDA device, got {device} (use fast='eager' or 'compile')")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype")
        cfg = Qwen3TTSConfig.from_file(folder / "config.json")
        # The codec is loaded on first use, but a folder without it is broken now: say so before any generation,
        # naming the folder that is missing (not the top-level config.json the codec loader would fall back to).
        st = folder / "speech_tokenizer"
        if not (st / "config.json").is_file():
            raise CheckpointError(f"{st / 'config.json'}: missing (a checkpoint folder needs speech_tokenizer/ "
                                  "with config.json and model.safetensors)")
        weight_files(st)  # raises naming speech_tokenizer/ when it holds no weights
        _check_top_level_keys(folder)
        # Built on meta, the checkpoint's tensors become the parameters: the weights once in memory.
        talker = load_module(lambda: Talker(cfg.talker_config), folder, "talker.", device, dtype,
                             where=str(folder / "model.safetensors"), mmap=mmap)
        gen_cfg = read_generation_config(folder / "generation_config.json")
        set_attention(talker, attn)  # the one choice of attention kernel; the codec gets the same on first use
        set_linear_kernel(talker, linear)  # raises for onednn off the CPU / off float32
        tts = cls(folder, cfg, talker, TextTokenizer.from_dir(folder), gen_cfg, device, dtype)
        # The codec stays fp32 by default whatever ``dtype`` is: upstream's codec overflows to NaN in bf16
        # (SnakeBeta's exp); bf16 remains selectable for measurement.
        tts.codec_dtype = codec_dtype
        tts.fast = fast
        tts.mmap = mmap
        return tts

    @property
    def attn(self) -> str:
        """The attention implementation chosen at load (``from_pretrained(attn=...)``), read back from the talker's
        module setting (:func:`impl.layers.get_attention`)."""
        return get_attention(self.talker)

    # -- lazily loaded parts ---------------------------------------------------------------------------------

    @property
    def codec(self):
        """The speech tokenizer (``impl.codec``), loaded on first use in ``codec_dtype`` (fp32 unless chosen
        otherwise: upstream's codec config says float32; bf16 decoding is slow and lossy on CPU)."""
        if self._codec is None:
            from .codec import SpeechTokenizer

            self._codec = SpeechTokenizer.from_dir(self.folder, device=self.device, dtype=self.codec_dtype,
                                                   attn=self.attn, mmap=self.mmap)
        return self._codec

    @property
    def speaker_encoder(self):
        """The ECAPA-TDNN speaker encoder (Base checkpoints), loaded on first use from ``speaker_encoder.*``."""
        if self._speaker_encoder is None:
            from .speaker_encoder import SpeakerEncoder

            se_cfg = self.config.speaker_encoder_config
            if se_cfg is None:
                raise PromptError(f"a {self.config.tts_model_type!r} checkpoint has no speaker encoder")
            self._speaker_encoder = load_module(lambda: SpeakerEncoder(se_cfg), self.folder, "speaker_encoder.",
                                                self.device, self.dtype, where=str(self.folder / "model.safetensors"),
                                                mmap=self.mmap)
        return self._speaker_encoder

    @property
    def mode(self) -> str:
        """The mode this checkpoint serves (``base`` checkpoints serve ``voice_clone``)."""
        v = self.config.tts_model_type
        return "voice_clone" if v == "base" else v

    @property
    def languages(self) -> list[str]:
        return supported_languages(self.config)

    @property
    def speakers(self) -> list[str]:
        return sorted(self.config.talker_config.spk_id)

    # -- settings --------------------------------------------------------------------------------------------

    def settings(self, greedy: bool = False, max_new_frames: int | None = None, text_tokens: int | None = None,
                 **sampling) -> GenerationSettings:
        """Sampling settings with upstream's precedence: argument > generation_config.json > hard default.

        Without ``max_new_frames`` the budget is upstream's ``max_new_tokens`` capped by
        :func:`impl.generate.default_frame_budget` of ``text_tokens`` (the longest text's prompt ids), so a model
        that never emits EOS stops after a time proportional to the text (stop reason ``budget``)."""
        unknown = set(sampling) - set(HARD_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown sampling argument(s) {sorted(unknown)}; known: {sorted(HARD_DEFAULTS)}")
        for name, value in sampling.items():
            if value is not None:
                check_sampling_value(name, value)

        def pick(name: str):
            if sampling.get(name) is not None:
                return sampling[name]
            return self.generation_config.get(name, HARD_DEFAULTS[name])

        if max_new_frames is None:
            n_tok = int(pick("max_new_tokens"))
            if text_tokens is not None:
                n_tok = min(n_tok, default_frame_budget(text_tokens) + 1)
        else:
            n_tok = check_frame_budget(max_new_frames, self.config.talker_config.max_position_embeddings) + 1
        talker = SamplingConfig(do_sample=False if greedy else bool(pick("do_sample")),
                                temperature=float(pick("temperature")), top_k=pick("top_k"),
                                top_p=float(pick("top_p")), repetition_penalty=float(pick("repetition_penalty")),
                                min_new_tokens=2)
        pred = SamplingConfig(do_sample=False if greedy else bool(pick("subtalker_dosample")),
                              temperature=float(pick("subtalker_temperature")), top_k=pick("subtalker_top_k"),
                              top_p=float(pick("subtalker_top_p")))
        return GenerationSettings(talker, pred, int(n_tok))

    # -- requests --------------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def requests(self, text: str | list[str], mode: str | None = None, speaker=None, language="auto", instruct=None,
                 ref_audio=None, ref_text=None, x_vector_only=False, non_streaming_text: bool | None = None,
                 xvector=None, ref_codes=None) -> list[PromptRequest]:
        """One :class:`PromptRequest` per text (scalars broadcast over the batch, as upstream's wrappers do)."""
        mode = mode or self.mode
        if mode == "base":
            mode = "voice_clone"
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if (mode == "voice_clone") != (self.config.tts_model_type == "base") or (
                mode != "voice_clone" and mode != self.config.tts_model_type):
            raise ValueError(f"a {self.config.tts_model_type!r} checkpoint does not serve mode {mode!r}")
        texts = check_texts(text)
        n = len(texts)
        langs = _as_list(language if language is not None else "auto", n, "languages")
        for lang in langs:
            if str(lang).lower() not in self.languages:
                raise PromptError(f"unsupported language {lang!r}; supported: {self.languages}")
        nsm = NON_STREAMING_DEFAULT[mode] if non_streaming_text is None else bool(non_streaming_text)
        reqs = [PromptRequest(self._ids(assistant_text(t)), language=lang, non_streaming=nsm)
                for t, lang in zip(texts, langs)]
        instructs = _as_list(instruct, n, "instructs")
        if any(instructs):
            if instruct_honoured(self.config, mode):
                for r, ins in zip(reqs, instructs):
                    r.instruct_ids = self._ids(instruct_text(ins)) if ins else None
            else:
                warn_dropped_instruct(self.config, mode)
        if mode == "custom_voice":
            for r, spk in zip(reqs, _as_list(speaker, n, "speakers")):
                r.speaker = spk or None
        elif any(_as_list(speaker, n, "speakers")):  # upstream's other wrappers take no speaker: never drop one
            raise ValueError(f"mode {mode!r} takes no speaker, but got {speaker!r} (speakers are custom_voice's)")
        elif mode == "voice_clone":
            self._voice_clone_requests(reqs, ref_audio, ref_text, x_vector_only, xvector, ref_codes)
        if mode != "voice_clone":
            given = [k for k, v in (("ref_audio", ref_audio), ("ref_text", ref_text), ("x_vector_only", x_vector_only),
                                    ("xvector", xvector), ("ref_codes", ref_codes)) if v is not None and v is not False]
            if given:  # upstream's custom_voice/voice_design wrappers take no reference: never drop one silently
                raise ValueError(f"mode {mode!r} takes no reference, but got {', '.join(given)} (voice_clone on a "
                                 "Base checkpoint uses them)")
        return reqs

    def _voice_clone_requests(self, reqs, ref_audio, ref_text_, x_vector_only, xvector, ref_codes) -> None:
        n = len(reqs)
        if _is_wav_pair(ref_audio):
            ref_audio = [ref_audio]  # the documented (wav, sr) form is one reference, not a batch of two
        xvo = _as_list(x_vector_only, n, "x_vector_only flags")
        rtexts = _as_list(ref_text_, n, "ref_texts")
        if xvector is None:
            if ref_audio is None:
                raise PromptError("voice clone needs ref_audio (or a precomputed xvector=)")
            xvector = [self.xvector(a) for a in _as_list(ref_audio, n, "ref_audio")]
        xvecs = _as_list(xvector if isinstance(xvector, (list, tuple)) else [xvector], n, "xvectors")
        if any(not f for f in xvo):  # ICL rows need reference codes
            if ref_codes is None:
                if ref_audio is None:
                    raise PromptError("ICL voice clone needs ref_audio (or precomputed ref_codes=)")
                ref_codes = [self.encode_reference(a) for a in _as_list(ref_audio, n, "ref_audio")]
            rcodes = _as_list(ref_codes if isinstance(ref_codes, (list, tuple)) else [ref_codes], n, "ref_codes")
        for i, r in enumerate(reqs):
            r.xvector = _check_xvector(xvecs[i], i, self.talker.cfg.hidden_size).to(self.device)  # moved once
            if not xvo[i]:
                if not rtexts[i]:
                    raise PromptError(f"ref_text is required for ICL voice clone (item {i}); or x_vector_only=True")
                r.ref_ids = self._ids(ref_text(rtexts[i]))
                # On the model device: the prompt embeds them and decode()/callers cat them with the new codes.
                # Range: the code predictor's embeddings (groups 1..15) and the codec's codebooks hold
                # ``code_predictor_config.vocab_size`` entries (2048); group 0 is decoded by the codec too.
                r.ref_codes = _check_ref_codes(rcodes[i], i, self.talker.cfg.num_code_groups,
                                               self.config.talker_config.code_predictor_config.vocab_size,
                                               self.device)

    # -- audio helpers (codec / speaker encoder / audio written by others; imported lazily) ------------------

    @staticmethod
    def _load_audio(audio) -> np.ndarray:
        """A path or a ``(wav, sr)`` pair -> mono float32 at 24 kHz (soxr HQ, as upstream's librosa default)."""
        from .audio import load_reference_audio

        return load_reference_audio(audio)

    def xvector(self, audio) -> torch.Tensor:
        """Speaker embedding (C,) of reference audio (path or (wav, sr)), resampled to 24 kHz first; on the model
        device, in the model dtype (the wav may be numpy or a tensor on any device)."""
        from .speaker_encoder import extract_xvector

        return extract_xvector(self.speaker_encoder, self._load_audio(audio), SAMPLE_RATE)

    def encode_reference(self, audio) -> torch.Tensor:
        """Reference codes (F, 16) int64 of audio (path or (wav, sr)), via the codec encoder at 24 kHz; on the model
        device (the wav may be numpy or a tensor on any device)."""
        wav = torch.from_numpy(self._load_audio(audio))[None]  # (1, T)
        p = next(self.codec.parameters())
        with torch.inference_mode():
            codes = self.codec.encode(wav.to(p.device, p.dtype), torch.ones(wav.shape, dtype=torch.long,
                                                                             device=p.device))
        return codes[0].long()

    # -- generation ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_codes(self, text: str | list[str], mode: str | None = None, speaker=None, language="auto",
                       instruct=None, ref_audio=None, ref_text=None, x_vector_only=False,
                       non_streaming_text: bool | None = None, greedy: bool = False, seed: int | None = None,
                       max_new_frames: int | None = None, xvector=None, ref_codes=None, progress=None,
                       **sampling) -> GenerationResult:
        """Codes (F_i, 16) per text, with talker hidden states, stop reasons and per-decision margins; every tensor
        of the result (``ref_codes`` included) is on the model device, whatever device ``xvector=`` /
        ``ref_codes=`` came on.

        ``progress``: ``True`` shows ``generating: done/budget frames`` on stderr; a callable is called as
        ``progress(done, budget)`` after every frame (:mod:`impl.progress`). A budget far from what the text
        warrants is said first, as a :class:`BudgetWarning`."""
        settings = self.settings(greedy, max_new_frames, **sampling)  # cheap checks before the prompt work
        fast = self._fast_mode(settings)
        seed = check_seed(seed)
        callback, line = resolve_progress(progress)
        reqs = self.requests(text, mode, speaker, language, instruct, ref_audio, ref_text, x_vector_only,
                             non_streaming_text, xvector, ref_codes)
        text_tokens = max(len(r.input_ids) for r in reqs)
        if max_new_frames is None:
            settings = self.settings(greedy, None, text_tokens, **sampling)
        self._warn_budget(settings, max_new_frames, text_tokens)
        prompt = build(self.talker, self.config, reqs)
        try:
            res = generate(self.talker, prompt, settings, make_generator(seed, self.device), fast=fast,
                           progress=callback)
        finally:
            if line is not None:
                line.close()
        res.ref_codes = [r.ref_codes for r in reqs]
        return res

    def _warn_budget(self, settings: GenerationSettings, max_new_frames: int | None, text_tokens: int) -> None:
        """Say (:class:`BudgetWarning`, before generation) when the frame budget is far from what the text warrants:
        an explicit ``max_new_frames`` above ``BUDGET_WARN_FACTOR`` x the default budget, or a text whose default
        budget is cut by the checkpoint's ``max_new_tokens`` (a long run whose audio may still be cut short)."""
        from . import generate as gen  # the budget constants, read at call time

        frames = settings.max_new_tokens - 1
        warranted = default_frame_budget(text_tokens)
        rule = f"{gen.BUDGET_BASE_FRAMES} + {gen.BUDGET_FRAMES_PER_TOKEN} x {text_tokens} text tokens = {warranted} frames"
        if max_new_frames is not None and max_new_frames > BUDGET_WARN_FACTOR * warranted:
            msg = (f"max_new_frames {max_new_frames} is far above what the text warrants ({rule}): a model that "
                   f"never emits EOS runs all {max_new_frames} frames ({max_new_frames / FRAME_RATE:.0f} s of audio)")
        elif max_new_frames is None and warranted > frames:
            msg = (f"the text warrants {rule}, more than max_new_tokens allows: up to "
                   f"{frames} frames ({frames / FRAME_RATE:.0f} s of audio), a long run whose audio may be cut "
                   "short (split the text, or pass max_new_frames)")
        else:
            return
        # 4: past this method, generate_codes / stream and torch's inference_mode wrapper, to the caller's line.
        warnings.warn(msg, BudgetWarning, stacklevel=4)

    def _fast_mode(self, settings: GenerationSettings) -> str | None:
        """``self.fast`` when set (after checking the settings are greedy), else None (the eager loop)."""
        if self.fast is not None and (settings.talker.do_sample or settings.predictor.do_sample):
            raise ValueError(f"fast={self.fast!r} runs greedy generation only, but this call samples (do_sample "
                             "from the arguments or generation_config.json): pass greedy=True, or load without fast")
        return self.fast

    def decode(self, result: GenerationResult) -> list[np.ndarray]:
        """Waveforms (float32 numpy, 24 kHz; codes on any device) of a result. ICL rows are upstream's decode of
        reference + new frames with the reference part cut (``int(ref_len / total_len * len(wav))`` samples), bit
        for bit; the 300-frame chunks that end before every row's cut are not decoded at all (``skip_frames`` of
        :meth:`impl.codec.SpeechTokenizer.decode`: each chunk is decoded from scratch, so the kept audio is the
        same), which spares most of a long reference's decode. Codes out of range are one ``ValueError`` line."""
        from .codec.quantizer import check_codes, check_integer_codes

        codec = self.codec
        K, up = codec.decoder.cfg.codebook_size, codec.decoder.total_upsample
        G = codec.decoder.cfg.num_quantizers
        seqs, cuts = [], []
        for i, c in enumerate(result.codes):
            ref = result.ref_codes[i] if result.ref_codes else None
            for what, t in (("codes", c), ("ref_codes", ref)):  # named apart: a frame index means what it says
                if t is None:
                    continue
                check_integer_codes(t, f"{what} (item {i})")
                if t.ndim != 2 or t.shape[1] != G:
                    raise ValueError(f"{what} (item {i}): shape {tuple(t.shape)} is not (frames, {G})")
                check_codes(t[None], K, what, items=[i])
            seq = torch.cat([ref.to(c.device), c]) if ref is not None else c
            seqs.append(seq)
            # Upstream's cut, computed as it does on the decoded length (every frame of seq is valid: 1920 each).
            cuts.append(int(ref.shape[0] / max(seq.shape[0], 1) * (seq.shape[0] * up)) if ref is not None else 0)
        skip = min((cut // up for cut in cuts), default=0)  # frames wholly before every row's cut
        wavs = codec.decode([s.cpu() for s in seqs], skip_frames=skip)  # each = full decode[skip * up:]
        out = []
        for i, (w, cut) in enumerate(zip(wavs, cuts)):
            w = np.asarray(w, dtype=np.float32)[cut - skip * up:]
            if not np.isfinite(w).all():  # never hand back (or write) a NaN waveform
                raise RuntimeError(f"decoded audio of item {i} holds {int((~np.isfinite(w)).sum())} NaN/Inf samples "
                                   f"of {len(w)}: the codec weights or the codes are broken")
            out.append(w)
        return out

    def synthesize(self, text: str | list[str], **kwargs) -> tuple[np.ndarray | list[np.ndarray], int]:
        """(wav float32 mono numpy, 24000); a list of wavs for a list of texts. Same arguments as generate_codes."""
        res = self.generate_codes(text, **kwargs)
        wavs = self.decode(res)
        return (wavs[0] if isinstance(text, str) else wavs), SAMPLE_RATE

    @torch.inference_mode()
    def stream(self, text: str, chunk_frames: int = 4, **kwargs) -> Iterator[np.ndarray]:
        """Audio chunks (float32 numpy, 24 kHz, ``chunk_frames`` x 1920 samples, the last one shorter) as frames are
        generated, for one text; same arguments as :meth:`generate_codes`.

        The model-level streaming entry point; the codec-level one is ``self.codec.decoder.stream()`` (a
        ``DecoderStream``), which carries the decoder's state across pushes, so the chunks join to the one-shot
        decode of all frames (upstream's ``decode`` recomputes 300-frame chunks with 25 frames of left context,
        which differs slightly after frame 300). ICL: the reference frames are pushed first and their audio
        dropped, as upstream cuts ``ref_len * 1920`` samples (all of them are pushed: the stream's state needs every
        frame). ``progress=`` as in :meth:`generate_codes`."""
        if not isinstance(text, str):
            raise ValueError(f"stream() takes one text (a str), got {type(text).__name__}")
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames {chunk_frames!r} must be an integer >= 1")
        greedy, seed = kwargs.pop("greedy", False), kwargs.pop("seed", None)
        max_new_frames = kwargs.pop("max_new_frames", None)
        progress = kwargs.pop("progress", None)
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in HARD_DEFAULTS}
        settings = self.settings(greedy, max_new_frames, **sampling)
        seed = check_seed(seed)
        callback, line = resolve_progress(progress)
        reqs = self.requests(text, **kwargs)
        if max_new_frames is None:
            settings = self.settings(greedy, None, len(reqs[0].input_ids), **sampling)
        self._warn_budget(settings, max_new_frames, len(reqs[0].input_ids))
        prompt = build(self.talker, self.config, reqs)
        loop = TalkerLoop(self.talker, prompt, settings, make_generator(seed, self.device), callback)
        try:
            yield from self._stream_chunks(loop, reqs[0], chunk_frames)
        finally:
            if line is not None:
                line.close()

    def _stream_chunks(self, loop: TalkerLoop, req: PromptRequest, chunk_frames: int) -> Iterator[np.ndarray]:
        """The audio of :meth:`stream`: ``chunk_frames`` frames at a time through one codec ``DecoderStream``."""
        dec = self.codec.decoder.stream()
        if req.ref_codes is not None:
            dec.push(req.ref_codes.to(self.codec.device))  # context only (the stream's state needs every frame)
        start = end = 0
        for k in loop:
            end = k + 1
            if end - start >= chunk_frames:
                yield _finite_chunk(dec.push(loop.frames[0, start:end].to(self.codec.device))[0], start)
                start = end
        if end > start:
            yield _finite_chunk(dec.push(loop.frames[0, start:end].to(self.codec.device))[0], start)
