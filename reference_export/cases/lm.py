"""Language-model cases: prompt building, the talker loop, the code predictor, sampling (issue #3).

``lm_gen_<mode>_<text>``: upstream ``Qwen3TTSForConditionalGeneration.generate`` on a batch of three texts of
different lengths (left-padded prompts, right-padded trailing text), greedy for both loops, one case per mode x
text feeding (``stream`` = upstream's ``non_streaming_mode=False``). Recorded per talker call (call 0 = prefill,
call k = decode step k): every talker layer output, the final norm, the codec head; per frame the 15 predictor
heads; once: the prompt (``talker:prompt_embeds``/``prompt_mask``/``trailing_text``, grabbed from the talker's
first forward call), and the results (``generate:codes`` / ``generate:hidden``, one entry per batch item).
Base cases also record upstream's x-vectors (``generate:xvector``) and ICL reference codes
(``generate:ref_codes``) computed from the stored reference audio, so ``impl`` is fed exactly upstream's.

``lm_sample_custom_voice``: sampled generation (non-default temperature/top-k/top-p/penalty on both loops) after
``torch.manual_seed``: impl's seeded generator draws the same stream, so the codes must match exactly too.
``lm_prefill``: the prompt and prefill only (2 tokens), small enough to capture in bf16 for the referee tier.
``lm_cp_teacher``: upstream ``forward_sub_talker_finetune`` (teacher-forced code predictor) on random
hidden states and codes; every predictor module recorded.
"""

from __future__ import annotations

from functools import partial

import torch

from ..registry import register_taps
from . import Case, CaseEnv, register

TEXTS = ["Hello world, this is a parity test.", "Short!",
         "一个稍微长一点的句子，用来让批次里的长度不同。And some English after it, too."]
MAX_NEW_TOKENS = 49  # 48 frames at most per item
REF_SAMPLES = [1920 * 5 + 333, 1920 * 8, 1920 * 30 + 1000]  # ICL: fewer and more codec frames than text tokens
REF_TEXTS = ["Reference words here.", "A reference transcript long enough to outrun its few codec frames, surely.",
             "Hi."]

# mode -> (variant, per-item settings)
MODES = {
    "custom_voice": ("custom_voice", dict(languages=["english", "chinese", "auto"], speakers=["ryan", "eric", "dylan"],
                                          instructs=["", "Speak slowly and warmly.", ""])),
    "voice_design": ("voice_design", dict(languages=["english", "auto", "chinese"], speakers=None,
                                          instructs=["A deep calm voice.", "", "Cheerful and fast."])),
    "xvec": ("base", dict(languages=["english", "auto", "japanese"], speakers=None, instructs=None, icl=False)),
    "icl": ("base", dict(languages=["english", "auto", "chinese"], speakers=None, instructs=None, icl=True)),
}
GEN_INCLUDE = ("talker.model.layers.*:out", "talker.model.norm:out", "talker.codec_head:out",
               "talker.code_predictor.model.layers.*:out", "talker.code_predictor.model.norm:out",
               "talker.code_predictor.lm_head.*:out", "talker:*", "generate:*")
SAMPLING = dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.8, repetition_penalty=1.3,
                subtalker_dosample=True, subtalker_temperature=0.7, subtalker_top_k=30, subtalker_top_p=0.9)
SAMPLE_SEED = 1234


def _gen_inputs(env: CaseEnv, mode: str) -> dict[str, torch.Tensor]:
    _, s = MODES[mode]
    out: dict[str, torch.Tensor] = {}
    for i, t in enumerate(TEXTS):
        out[f"text_ids_{i}"] = torch.tensor(env.tokenize(f"<|im_start|>assistant\n{t}<|im_end|>\n<|im_start|>assistant\n"))
        ins = (s.get("instructs") or [""] * 3)[i]
        if ins:
            out[f"instruct_ids_{i}"] = torch.tensor(env.tokenize(f"<|im_start|>user\n{ins}<|im_end|>\n"))
    if MODES[mode][0] == "base":
        g = env.generator("lm-ref-audio")
        for i, n in enumerate(REF_SAMPLES):
            # Noise with a slow envelope: something for the speaker encoder and the codec encoder to tell apart.
            env_ = torch.sin(torch.linspace(0, 3.14 * (i + 1), n)).abs() + 0.2
            out[f"ref_wav_{i}"] = (torch.randn(n, generator=g) * 0.1 * env_).float()
            out[f"ref_ids_{i}"] = torch.tensor(env.tokenize(f"<|im_start|>assistant\n{REF_TEXTS[i]}<|im_end|>\n"))
    return out


