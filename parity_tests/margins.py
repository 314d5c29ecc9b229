"""A synthetic checkpoint with realistic greedy margins, for the bf16 generation rule (issue 18, item 1).

On the random-weight ``tiny`` checkpoint upstream's own bf16 greedy codes leave its fp32 ones within frames 0-2:
logits drawn at random sit within bf16 noise of each other at many of the 16 decisions per frame, so the rule of
``helpers_bf16`` ("ours may not leave upstream bf16 before upstream leaves its own fp32, unless at a tie") has
almost nothing to hold ours to. A trained model is confident: its greedy continuation of a prompt is decided by
margins far above bf16 noise, with a few moderate ones.

:func:`margins_checkpoint` builds such a checkpoint from the tiny ``custom_voice`` one, deterministically, in a
few seconds on one CPU thread:

1. the target: impl's own fp32 greedy continuation of the ``lm_gen_custom_voice_stream`` prompts (the case's
   stored token ids, batch of three, left-padded), ``FRAMES`` frames per item with EOS never chosen (so every
   item runs to the budget: 48 x 16 decisions each);
2. ``STEPS`` Adam steps (lr ``LR``) on the cross-entropy of the talker's token-0 choices and the code predictor's
   15 choices per frame along that path, teacher-forced in fp32 (one full-sequence talker forward, one
   teacher-forced predictor forward per frame; every talker parameter but the text embedding table trains);
3. the trained tensors replace theirs in ``model.safetensors`` (same keys, shapes, dtype); every other file of
   the folder is copied as it is. ``margins.json`` records the recipe and the losses.

Few steps on purpose: the greedy path is already the model's own, so cross-entropy only widens the margins it
has. Measured with impl in fp32 on its path after ``STEPS``: smallest top1-top2 margin per item 0.20, 1.13 and 1.05
logits (moderate); over the 2,307 decisions, 1st percentile 9.8 and median 26.5 bf16 ulps of the top logit (~29)
(confident), where the random weights had 0.2 and 12.2 ulps and smallest margins of 0.003-0.01 logits. Five steps
already lift every margin above 2.8 logits, a hundred above 8.

Cached under ``$QWEN3TTS_CACHE/margins/`` keyed by everything that decides the content (the source checkpoint's
hash, the case's token ids, this file, the torch version), like ``conftest.synthetic_checkpoint``; outside
``.cache/ckpt`` so the session-start clean-up of stale synthetic checkpoints never sees it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from impl.generate import GenerationSettings, TalkerLoop
from impl.layers import causal_mask
from impl.model import Qwen3TTS
from impl.outfile import atomic_dir, atomic_path, write_text
from impl.prompt import build
from impl.talker import rope_positions, step_positions

from .helpers import requests_from_ref

CASE = "lm_gen_custom_voice_stream"  # the prompts the checkpoint is sharpened on (and judged on)
VARIANT = "custom_voice"
FRAMES = 48  # = the case's max_new_tokens - 1
STEPS = 3
LR = 1e-3


def _greedy_path(tts: Qwen3TTS, prompt, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """impl's fp32 greedy continuation with EOS never chosen: tokens (B, n_tokens), frames (B, n_tokens - 1, G)."""
    loop = TalkerLoop(tts.talker, prompt, GenerationSettings.greedy(n_tokens))
    choose = loop._choose_token

    def no_eos(logits, hidden_last):
        logits = logits.clone()
        logits[:, loop.eos] = -math.inf
        choose(logits, hidden_last)

    loop._choose_token = no_eos
    with torch.inference_mode():
        for _ in loop:
            pass
    return loop.tokens.clone(), loop.frames[:, : n_tokens - 1].clone()


def _sequence_forward(talker, prompt, frames: torch.Tensor):
    """The talker teacher-forced over prompt + frames in one forward, as generation feeds it step by step
    (frame k's embedding plus the k-th trailing text vector, then tts_pad): hidden (B, L+F, C), logits."""
    B, L, _ = prompt.embeds.shape
    n = frames.shape[1]
    Lt = prompt.trailing.shape[1]
    steps = [talker.frame_embedding(frames[:, k]) + (prompt.trailing[:, k : k + 1] if k < Lt else prompt.tts_pad)
             for k in range(n)]
    x = torch.cat([prompt.embeds, *steps], dim=1)
    pos, deltas = rope_positions(prompt.attention_mask)
    pos = torch.cat([pos, step_positions(L, deltas, n)], dim=2)
    key_padding = torch.ones(B, L + n, dtype=torch.long)
    key_padding[:, :L] = prompt.attention_mask
    out = talker(x, pos, causal_mask(L + n, L + n, x.dtype, x.device, key_padding), None, all_logits=True)
    return out.hidden, out.logits


