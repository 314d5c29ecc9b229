"""Talker prompt construction for every mode, position by position as upstream
(``Qwen3TTSForConditionalGeneration.generate`` M:2022-2265 and ``generate_icl_prompt`` M:1968; upstream-notes §2.2).

Notation: ``Tx(ids)`` = text_projection(text_embedding(ids)), ``Cx(ids)`` = talker codec_embedding(ids);
``tts_bos/eos/pad`` = ``Tx([[151672, 151673, 151671]])`` split in three. For one item:

    [instruct]   Tx(<|im_start|>user\\n{instruct}<|im_end|>\\n)                       VoiceDesign, CustomVoice (not 0.6B)
    role         Tx(<|im_start|>assistant\\n)                                         3 positions, text only
    body         [tts_pad x (Lc-2), tts_bos] + codec[:-1]                            codec = Cx(think.., lang, think_eos)
                                                                                     [+ speaker] + Cx(pad, bos)
    then, non-ICL streaming:      Tx(text[0]) + Cx(bos);        trailing = Tx(text[1:]) ++ tts_eos
          non-ICL non-streaming:  Tx(text) ++ tts_eos + Cx(pad); tts_pad + Cx(bos);  trailing = tts_pad
          ICL: text_e = Tx(ref_text ++ text) ++ tts_eos, codec_e = Cx(bos) ++ sum_g E_g(ref_codes[:, g])
               non-streaming: text_e + Cx(pad); codec_e + tts_pad;                   trailing = tts_pad
               streaming: zip the two (text_e overflow -> trailing, codec_e overflow -> + tts_pad)

Each embedding is computed on exactly the id tensor upstream uses (same shapes, same op order), so fp32 prompts
match bit for bit. A batch is left-padded with zero vectors plus an attention mask; trailing text is right-padded
with ``tts_pad``.

Text is given as token ids of upstream's chat strings (``assistant_text`` etc. below); tokenising is the caller's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .config import Qwen3TTSConfig
from .taps import tap


def assistant_text(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"


def ref_text(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n"


def instruct_text(instruct: str) -> str:
    return f"<|im_start|>user\n{instruct}<|im_end|>\n"


class PromptError(ValueError):
    """A request upstream would refuse (unknown language or speaker, ICL without reference text, ...)."""


@dataclass
class PromptRequest:
    """One item of a batch, in upstream's terms.

    input_ids: ids of ``assistant_text(text)``; instruct_ids: ids of ``instruct_text(instruct)`` or None;
    xvector (C,): speaker embedding (Base); ref_ids: ids of ``ref_text(ref)``; ref_codes (T_ref, 16): reference
    frames (Base ICL, when given). ``speaker`` is a CustomVoice speaker name.
    """

    input_ids: list[int]
    language: str = "auto"
    speaker: str | None = None
    instruct_ids: list[int] | None = None
    xvector: torch.Tensor | None = None
    ref_ids: list[int] | None = None
    ref_codes: torch.Tensor | None = None
    non_streaming: bool = False

    @property
    def icl(self) -> bool:
        return self.ref_codes is not None


@dataclass
class ItemPrompt:
    embeds: torch.Tensor  # (1, L, C)
    trailing: torch.Tensor  # (1, Lt, C): fed one per decode step, then tts_pad
    tts_pad: torch.Tensor  # (1, 1, C)


@dataclass
class BatchPrompt:
    embeds: torch.Tensor  # (B, L, C) left-padded with zeros
    attention_mask: torch.Tensor  # (B, L) int64, 1 = real position
    trailing: torch.Tensor  # (B, Lt_max, C) right-padded with tts_pad
    tts_pad: torch.Tensor  # (1, 1, C)
    lengths: list[int]  # real prompt length per row
    trailing_lengths: list[int]

    @property
    def has_padding(self) -> bool:
        return min(self.lengths) != max(self.lengths)


def language_id(cfg: Qwen3TTSConfig, language: str | None, speaker: str | None) -> int | None:
    """Codec language id (None for ``auto``), with upstream's dialect override: a CustomVoice speaker whose
    ``spk_is_dialect`` entry is a dialect name replaces the language when it is ``chinese`` or ``auto``."""
    t = cfg.talker_config
    if language is None:
        raise PromptError("language must be given (use 'auto')")
    lang = language.lower()
    if lang == "auto":
        lid = None
    elif lang not in t.codec_language_id:
        raise PromptError(f"language {language!r} not supported; choose one of {supported_languages(cfg)}")
    else:
        lid = t.codec_language_id[lang]
    if lang in ("chinese", "auto") and speaker:
        dialect = t.spk_is_dialect.get(speaker.lower(), False)
        if dialect is not False:
            lid = t.codec_language_id[dialect]
    return lid


def supported_languages(cfg: Qwen3TTSConfig) -> list[str]:
    return ["auto"] + [k for k in cfg.talker_config.codec_language_id if "dialect" not in k]


def instruct_honoured(cfg: Qwen3TTSConfig, mode: str) -> bool:
    """Whether upstream's wrapper uses an instruct in this mode. CustomVoice drops it when
    ``tts_model_size in "0b6"`` (a substring test, reproduced as such); voice clone never passes it."""
    if mode == "voice_design":
        return True
    if mode == "custom_voice":
        return cfg.tts_model_size not in "0b6"
    return False


def warn_dropped_instruct(cfg: Qwen3TTSConfig, mode: str) -> None:
    warnings.warn(f"instruct is ignored in mode {mode!r} for tts_model_size {cfg.tts_model_size!r} "
                  "(upstream drops it silently)", stacklevel=3)


def _ids(x: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([list(x)], dtype=torch.long, device=device)  # (1, L)


def build_item(talker, cfg: Qwen3TTSConfig, req: PromptRequest) -> ItemPrompt:
    """Prompt embeddings and trailing text for one request (``talker`` is an :class:`impl.talker.Talker`)."""
    t = cfg.talker_config
    dev = talker.codec_head.weight.device
    Tx, Cx = talker.embed_text, talker.embed_codec
    input_id = _ids(req.input_ids, dev)
    if input_id.shape[1] < 9:
        raise PromptError("input_ids must be the ids of assistant_text(text) (at least 9 ids)")

    speaker_embed = None
    if req.xvector is not None:
        speaker_embed = req.xvector.to(device=dev, dtype=talker.codec_head.weight.dtype)  # cast to talker dtype
    elif req.speaker:
        if req.speaker.lower() not in t.spk_id:
            raise PromptError(f"speaker {req.speaker!r} not supported; choose one of {sorted(t.spk_id)}")
        speaker_embed = Cx(torch.tensor(t.spk_id[req.speaker.lower()], dtype=torch.long, device=dev))  # (C,)
    lid = language_id(cfg, req.language, None if req.xvector is not None else req.speaker)

    tts_bos, tts_eos, tts_pad = Tx(_ids([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id],
                                        dev)).chunk(3, dim=1)  # 3 x (1, 1, C)
    prefix = ([t.codec_nothink_id, t.codec_think_bos_id, t.codec_think_eos_id] if lid is None
              else [t.codec_think_id, t.codec_think_bos_id, lid, t.codec_think_eos_id])
    codec = [Cx(_ids(prefix, dev))]  # (1, 3|4, C)
    if speaker_embed is not None:
        codec.append(speaker_embed.view(1, 1, -1))
    codec.append(Cx(_ids([t.codec_pad_id, t.codec_bos_id], dev)))
    codec = torch.cat(codec, dim=1)  # (1, Lc, C), Lc in 5..7

    role = Tx(input_id[:, :3])  # (1, 3, C) <|im_start|>assistant\n, text only
    body = torch.cat((tts_pad.expand(-1, codec.shape[1] - 2, -1), tts_bos), dim=1) + codec[:, :-1]  # (1, Lc-1, C)
    parts = [role, body]

    if req.icl:
        if req.ref_ids is None:
            raise PromptError("ICL (reference codes given) needs ref_ids (ref_text)")
        icl, trailing = _icl(talker, cfg, input_id[:, 3:-5], _ids(req.ref_ids, dev)[:, 3:-2],
                             req.ref_codes.to(dev), tts_pad, tts_eos, req.non_streaming)
        parts.append(icl)
    elif req.non_streaming:
        text = input_id[:, 3:-5]
        n = text.shape[1] + 1
        parts.append(torch.cat((Tx(text), tts_eos), dim=1) + Cx(_ids([t.codec_pad_id] * n, dev)))  # (1, n, C)
        parts.append(tts_pad + Cx(_ids([t.codec_bos_id], dev)))  # (1, 1, C)
        trailing = tts_pad
    else:
        parts.append(Tx(input_id[:, 3:4]) + codec[:, -1:])  # first text token rides with codec_bos
        trailing = torch.cat((Tx(input_id[:, 4:-5]), tts_eos), dim=1)  # (1, n_text, C)

    embeds = torch.cat(parts, dim=1)
    if req.instruct_ids is not None:
        embeds = torch.cat((Tx(_ids(req.instruct_ids, dev)), embeds), dim=1)  # instruct goes first
    return ItemPrompt(embeds, trailing, tts_pad)


def reference_frame_embedding(talker, ref_codes: torch.Tensor) -> torch.Tensor:
    """ICL reference frames (T_ref, 16) -> (1, T_ref, C): group 0 from the talker table, groups 1..15 from the
    code predictor's (talker-width) tables, summed in one reduction as upstream (M:1989)."""
    groups = [talker.embed_codec(ref_codes[:, :1])]  # (T_ref, 1, C)
    groups += [emb(ref_codes[:, g : g + 1]) for g, emb in enumerate(talker.code_predictor.model.codec_embedding, 1)]
    return torch.cat(groups, dim=1).sum(1).unsqueeze(0)  # (T_ref, 16, C) -> (1, T_ref, C)


