"""Capture any request end to end: ``python -m reference_export capture --checkpoint DIR --request …``.

A *request* is what ``python -m impl synthesize`` takes (texts, mode, speaker, language, instruct, reference audio
and transcript, x-vector-only, text feeding, frame budget, seed). :func:`capture_request` runs it

- on upstream (default) through upstream's **own** generation path: the inference wrapper
  ``Qwen3TTSModel.generate_custom_voice`` / ``generate_voice_design`` / ``generate_voice_clone`` (prompt building,
  tokenisation, ``model.generate``, the codec decode and the ICL cut are upstream's code), built around the models
  :func:`reference_export.upstream.load_upstream` loaded in the requested dtype (once per command, reused across a
  request file), with the harness's own recorder (:mod:`reference_export.recorder`) on every module;
- or, with ``impl=True`` (``capture --impl``), on our engine (``impl.Qwen3TTS``) through ``impl.taps``, under the
  same tap names, so ``python -m reports compare ours.h5 upstream.h5`` names the first divergence.

Either way taps stream to one HDF5 file as they are produced (:mod:`reference_export.h5stream`), written under a
temporary name and renamed at the end (``impl.outfile.atomic_path``): Ctrl-C or an error leaves no file. A progress
bar per decode step goes to stderr.

What the file holds (schema version 1, see the README): the request and every resolved setting (``/case``), the
token ids (``/inputs/text_ids_<i>``, ``instruct_ids_<i>``, ``ref_ids_<i>``, the 24 kHz reference ``ref_wav``), and
taps: every module output per call with its decode step, ``talker:prompt_embeds`` / ``prompt_mask`` /
``trailing_text`` (the prompt the talker's prefill got), ``talker:logits`` and ``talker.code_predictor:logits_<j>``
(the logits each decision read: last position), ``generate:text_ids`` / ``codes`` / ``hidden`` / ``wav`` per item,
``generate:xvector`` and ``generate:ref_codes`` where they exist; the stop reason and frame count per item in the root
attrs. ``/left_out`` lists the taps ``--taps`` and the steps ``--steps`` dropped.

Taps kept: all (or those ``--taps`` globs match), except ``DEFAULT_SKIP``: module outputs whose call pattern or
shape is an implementation choice rather than part of the model (see its comment); ``all_taps=True``
(``--all-taps``) keeps those too.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .recorder import Recorder

MODES = ("custom_voice", "voice_design", "voice_clone")
VARIANT_MODE = {"custom_voice": "custom_voice", "voice_design": "voice_design", "base": "voice_clone"}
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")

# Left out unless ``--all-taps``: upstream module outputs that are an implementation choice, not a model
# quantity, so a port (ours included) has no reason to reproduce them call for call:
# - the prompt's embedding lookups: upstream embeds the prompt piece by piece (role, pads, speaker, codec tags …,
#   one call each), a port may embed it in one call; the prompt itself is recorded as ``talker:prompt_embeds``;
# - parameter-free helpers and wrapper internals: activations (``act_fn``), the inner conv of a causal (transposed)
#   conv wrapper (its pre-trim output), identity projections inside the decoder's quantizer;
# - full-sequence head outputs: upstream applies ``codec_head`` / the predictor's ``lm_head`` to every prefill
#   position and decides from the last one; ``talker:logits`` / ``talker.code_predictor:logits_<j>`` record the
#   logits the decision read (last position), the quantity a port computes.
DEFAULT_SKIP = (
    "talker.model.text_embedding:*", "talker.model.codec_embedding:*", "talker.text_projection*",
    "*.act_fn:*", "speech_tokenizer.decoder.decoder.*.block.1.conv:*", "speech_tokenizer.decoder.upsample.*.0.conv:*",
    "speech_tokenizer.decoder.quantizer.*.vq.layers.*.project_out:*",
    "talker.codec_head:*", "talker.code_predictor.lm_head.*:*",
    "*.activation_fn:*", "speech_tokenizer.*rotary_emb:*",  # codec activations, RoPE tables (batch-broadcast shape)
)


class PadZeroer:
    """Zero the left-padded prompt positions of the talker's prefill taps (step 0) on both sides of a batch.

    In a batch, shorter prompts are left-padded; every real position masks the padded ones out, so no output
    depends on their values, and upstream and a port legitimately differ there (upstream's fully masked attention
    rows come out as 0, ours do not). The request capture sets them to 0 so a compare judges what matters; the
    file says so (``/case`` attr ``prefill_padding_zeroed``). The sequence axis is axis 1 of (B, L, …) taps and
    axis 2 of (B, H, L, D) ones (q/k after RoPE, attention probabilities: their padded query rows)."""

    def __init__(self, rec: Recorder):
        self.rec = rec
        self.mask: torch.Tensor | None = None  # (B, L) bool, from talker:prompt_mask

    def observe(self, name: str, t: torch.Tensor) -> None:
        if name == "talker:prompt_mask":  # seen whether or not --taps keeps it
            self.mask = t.detach().to("cpu").bool()

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        m = self.mask
        if m is None or bool(m.all()) or not name.startswith("talker.") or name.startswith("talker.code_predictor") \
                or not self.rec.in_loop or self.rec.step != 0 or t.dim() < 2 or t.shape[0] != m.shape[0]:
            return t
        L = m.shape[1]
        axis = 1 if t.shape[1] == L else 2 if t.dim() == 4 and t.shape[2] == L else None
        if axis is None:
            return t
        keep = m.view(m.shape[0], *([1] * (axis - 1)), L, *([1] * (t.dim() - axis - 1)))
        return t * keep.to(t.dtype)


class RequestError(ValueError):
    """A request that cannot run; the message is one line naming the argument (or request-file entry)."""


@dataclass
class Request:
    """One request, with the arguments of ``python -m impl synthesize`` (``seed`` set = a sampled run)."""

    text: list[str]
    mode: str | None = None
    speaker: str | list[str] | None = None  # lists (one per text): request files only
    language: str | list[str] = "auto"
    instruct: str | list[str] | None = None
    ref_audio: str | None = None
    ref_text: str | None = None
    x_vector_only: bool = False
    non_streaming_text: bool | None = None
    max_new_frames: int | None = None
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    name: str | None = None  # request files: names the output file (default: the index)

    @property
    def greedy(self) -> bool:
        return self.seed is None

    def sampling(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SAMPLING_KEYS if getattr(self, k) is not None}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def request_from_args(a) -> Request:
    """The request of ``capture --request``'s arguments (argparse namespace)."""
    nst = None if a.non_streaming_text is None else a.non_streaming_text == "true"
    return Request(text=list(a.text or []), mode=a.mode, speaker=a.speaker, language=a.language,
                   instruct=a.instruct, ref_audio=a.ref_audio, ref_text=a.ref_text, x_vector_only=a.x_vector_only,
                   non_streaming_text=nst, max_new_frames=a.max_new_frames, seed=a.seed,
                   temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty)