def sharpen(tts: Qwen3TTS, ref, steps: int = STEPS, lr: float = LR) -> dict:
    """Train ``tts`` (fp32, CPU) in place on its own greedy path for the prompts of ``ref``; return facts."""
    talker = tts.talker
    with torch.no_grad():
        prompt = build(talker, tts.config, requests_from_ref(ref))
    tokens, frames = _greedy_path(tts, prompt, FRAMES + 1)
    B, L, C = prompt.embeds.shape
    params = [p for n, p in talker.named_parameters() if not n.startswith("model.text_embedding")]
    for p in talker.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        hidden, logits = _sequence_forward(talker, prompt, frames)
        lt = logits[:, L - 1 : L - 1 + FRAMES]  # position L-1+k chose token k
        loss_t = F.cross_entropy(lt.reshape(-1, lt.shape[-1]), tokens[:, :FRAMES].reshape(-1))
        codes = frames.reshape(B * FRAMES, -1)
        past = hidden[:, L - 1 : L - 1 + FRAMES].reshape(B * FRAMES, C)
        cl = talker.code_predictor.forward_teacher(past, codes, talker.embed_codec(codes[:, :1]))
        loss_p = F.cross_entropy(cl.reshape(-1, cl.shape[-1]), codes[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss_t + loss_p).backward()
        opt.step()
        losses.append([round(loss_t.item(), 6), round(loss_p.item(), 6)])
    for p in talker.parameters():
        p.requires_grad_(False)
    return {"steps": steps, "lr": lr, "frames": FRAMES, "losses_talker_predictor": losses,
            "trained": sorted(n for n, _ in talker.named_parameters() if not n.startswith("model.text_embedding"))}


def build_margins_checkpoint(src: Path, ref, out: Path) -> Path:
    """Write the sharpened copy of checkpoint ``src`` to ``out`` (atomically, as a whole folder)."""
    from safetensors.torch import load_file, save_file

    tts = Qwen3TTS.from_pretrained(src, device="cpu", dtype=torch.float32, attn="eager", mmap=False)
    facts = sharpen(tts, ref)
    weights = load_file(str(src / "model.safetensors"))
    trained = tts.talker.state_dict()
    for name in facts["trained"]:
        key = f"talker.{name}"
        if key not in weights or weights[key].shape != trained[name].shape:
            raise KeyError(f"{src / 'model.safetensors'}: no tensor {key} of shape {tuple(trained[name].shape)}")
        weights[key] = trained[name].detach().to(weights[key].dtype).contiguous()
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        (tmp / "model.safetensors").unlink()
        with atomic_path(tmp / "model.safetensors") as t:
            save_file(weights, str(t), metadata={"format": "pt"})
        write_text(tmp / "margins.json", json.dumps({"source": src.name, "case": CASE, **facts}, indent=1))
    return out


def _key(src: Path, ref) -> str:
    from reference_export.synth import checkpoint_sha256

    h = hashlib.sha256()
    h.update(checkpoint_sha256(src).encode())
    for name in sorted(ref.inputs()):
        h.update(name.encode())
        h.update(ref.input(name).numpy().tobytes())
    h.update(Path(__file__).read_bytes())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:12]


def _prune(folder: Path, keep: str, refs: Path) -> None:
    """Remove realistic-margin checkpoints built by other versions (they are never reused) and the references
    captured on them (named by the checkpoint's hash), unless the kept checkpoint has the same hash (the build is
    deterministic: a change to this file's comments rebuilds the same weights). Dot-prefixed entries are writes in
    progress: left alone."""
    from reference_export.synth import checkpoint_sha256

    keep_sha = checkpoint_sha256(folder / keep)[:16]
    for old in folder.glob(f"tiny-{VARIANT}-margins-*"):  # never a dot-prefixed temporary folder
        if old.name == keep or not old.is_dir():
            continue
        try:
            sha = checkpoint_sha256(old)[:16]
        except OSError:
            sha = None
        shutil.rmtree(old, ignore_errors=True)
        if sha and sha != keep_sha:
            for f in refs.glob(f"{sha}-*.h5"):
                f.unlink(missing_ok=True)


def margins_checkpoint(src: Path, ref) -> Path:
    """Build (once) and return the realistic-margin checkpoint made from ``src`` on ``ref``'s prompts."""
    from conftest import CACHE, _lock

    key = f"tiny-{VARIANT}-margins-{_key(src, ref)}"
    out = CACHE / "margins" / key
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock("margins"):
        if not (out / "margins.json").exists():
            build_margins_checkpoint(src, ref, out)
            _prune(out.parent, key, CACHE / "refs")
    return out


# ------------------------------------------------------------------------------------------ logit-gap shifts

def head_tap(cb: int) -> str:
    """The tap holding the logits behind codebook ``cb`` (0: the talker's codec head, else predictor head cb-1)."""
    return "talker.codec_head:out" if cb == 0 else f"talker.code_predictor.lm_head.{cb - 1}:out"


def gap_shifts(recs: dict, ref16, frames: list[int]) -> torch.Tensor:
    """Per decision (item, frame, codebook) with ``frame < frames[item]`` (where ours and upstream bf16 read the
    same inputs), how far our logits move upstream bf16's top1-top2 gap, in bf16 ulps of its top logit:
    ``((ours[a] - ours[r]) - (up[a] - up[r])) / ulp(up[a])`` with a, r upstream's top two (raw head logits, last
    position of each call; call f of a head decides frame f). 0 everywhere when ours equals upstream bf16."""
    from .helpers_bf16 import bf16_ulp

    out = []
    for cb in range(16):
        ups, ours = ref16.tap_steps(head_tap(cb)), recs[head_tap(cb)]
        for f in range(min(len(ups), len(ours))):
            V = ups[f].shape[-1]
            u = ups[f].float().reshape(ups[f].shape[0], -1, V)[:, -1]
            o = ours[f].float().cpu().reshape(ours[f].shape[0], -1, V)[:, -1]
            for i in range(u.shape[0]):
                if f >= frames[i]:
                    continue
                top, (a, r) = torch.topk(u[i], 2)
                out.append(float((o[i, a] - o[i, r]) - (top[0] - top[1])) / bf16_ulp(float(top[0])))
    return torch.tensor(out)