def _prompt_grabber(talker, rec):
    """Pre-hook on the talker's forward: its first call (the prefill) carries the prompt as keyword arguments."""
    seen = {"done": False}

    def pre(module, args, kwargs):
        if not seen["done"]:
            seen["done"] = True
            rec.add("talker:prompt_embeds", kwargs["inputs_embeds"])
            rec.add("talker:prompt_mask", kwargs["attention_mask"])
            rec.add("talker:trailing_text", kwargs["trailing_text_hidden"])
        return None

    return talker.register_forward_pre_hook(pre, with_kwargs=True)


def run_generate(up, inputs: dict[str, torch.Tensor], rec, *, mode: str, non_streaming: bool, max_new_tokens: int,
                 sampling: dict | None = None, seed: int | None = None) -> None:
    variant, s = MODES[mode]
    model = up.model
    dev = next(model.parameters()).device
    n = len(TEXTS)
    ids = [inputs[f"text_ids_{i}"].to(dev)[None] for i in range(n)]
    kw: dict = {}
    if s.get("instructs") is not None:
        kw["instruct_ids"] = [inputs[f"instruct_ids_{i}"].to(dev)[None] if f"instruct_ids_{i}" in inputs else None
                              for i in range(n)]
    if s.get("speakers") is not None:
        kw["speakers"] = s["speakers"]
    with torch.no_grad():
        if variant == "base":
            wavs = [inputs[f"ref_wav_{i}"].numpy() for i in range(n)]
            xvecs = [model.extract_speaker_embedding(w, 24000) for w in wavs]
            for x in xvecs:
                rec.add("generate:xvector", x)
            ref_codes = [None] * n
            if s["icl"]:
                st = up.speech_tokenizer
                for i, w in enumerate(wavs):
                    x = torch.from_numpy(w)[None].to(dev, next(st.parameters()).dtype)
                    enc = st.encode(x, padding_mask=torch.ones(x.shape, dtype=torch.long, device=dev))
                    ref_codes[i] = enc.audio_codes[0].long()
                    rec.add("generate:ref_codes", ref_codes[i])
            kw["voice_clone_prompt"] = dict(ref_code=ref_codes, ref_spk_embedding=xvecs,
                                            x_vector_only_mode=[not s["icl"]] * n, icl_mode=[s["icl"]] * n)
            kw["ref_ids"] = [inputs[f"ref_ids_{i}"].to(dev)[None] for i in range(n)]
        gen = dict(do_sample=False, subtalker_dosample=False) if sampling is None else dict(sampling)
        hook = _prompt_grabber(model.talker, rec)
        try:
            if seed is not None:
                torch.manual_seed(seed)
            codes, hidden = model.generate(input_ids=ids, languages=s["languages"], non_streaming_mode=non_streaming,
                                           max_new_tokens=max_new_tokens, **gen, **kw)
        finally:
            hook.remove()
    for c, h in zip(codes, hidden):
        rec.add("generate:codes", c)
        rec.add("generate:hidden", h)


def gen_case_name(mode: str, non_streaming: bool) -> str:
    return f"lm_gen_{mode}_{'nonstream' if non_streaming else 'stream'}"


for _mode, (_variant, _s) in MODES.items():
    for _nsm in (False, True):
        register(Case(
            name=gen_case_name(_mode, _nsm), component="lm_generate", roots=("talker",), variants=(_variant,),
            description=f"greedy generation, {_mode}, {'non-' if _nsm else ''}streaming text, batch of 3 (left-padded)",
            make_inputs=partial(_gen_inputs, mode=_mode),
            run=partial(run_generate, mode=_mode, non_streaming=_nsm, max_new_tokens=MAX_NEW_TOKENS),
            settings={"mode": _mode, "non_streaming": _nsm, "max_new_tokens": MAX_NEW_TOKENS, "greedy": True,
                      "texts": TEXTS, **{k: v for k, v in _s.items() if v is not None},
                      **({"ref_texts": REF_TEXTS} if _variant == "base" else {})},
            include=GEN_INCLUDE, attn="sdpa",  # upstream's eager mask builder costs ~10 s per case
        ))

register(Case(
    name="lm_sample_custom_voice", component="lm_generate", roots=("talker",), variants=("custom_voice",),
    description="seeded sampled generation (non-default sampling on both loops), custom_voice, non-streaming text",
    make_inputs=partial(_gen_inputs, mode="custom_voice"),
    run=partial(run_generate, mode="custom_voice", non_streaming=True, max_new_tokens=33, sampling=SAMPLING,
                seed=SAMPLE_SEED),
    settings={"mode": "custom_voice", "non_streaming": True, "max_new_tokens": 33, "greedy": False,
              "seed": SAMPLE_SEED, "sampling": SAMPLING, "texts": TEXTS,
              **{k: v for k, v in MODES["custom_voice"][1].items() if v is not None}},
    include=("talker.codec_head:out", "talker:*", "generate:*"), attn="sdpa",
))