def load_request_file(path: str | Path) -> list[Request]:
    """``--request-file``: a JSON list of request objects, keys as the command-line flags with ``_`` for ``-``
    (``text`` may be a string or a list; ``name`` optionally names the output). One line naming the file and entry
    on anything else."""
    p = Path(path)
    where = f"--request-file {p}"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RequestError(f"{where}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"{where}: not valid JSON ({e})") from None
    except OSError as e:
        raise RequestError(f"{where}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, list) or not data:
        what = "an empty list" if data == [] else f"a JSON {type(data).__name__}"
        raise RequestError(f"{where}: expected a non-empty list of requests, got {what}")
    known = {f.name for f in fields(Request)}
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise RequestError(f"{where}: entry {i} is a JSON {type(item).__name__}, not a request object")
        unknown = sorted(set(item) - known)
        if unknown:
            raise RequestError(f"{where}: entry {i} has unknown key(s) {unknown}; known: {sorted(known)}")
        if "text" not in item:
            raise RequestError(f"{where}: entry {i} has no 'text'")
        d = dict(item)
        d["text"] = [d["text"]] if isinstance(d["text"], str) else d["text"]
        if not isinstance(d["text"], list) or not all(isinstance(t, str) for t in d["text"]):
            raise RequestError(f"{where}: entry {i}: 'text' must be a string or a list of strings")
        out.append(Request(**d))
    names = [r.name for r in out if r.name]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RequestError(f"{where}: request name(s) {dup} used twice (each names an output file)")
    return out


def output_paths(out: str | Path, reqs: list[Request], many: bool) -> list[Path]:
    """One output per request: ``--out`` itself for a single ``--request``; for ``--request-file``,
    ``<out stem>_<name or index><suffix>`` beside ``--out`` (``refs/run.h5`` -> ``refs/run_0.h5``, ``refs/run_hello.h5``)."""
    out = Path(out)
    if not many:
        return [out]
    return [out.with_name(f"{out.stem}_{r.name or i}{out.suffix}") for i, r in enumerate(reqs)]


# ------------------------------------------------------------------------------------------ checks


@dataclass
class Resolved:
    """A request checked against the checkpoint, with everything both sides need settled."""

    req: Request
    mode: str
    variant: str
    texts: list[str]
    icl: bool
    non_streaming: bool
    ref_wav: Any = None  # (T,) float32 at 24 kHz, base only


def check_request(req: Request, checkpoint: Path, cfg: dict, where: str = "") -> Resolved:
    """Everything that can be checked before a model loads, each failure one line naming the argument."""
    from impl.audio import AudioInputError, load_reference_audio
    from impl.model import NON_STREAMING_DEFAULT, check_texts

    w = f"{where}: " if where else ""
    try:
        texts = check_texts(req.text)
    except ValueError as e:
        raise RequestError(f"{w}--text: {e}") from None
    variant = cfg.get("tts_model_type")
    served = VARIANT_MODE.get(variant)
    mode = {"base": "voice_clone"}.get(req.mode or "", req.mode or "") or served
    if mode not in MODES:
        raise RequestError(f"{w}--mode {req.mode!r}: not one of {', '.join(MODES)}")
    if mode != served:
        raise RequestError(f"{w}--mode {mode}: {checkpoint} is a {variant!r} checkpoint, which serves {served}")
    tc = cfg.get("talker_config", {})
    n = len(texts)
    spk_list = _per_item(req.speaker, n, "--speaker", w)
    lang_list = _per_item(req.language if req.language is not None else "auto", n, "--language", w)
    ins_list = _per_item(req.instruct, n, "--instruct", w)
    speakers = sorted(tc.get("spk_id") or {})
    for spk in spk_list:
        if mode == "custom_voice":
            if not spk:
                raise RequestError(f"{w}--speaker is required for custom_voice (this checkpoint has: {speakers})")
            if str(spk).lower() not in speakers:
                raise RequestError(f"{w}--speaker {spk!r}: not a speaker of this checkpoint (has: {speakers})")
        elif spk:
            raise RequestError(f"{w}--speaker {spk!r}: mode {mode} takes no speaker (speakers are custom_voice's)")
    langs = sorted(tc.get("codec_language_id") or {}) + ["auto"]
    for lang in lang_list:
        if str(lang).lower() not in langs:
            raise RequestError(f"{w}--language {lang!r}: not supported by this checkpoint (has: {langs})")
    if any(ins_list) and mode == "voice_clone":
        raise RequestError(f"{w}--instruct: mode voice_clone takes no instruct")
    if any(ins_list) and mode == "custom_voice" and "0b6" in str(cfg.get("tts_model_size", "")):
        raise RequestError(f"{w}--instruct: upstream drops it on a 0.6B CustomVoice checkpoint (tts_model_size "
                           f"{cfg.get('tts_model_size')!r}); leave it out")
    icl = False
    ref_wav = None
    if mode == "voice_clone":
        if not req.ref_audio:
            raise RequestError(f"{w}--ref-audio is required for voice_clone")
        icl = not req.x_vector_only
        if icl and not req.ref_text:
            raise RequestError(f"{w}--ref-text is required with --ref-audio in ICL mode (or pass --x-vector-only)")
        if not Path(req.ref_audio).is_file():
            raise RequestError(f"{w}--ref-audio {req.ref_audio}: file not found")
        try:
            ref_wav = load_reference_audio(req.ref_audio)
        except (AudioInputError, ValueError, OSError) as e:
            raise RequestError(f"{w}--ref-audio {req.ref_audio}: {str(e).splitlines()[0]}") from None
    else:
        given = [f for f, v in (("--ref-audio", req.ref_audio), ("--ref-text", req.ref_text),
                                ("--x-vector-only", req.x_vector_only)) if v]
        if given:
            raise RequestError(f"{w}{given[0]}: mode {mode} takes no reference (voice_clone on a Base checkpoint does)")
    if req.max_new_frames is not None:
        mp = int(tc.get("max_position_embeddings", 1 << 30))
        if isinstance(req.max_new_frames, bool) or not isinstance(req.max_new_frames, int) or \
                not 1 <= req.max_new_frames < mp:
            raise RequestError(f"{w}--max-new-frames {req.max_new_frames!r}: must be an integer in [1, {mp - 1}]")
    if req.seed is None and req.sampling():
        raise RequestError(f"{w}--{next(iter(req.sampling())).replace('_', '-')}: sampling settings need --seed "
                           "(without --seed the run is greedy)")
    from impl.sampling import check_sampling_value

    for k, v in req.sampling().items():
        try:
            check_sampling_value(k, v)
        except ValueError as e:
            raise RequestError(f"{w}--{k.replace('_', '-')}: {e}") from None
    nsm = NON_STREAMING_DEFAULT[mode] if req.non_streaming_text is None else bool(req.non_streaming_text)
    return Resolved(req, mode, variant, texts, icl, nsm, ref_wav)


def _per_item(v: Any, n: int, flag: str, w: str) -> list:
    """A scalar (broadcast over the batch) or, in a request file, a list of one value per text."""
    if isinstance(v, list):
        if len(v) != n:
            raise RequestError(f"{w}{flag}: {len(v)} values for {n} texts (give one, or one per text)")
        return list(v)
    return [v] * n


def max_new_tokens(res: Resolved, text_token_counts: list[int], gen_cfg: dict) -> int:
    """Upstream's ``max_new_tokens`` for the request: ``max_new_frames + 1`` (upstream's generate yields one frame
    fewer than its token budget), or, without ``--max-new-frames``, impl's default budget from the longest
    text (``impl.generate.default_frame_budget``) capped by the checkpoint's ``max_new_tokens``: the same frame
    budget ``python -m impl synthesize`` uses, so both sides stop at the same place."""
    from impl.generate import default_frame_budget
    from impl.model import HARD_DEFAULTS

    if res.req.max_new_frames is not None:
        return int(res.req.max_new_frames) + 1
    cap = int(gen_cfg.get("max_new_tokens", HARD_DEFAULTS["max_new_tokens"]))
    return min(cap, default_frame_budget(max(text_token_counts)) + 1)


def check_steps_before(steps: frozenset[int] | None, n_tokens: int) -> None:
    """A ``--steps`` entry no run of this budget can reach (decode steps are 0 … max_new_tokens - 1)."""
    if steps and max(steps) >= n_tokens:
        raise RequestError(f"--steps: step {max(steps)} is beyond the run (its budget allows decode steps "
                           f"0..{n_tokens - 1})")


def check_after(rec: Recorder, globs: list[str] | None, steps: frozenset[int] | None) -> None:
    """After the run, before the file is renamed into place: every ``--taps`` glob matched a tap and every
    ``--steps`` step ran."""
    if globs:
        bad = rec.unmatched(globs)
        if bad:
            raise RequestError(f"--taps {bad[0]!r}: matches no tap of this run (e.g. {sorted(rec.calls)[:3]})")
    if steps:
        missing = sorted(steps - rec.loop_steps)
        if missing:
            ran = sorted(rec.loop_steps)
            raise RequestError(f"--steps: step {missing[0]} is beyond the run (decode steps "
                               f"{ran[0] if ran else 0}..{ran[-1] if ran else -1} ran)")


# ------------------------------------------------------------------------------------------ capture


def capture_request(req: Request, checkpoint: str | Path, out: str | Path, *, impl: bool = False,
                    device: str = "cpu", dtype: str = "float32", codec_dtype: str | None = None,
                    attn: str = "sdpa", taps: list[str] | None = None, steps: frozenset[int] | None = None,
                    progress: bool = True, model=None, all_taps: bool = False,
                    release_talker: bool = False) -> Path:
    """Run ``req`` on upstream (or, ``impl=True``, on our engine) and write its capture to ``out`` (HDF5, atomic).

    ``taps``: globs of tap names to keep (default: all), less ``DEFAULT_SKIP`` unless ``all_taps``; ``steps``:
    decode steps to keep (taps outside the decode loop are always kept). ``model``: an already loaded upstream
    (:class:`Upstream`) or ``impl.Qwen3TTS`` on ``device`` in these dtypes, reused across requests.
    ``release_talker`` (upstream only; the last request of a command): once upstream's ``generate`` has returned the
    codes, the talker's weights are freed before the wrapper's codec decode, which never reads them, so the decode's
    activations do not stack on the talker (the released-size memory budget); the model is unusable afterwards. Without
    ``taps``, every tap of :func:`expected_request_taps` must have been recorded (a hook that stopped firing fails
    here, never as a silently thinner file)."""
    import h5py

    from impl.outfile import atomic_path

    from .export import DTYPES, codec_dtype_for
    from .h5stream import H5TapStream

    checkpoint = Path(checkpoint)
    cfg = json.loads((checkpoint / "config.json").read_text())
    gen_path = checkpoint / "generation_config.json"
    gen_cfg = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    res = check_request(req, checkpoint, cfg)
    codec_dtype = codec_dtype or codec_dtype_for(dtype)
    for name, v in (("--dtype", dtype), ("--codec-dtype", codec_dtype)):
        if v not in DTYPES:
            raise RequestError(f"{name} {v!r}: not one of {sorted(DTYPES)}")
    include = tuple(taps) if taps else ("*",)
    rec = Recorder(include=include, exclude=() if all_taps else DEFAULT_SKIP, steps=steps)
    pads = PadZeroer(rec)
    rec.transform, rec.observe = pads, pads.observe
    if req.max_new_frames is not None:  # known before anything loads
        check_steps_before(steps, int(req.max_new_frames) + 1)
    runner = _ImplRun if impl else _UpstreamRun
    run = runner(res, checkpoint, cfg, gen_cfg, device, DTYPES[dtype], DTYPES[codec_dtype], attn, model)
    run.release_talker = release_talker and not impl
    check_steps_before(steps, run.n_tokens)
    meta = _meta(checkpoint, cfg, device, dtype, codec_dtype, attn, impl, req)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        stream = H5TapStream(f, meta)
        rec.sink = stream
        result = run.run(rec, stream, progress)
        check_after(rec, taps, steps)
        expected = expected_request_taps(cfg, res)
        missing = [t for t in expected if t not in rec.calls] if not taps else []
        if missing:
            raise RuntimeError(f"request capture ({'impl' if impl else 'upstream'}): the run did not record "
                               f"{len(missing)} expected tap(s), e.g. {missing[:3]}")
        stream.set_meta({"expected_taps": expected if not taps else []})
        settings = {"request": req.to_json(), "mode": res.mode, "texts": res.texts, "language": req.language,
                    "speaker": req.speaker, "instruct": req.instruct, "ref_text": req.ref_text,
                    "ref_audio": req.ref_audio, "x_vector_only": req.x_vector_only, "icl": res.icl,
                    "non_streaming": res.non_streaming, "greedy": req.greedy, "seed": req.seed,
                    "max_new_frames": req.max_new_frames, "max_new_tokens": run.n_tokens,
                    "generate_kwargs": run.gen_kwargs, "taps_filter": list(taps or []),
                    "taps_default_skip": [] if all_taps else list(DEFAULT_SKIP),
                    "steps_filter": sorted(steps) if steps else None, "description": "request capture",
                    "prefill_padding_zeroed": len(res.texts) > 1}
        stream.set_case(settings)
        stream.set_meta({"stop_reason": result["stop_reason"], "frames": result["frames"],
                         "decode_steps": len(rec.loop_steps), "tap_calls_written": stream.calls_written,
                         "tap_bytes_raw": stream.bytes_written})
        stream.left_out(sorted(rec.left_out), sorted(rec.left_out_steps))
    return Path(out)


def expected_request_taps(cfg: dict, res: Resolved) -> list[str]:
    """What every request capture records (the registry for requests): the prompt, every talker layer's output per
    step, the logits each decision read, the per-item results, the decoded waveform, and in Base modes the x-vector
    (and, ICL, the reference codes)."""
    tc = cfg["talker_config"]
    taps = ["talker:prompt_embeds", "talker:prompt_mask", "talker:trailing_text", "generate:text_ids",
            "talker.model.norm:out", "talker:logits", "generate:codes", "generate:hidden", "generate:wav",
            "speech_tokenizer.decoder:out"]
    taps += [f"talker.model.layers.{i}:out" for i in range(tc["num_hidden_layers"])]
    taps += [f"talker.code_predictor:logits_{j}" for j in range(tc["num_code_groups"] - 1)]
    if res.mode == "voice_clone":
        taps += ["generate:xvector"] + (["generate:ref_codes"] if res.icl else [])
    return taps


def _meta(checkpoint: Path, cfg: dict, device: str, dtype: str, codec_dtype: str, attn: str, impl: bool,
          req: Request) -> dict[str, Any]:
    from .export import device_info, git_sha
    from .synth import checkpoint_sha256
    from .upstream import UPSTREAM_VERSION, versions

    vers = versions()
    return {"harness_git_sha": git_sha(), "versions": vers,
            "qwen_tts_version": vers.get("qwen-tts", UPSTREAM_VERSION), "transformers_version": vers.get("transformers"),
            "torch_version": vers.get("torch"), "device": device, "dtype": dtype, "codec_dtype": codec_dtype,
            "attn": attn, "seed": req.seed if req.seed is not None else "null", "device_info": device_info(device),
            "preset": cfg.get("tts_model_size"), "variant": cfg.get("tts_model_type"), "checkpoint": str(checkpoint),
            "checkpoint_sha256": checkpoint_sha256(checkpoint), "case_name": f"request:{req.name or 'cli'}",
            "producer": "impl" if impl else f"upstream qwen-tts {vers.get('qwen-tts', UPSTREAM_VERSION)}",
            "expected_taps": []}


class _Progress:
    """One tqdm bar on stderr, one tick per decode step (talker forward)."""

    def __init__(self, total: int, enabled: bool, what: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"{what} decode", unit="step", file=sys.stderr, disable=not enabled,
                        leave=False, mininterval=0, miniters=1)  # every step drawn: a step is never too frequent

    def tick(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _loop_hook(talker: torch.nn.Module, rec: Recorder, bar: _Progress):
    """A pre-hook on the talker: each call is one decode step (the step number itself is set by the capture's
    own step hook, upstream, or by ``impl.generate``)."""

    def pre(module, args):
        rec.in_loop = True
        bar.tick()

    return talker.register_forward_pre_hook(pre)


def _stop(frames: list[int], n_tokens: int) -> list[str]:
    # Upstream's generate yields at most max_new_tokens - 1 frames: a row that got them all ran out of budget.
    return ["budget" if f >= n_tokens - 1 else "eos" for f in frames]


class _UpstreamRun:
    def __init__(self, res: Resolved, checkpoint: Path, cfg: dict, gen_cfg: dict, device: str, dtype, codec_dtype,
                 attn: str, model=None):
        from .upstream import load_upstream

        self.res, self.checkpoint, self.device = res, checkpoint, device
        self.up = model or load_upstream(checkpoint, device=device, dtype=dtype, attn=attn, codec_dtype=codec_dtype)
        self.wrapper = upstream_wrapper(self.up, checkpoint, gen_cfg, device)
        counts = [int(ids.shape[-1]) for ids in  # upstream's own tokenisation of the prompt text
                  self.wrapper._tokenize_texts([self.wrapper._build_assistant_text(t) for t in res.texts])]
        self.n_tokens = max_new_tokens(res, counts, gen_cfg)
        self.gen_kwargs: dict[str, Any] = {}
        self.release_talker = False

    def run(self, rec: Recorder, stream, progress: bool) -> dict[str, Any]:
        from .capture import capture

        res, req, w = self.res, self.res.req, self.wrapper
        model = w.model
        inner = model.generate
        out: dict[str, Any] = {}

        def generate(*args, **kw):  # upstream's own generate, called by the wrapper; we only look at its arguments
            for i, ids in enumerate(kw["input_ids"]):
                stream.add_input(f"text_ids_{i}", ids[0])
                rec.add("generate:text_ids", ids[0])
            for key in ("instruct_ids", "ref_ids"):
                for i, ids in enumerate(kw.get(key) or []):
                    if ids is not None:
                        stream.add_input(f"{key}_{i}", ids[0])
            vcp = kw.get("voice_clone_prompt")
            if vcp is not None:
                for x in vcp["ref_spk_embedding"]:
                    rec.add("generate:xvector", x)
                for c in vcp.get("ref_code") or []:
                    if c is not None:
                        rec.add("generate:ref_codes", c)
            self.gen_kwargs = {k: v for k, v in kw.items() if k not in (
                "input_ids", "instruct_ids", "ref_ids", "voice_clone_prompt")}
            hook = model.talker.register_forward_pre_hook(_prompt_pre(rec), with_kwargs=True)
            loop = _loop_hook(model.talker, rec, bar)
            try:
                codes, hidden = inner(*args, **kw)
            finally:
                hook.remove()
                loop.remove()
                rec.in_loop, rec.step = False, 0  # the codec decode follows, outside the decode loop
            for c, h in zip(codes, hidden):
                rec.add("generate:codes", c)
                rec.add("generate:hidden", h)
            out["frames"] = [int(c.shape[0]) for c in codes]
            if self.release_talker:
                release_weights(model.talker)
            return codes, hidden

        gen = dict(max_new_tokens=self.n_tokens, non_streaming_mode=res.non_streaming)
        if req.greedy:
            gen.update(do_sample=False, subtalker_dosample=False)
        else:
            gen.update(req.sampling())
        if res.ref_wav is not None:
            # The clip at 24 kHz as impl.audio reads it (the file's own samples when it is 24 kHz); upstream reads
            # the file itself inside generate_voice_clone.
            stream.add_input("ref_wav", torch.from_numpy(res.ref_wav))
        bar = _Progress(self.n_tokens, progress, "upstream")
        heads = _logit_hooks(model.talker, rec)
        model.generate = generate  # an instance attribute shadows the method for this call only
        try:
            with capture(self.up.roots(), rec=rec), torch.no_grad():
                if req.seed is not None:
                    torch.manual_seed(req.seed)
                texts = res.texts if len(res.texts) > 1 else res.texts[0]
                if res.mode == "custom_voice":
                    wavs, _ = w.generate_custom_voice(texts, speaker=req.speaker, language=req.language,
                                                      instruct=req.instruct, **gen)
                elif res.mode == "voice_design":
                    wavs, _ = w.generate_voice_design(texts, instruct=req.instruct if req.instruct is not None else "",
                                                      language=req.language, **gen)
                else:
                    wavs, _ = w.generate_voice_clone(texts, language=req.language, ref_audio=req.ref_audio,
                                                     ref_text=req.ref_text, x_vector_only_mode=req.x_vector_only,
                                                     **gen)
                for wav in wavs:
                    rec.add("generate:wav", torch.from_numpy(wav))
        finally:
            del model.generate
            for h in heads:
                h.remove()
            bar.close()
        return {"frames": out["frames"], "stop_reason": _stop(out["frames"], self.n_tokens)}


def release_weights(module: torch.nn.Module) -> None:
    """Free ``module``'s parameters and buffers (each becomes an empty tensor of its dtype) and hand the freed heap
    back to the OS (glibc ``malloc_trim``; a no-op elsewhere). The module cannot run afterwards."""
    import ctypes
    import ctypes.util
    import gc

    for t in [*module.parameters(), *module.buffers()]:
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def upstream_wrapper(up, checkpoint: Path, gen_cfg: dict, device: str):
    """Upstream's inference wrapper (``Qwen3TTSModel``) around already loaded models: the speech tokenizer wrapper
    (``Qwen3TTSTokenizer``) and processor are built as its ``from_pretrained`` builds them, from the folder's
    ``speech_tokenizer/preprocessor_config.json`` and tokenizer files (``fix_mistral_regex=True`` as upstream)."""
    from .upstream import import_upstream

    import_upstream()
    from qwen_tts.core.models.processing_qwen3_tts import Qwen3TTSProcessor
    from qwen_tts.inference.qwen3_tts_model import Qwen3TTSModel
    from qwen_tts.inference.qwen3_tts_tokenizer import Qwen3TTSTokenizer
    from transformers import AutoFeatureExtractor, Qwen2TokenizerFast

    tok = Qwen3TTSTokenizer()
    tok.model = up.speech_tokenizer
    tok.config = up.speech_tokenizer.config
    tok.device = torch.device(device)
    tok.feature_extractor = AutoFeatureExtractor.from_pretrained(str(checkpoint / "speech_tokenizer"))
    up.model.load_speech_tokenizer(tok)
    up.model.load_generate_config(gen_cfg)
    processor = Qwen3TTSProcessor(tokenizer=Qwen2TokenizerFast.from_pretrained(str(checkpoint),
                                                                               fix_mistral_regex=True))
    return Qwen3TTSModel(up.model, processor, gen_cfg)


def _prompt_pre(rec: Recorder):
    """The talker's first forward (the prefill) carries the prompt as keyword arguments."""
    seen = [False]

    def pre(module, args, kwargs):
        if not seen[0]:
            seen[0] = True
            was, rec.in_loop = rec.in_loop, False  # the prompt is the loop's input, kept whatever --steps says
            rec.add("talker:prompt_embeds", kwargs["inputs_embeds"])
            rec.add("talker:prompt_mask", kwargs["attention_mask"])
            rec.add("talker:trailing_text", kwargs["trailing_text_hidden"])
            rec.in_loop = was
        return None

    return pre


def _logit_hooks(talker: torch.nn.Module, rec: Recorder) -> list:
    """``talker:logits`` (codec head at the last position, (B, 1, V)) and ``talker.code_predictor:logits_<j>``
    (predictor head j at the last position, (B, V)): the logits each decision read."""
    def head(m, args, out):
        rec.add("talker:logits", out[:, -1:])

    hs = [talker.codec_head.register_forward_hook(head)]
    for j, lm in enumerate(talker.code_predictor.lm_head):
        def cp(m, args, out, _j=j):
            rec.add(f"talker.code_predictor:logits_{_j}", out[:, -1])

        hs.append(lm.register_forward_hook(cp))
    return hs


class _ImplRun:
    """Our engine on the same request, taps through ``impl.taps.recording`` streamed into the same recorder."""

    def __init__(self, res: Resolved, checkpoint: Path, cfg: dict, gen_cfg: dict, device: str, dtype, codec_dtype,
                 attn: str, model=None):
        from impl import Qwen3TTS

        self.res = res
        self.tts = model or Qwen3TTS.from_pretrained(checkpoint, device=device, dtype=dtype, attn=attn,
                                                     codec_dtype=codec_dtype)
        from impl.prompt import assistant_text

        counts = [len(self.tts.tokenizer.encode(assistant_text(t))) for t in res.texts]
        self.n_tokens = max_new_tokens(res, counts, gen_cfg)
        self.gen_kwargs: dict[str, Any] = {}

    def run(self, rec: Recorder, stream, progress: bool) -> dict[str, Any]:
        from torch import nn

        from impl import taps

        res, req, tts = self.res, self.res.req, self.tts
        root = nn.Module()  # one tree so module paths read as checkpoint keys: talker.…, speech_tokenizer.…
        root.talker = tts.talker
        root.speech_tokenizer = tts.codec
        if res.mode == "voice_clone":
            root.speaker_encoder = tts.speaker_encoder

        def sink(name: str, value: torch.Tensor, step: int) -> None:
            rec.step = step if rec.in_loop else 0  # outside the loop impl's recorder may still hold the last step
            rec.add(name, value)

        bar = _Progress(self.n_tokens, progress, "impl")
        loop = _loop_hook(tts.talker, rec, bar)
        frames = self.n_tokens - 1
        try:
            with taps.recording(root, sink=sink), torch.inference_mode():
                xv = rc = None
                if res.mode == "voice_clone":
                    stream.add_input("ref_wav", torch.from_numpy(res.ref_wav))
                    # As upstream's create_voice_clone_prompt: the reference is encoded in x-vector-only mode too
                    # (its codes then go unused), so the codec encoder's taps exist on both sides.
                    codes = tts.encode_reference(req.ref_audio)
                    rc = codes if res.icl else None
                    xv = tts.xvector(req.ref_audio)
                kw = dict(mode=res.mode, speaker=req.speaker, language=req.language, instruct=req.instruct,
                          ref_text=req.ref_text if res.icl else None, x_vector_only=req.x_vector_only,
                          non_streaming_text=res.non_streaming, xvector=xv, ref_codes=rc)
                reqs = tts.requests(res.texts, **kw)
                for i, r in enumerate(reqs):
                    ids = torch.tensor(r.input_ids)
                    stream.add_input(f"text_ids_{i}", ids)
                    rec.add("generate:text_ids", ids)
                    for key, v in (("instruct_ids", r.instruct_ids), ("ref_ids", r.ref_ids)):
                        if v is not None:
                            stream.add_input(f"{key}_{i}", torch.tensor(v))
                    if xv is not None:
                        rec.add("generate:xvector", r.xvector)
                    if r.ref_codes is not None:
                        rec.add("generate:ref_codes", r.ref_codes)
                result = tts.generate_codes(res.texts, greedy=req.greedy, seed=req.seed, max_new_frames=frames,
                                            **kw, **req.sampling())
                rec.in_loop, rec.step = False, 0
                for c, h in zip(result.codes, result.hidden):
                    rec.add("generate:codes", c)
                    rec.add("generate:hidden", h)
                for wav in tts.decode(result):
                    rec.add("generate:wav", torch.from_numpy(wav))
        finally:
            loop.remove()
            bar.close()
        self.gen_kwargs = asdict(tts.settings(req.greedy, frames, **req.sampling()))
        return {"frames": [int(c.shape[0]) for c in result.codes], "stop_reason": list(result.stop_reason)}