def _icl(talker, cfg: Qwen3TTSConfig, text_id: torch.Tensor, ref_id: torch.Tensor, ref_codes: torch.Tensor,
         tts_pad: torch.Tensor, tts_eos: torch.Tensor, non_streaming: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream ``generate_icl_prompt``: ref_codes (T_ref, 16) -> (icl embeds (1, L, C), trailing (1, Lt, C))."""
    t = cfg.talker_config
    dev = text_id.device
    text_e = talker.embed_text(torch.cat([ref_id, text_id], dim=-1))
    text_e = torch.cat([text_e, tts_eos], dim=1)  # (1, Lt, C)
    frames = reference_frame_embedding(talker, ref_codes)  # (1, T_ref, C)
    codec_e = torch.cat([talker.embed_codec(_ids([t.codec_bos_id], dev)), frames], dim=1)  # (1, T_ref+1, C)
    n_text, n_codec = text_e.shape[1], codec_e.shape[1]
    if non_streaming:
        icl = text_e + talker.embed_codec(_ids([t.codec_pad_id] * n_text, dev))
        return torch.cat([icl, codec_e + tts_pad], dim=1), tts_pad
    if n_text > n_codec:
        return text_e[:, :n_codec] + codec_e, text_e[:, n_codec:]
    text_e = torch.cat([text_e] + [tts_pad] * (n_codec - n_text), dim=1)
    return text_e + codec_e, tts_pad


def batch(items: list[ItemPrompt]) -> BatchPrompt:
    """Left-pad prompts with zeros (+ mask), right-pad trailing text with tts_pad (upstream M:2238-2265)."""
    lengths = [it.embeds.shape[1] for it in items]
    L = max(lengths)
    ref = items[0].embeds
    B, C = len(items), ref.shape[-1]
    embeds = ref.new_zeros(B, L, C)
    mask = torch.zeros(B, L, dtype=torch.long, device=ref.device)
    for i, it in enumerate(items):
        embeds[i, L - lengths[i]:] = it.embeds[0]
        mask[i, L - lengths[i]:] = 1
    tts_pad = items[-1].tts_pad  # upstream passes the last item's (all items' are equal)
    t_lengths = [it.trailing.shape[1] for it in items]
    trailing = tts_pad.reshape(1, 1, C).repeat(B, max(t_lengths), 1)  # (B, Lt_max, C)
    for i, it in enumerate(items):
        trailing[i, : t_lengths[i]] = it.trailing[0]
    return BatchPrompt(embeds, mask, trailing, tts_pad, lengths, t_lengths)


def build(talker, cfg: Qwen3TTSConfig, requests: list[PromptRequest]) -> BatchPrompt:
    """Every item, then the batch. Taps ``talker:prompt_embeds`` (B, L, C), ``talker:prompt_mask`` (B, L) and
    ``talker:trailing_text`` (B, Lt, C)."""
    out = batch([build_item(talker, cfg, r) for r in requests])
    tap(talker, "prompt_embeds", out.embeds)
    tap(talker, "prompt_mask", out.attention_mask)
    tap(talker, "trailing_text", out.trailing)
    return out