register(Case(
    name="lm_prefill", component="lm_prefill", roots=("talker",), variants=("custom_voice",),
    description="prompt + prefill (+ one step) of the custom_voice batch; small enough to capture in bf16",
    make_inputs=partial(_gen_inputs, mode="custom_voice"),
    run=partial(run_generate, mode="custom_voice", non_streaming=True, max_new_tokens=2),
    settings={"mode": "custom_voice", "non_streaming": True, "max_new_tokens": 2, "greedy": True, "texts": TEXTS,
              **{k: v for k, v in MODES["custom_voice"][1].items() if v is not None}},
    include=GEN_INCLUDE,
))


# -------------------------------------------------------------------------------- teacher-forced predictor

CP_BATCH = 4


def _cp_inputs(env: CaseEnv) -> dict[str, torch.Tensor]:
    g = env.generator("lm-cp-teacher")
    t = env.config["talker_config"]
    return {"hidden": torch.randn(CP_BATCH, t["hidden_size"], generator=g),
            "codes": torch.randint(0, t["code_predictor_config"]["vocab_size"], (CP_BATCH, t["num_code_groups"]),
                                   generator=g)}


def run_cp_teacher(up, inputs: dict[str, torch.Tensor], rec) -> None:
    talker = up.model.talker
    p = next(talker.parameters())
    with torch.no_grad():
        logits, _ = talker.forward_sub_talker_finetune(inputs["codes"].to(p.device),
                                                       inputs["hidden"].to(p.device, p.dtype))
    rec.add("talker.code_predictor:teacher_logits", logits)


register(Case(
    name="lm_cp_teacher", component="lm_cp_teacher", roots=("talker",), variants=("base", "custom_voice"),
    description="teacher-forced code predictor (upstream forward_sub_talker_finetune) on random hidden/codes",
    make_inputs=_cp_inputs, run=run_cp_teacher, settings={"batch": CP_BATCH},
    include=("talker.code_predictor.*", "talker.code_predictor:*"),
))


# ---------------------------------------------------------------------------------------------- registry


def _talker_step_taps(cfg: dict) -> list[str]:
    n = cfg["talker_config"]["num_hidden_layers"]
    return [f"talker.model.layers.{i}:out" for i in range(n)] + ["talker.model.norm:out", "talker.codec_head:out"]


@register_taps("lm_generate")
def _generate_taps(cfg: dict, st_cfg: dict, settings: dict) -> list[str]:
    taps = ["talker:prompt_embeds", "talker:prompt_mask", "talker:trailing_text", "generate:codes", "generate:hidden",
            "talker.codec_head:out"]
    if settings.get("greedy"):
        taps += _talker_step_taps(cfg)
        taps += [f"talker.code_predictor.lm_head.{j}:out" for j in range(cfg["talker_config"]["num_code_groups"] - 1)]
        # The predictor's own layers while generating (15 calls per frame): values no final output may show when a
        # bug touches only positions the heads do not read, so they are compared call by call too.
        n_cp = cfg["talker_config"]["code_predictor_config"]["num_hidden_layers"]
        taps += [f"talker.code_predictor.model.layers.{i}:out" for i in range(n_cp)]
        taps.append("talker.code_predictor.model.norm:out")
    if cfg.get("tts_model_type") == "base":
        taps.append("generate:xvector")
        if settings.get("icl"):
            taps.append("generate:ref_codes")
    return taps


@register_taps("lm_prefill")
def _prefill_taps(cfg: dict, st_cfg: dict, settings: dict) -> list[str]:
    return ["talker:prompt_embeds", "talker:prompt_mask", "talker:trailing_text"] + _talker_step_taps(cfg)


@register_taps("lm_cp_teacher")
def _cp_taps(cfg: dict, st_cfg: dict, settings: dict) -> list[str]:
    cp = cfg["talker_config"]["code_predictor_config"]
    taps = ["talker.code_predictor:teacher_logits", "talker.code_predictor.small_to_mtp_projection:out",
            "talker.code_predictor.model.norm:out"]
    for i in range(cp["num_hidden_layers"]):
        b = f"talker.code_predictor.model.layers.{i}"
        taps += [f"{b}:out", f"{b}.self_attn:out", f"{b}.mlp:out", f"{b}.self_attn:q_rope", f"{b}.self_attn:k_rope"]
    taps += [f"talker.code_predictor.lm_head.{j}:out" for j in range(cp["num_code_groups"] - 1)]
    return taps
