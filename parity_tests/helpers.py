"""Helpers the parity test files share: building ``impl`` models from a checkpoint folder, running them on a
reference case's inputs, and the row definitions several files judge (talker layer 0, generation, the code
predictor, the mel front end). Test files import from here, never from each other; fixtures live in
``parity_tests/conftest.py``.

Every call is compared: a run returns every call of every tap (``Calls``), and ``compare_calls`` pairs ours with the
reference's call by call, failing when the two sides recorded different numbers of calls. Every fp64 comparison
goes through ``compare_tap``, which asserts float64 on both sides first (``check_fp64``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch

import impl.mel
from impl.config import Qwen3TTSConfig
from impl.generate import GenerationSettings, generate
from impl.layers import attention, causal_mask
from impl.loading import load_module
from impl.model import Qwen3TTS
from impl.prompt import PromptRequest, build
from impl.sampling import make_generator
from impl.talker import Talker
from impl.taps import recording
from reference_export.cases.lm import MODES
from reports.compare import CompareResult, Tier, compare, compare_exact

from .rows import Row, missing

# ------------------------------------------------------------------------------------------ every call compared


class Calls(Mapping):
    """What ``impl`` recorded in one run, every call of every tap kept (``calls[name]``: one tensor per call, in
    call order).

    As a mapping, ``got[name]`` is the tensor of a tap recorded once, so single-call consumers (``rows.compare_row``,
    the bf16 judges) read it as before; for a tap recorded more than once it raises instead of returning the first
    call, so no consumer compares call 0 and silently drops the rest. :func:`compare_calls` compares them all."""

    def __init__(self, records: dict[str, list[torch.Tensor]]):
        self.calls = {k: list(v) for k, v in records.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        calls = self.calls[name]  # KeyError for a tap impl did not record: ``name in got`` works as for a dict
        if len(calls) != 1:
            raise AssertionError(f"{name}: impl recorded {len(calls)} calls; reading one of them would leave the "
                                 "others uncompared (compare every call with helpers.compare_calls)")
        return calls[0]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.calls[name] = [value]  # a value the caller adds (a run's output), one call

    def __contains__(self, name: object) -> bool:
        return name in self.calls  # recorded at all (Mapping's default would read the value, and raise)

    def __iter__(self) -> Iterator[str]:
        return iter(self.calls)

    def __len__(self) -> int:
        return len(self.calls)


def check_fp64(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """The fp64 tier's precondition, checked before every fp64 comparison (``compare_tap``): ours and upstream's
    tensors are both torch.float64. ``compare`` measures in float64 whatever it is given, so without this a side
    that ran (or was stored) in float32 would be judged at fp64 tolerances on fp32 values and could pass by luck
    or hide a formula difference under fp32 rounding. Integer taps (ids, codes) are judged exactly and not here."""
    assert got.dtype == torch.float64 and ref.dtype == torch.float64, \
        f"{name}: an fp64 row compares float64 on both sides, got ours {got.dtype}, upstream {ref.dtype}"


def compare_tap(name: str, got: torch.Tensor, ref: torch.Tensor, tier: str | Tier = "block") -> CompareResult:
    """``reports.compare.compare`` for one tensor pair; at the fp64 tier float taps must be float64 on both sides
    (:func:`check_fp64`). Every fp64 row of the suite compares through here."""
    tier_name = tier if isinstance(tier, str) else tier.name
    if tier_name == "fp64" and (got.is_floating_point() or ref.is_floating_point()):
        check_fp64(name, got, ref)
    return compare(name, got, ref, tier)


def call_name(name: str, i: int, n: int) -> str:
    """A result's name for call ``i`` of ``n``: the tap name alone for a tap recorded once (as before)."""
    return name if n == 1 else f"{name} [call {i} of {n}]"


def compare_calls(name: str, got: Calls | dict[str, list[torch.Tensor]], ref, tier: str = "block",
                  label: str | None = None,
                  judge: Callable[[str, torch.Tensor, torch.Tensor], CompareResult] | None = None,
                  ) -> list[CompareResult]:
    """Every call of tap ``name``: ours (``got``: a :class:`Calls` or ``{tap: [tensor per call]}``) paired by
    index with the reference's (``ref.tap_steps(name)``), one result per call, judged by ``judge`` (default
    :func:`compare_tap` at ``tier``). A tap missing on either side is a failed result; so is a different number
    of calls on the two sides (one result naming both counts: a module ours runs once more, or once less, than
    upstream is a bug even where the calls both ran agree). ``label`` names the results instead of ``name``."""
    calls = got.calls if isinstance(got, Calls) else got
    if name not in calls:
        return [missing(name, "impl", tier)]
    if not ref.has(name):
        return [missing(name, f"the reference {ref.path.name}", tier)]
    ours, theirs = calls[name], ref.tap_steps(name)
    shown = label or name
    if len(ours) != len(theirs):
        r = CompareResult(shown, tier, False, [], [], "")
        r.message = (f"{shown}: impl recorded {len(ours)} calls, the reference {ref.path.name} {len(theirs)} "
                     "(every call is compared, paired by index; a different number of calls is a failure)")
        r.judged_by = "call count"
        r.extra.update(calls_ours=len(ours), calls_ref=len(theirs))
        return [r]
    judge = judge or (lambda n, a, b: compare_tap(n, a, b, tier))
    return [judge(call_name(shown, i, len(ours)), a, b) for i, (a, b) in enumerate(zip(ours, theirs))]


def compare_row_calls(row: Row, got: Calls, ref) -> list[CompareResult]:
    """``rows.compare_row`` for every call: each tap of ``row`` at its tier, every call paired by index
    (:func:`compare_calls`)."""
    out = [r for name in row.taps for r in compare_calls(name, got, ref, row.tier_of(name))]
    if not out:
        raise AssertionError(f"row {row.name!r} compares nothing")
    return out


# ------------------------------------------------------------------------------------------ talker layer 0

L0 = "talker.model.layers.0"
LAYER0_ROWS = [
    Row("Text Embedding", ("talker.model.text_embedding:out",), "op"),
    Row("Text Projection", ("talker.text_projection.linear_fc1:out", "talker.text_projection:out"), "op"),
    Row("RMS Norm", (f"{L0}.input_layernorm:out", f"{L0}.post_attention_layernorm:out"), "op"),
    Row("QKV Projections", (f"{L0}.self_attn.q_proj:out", f"{L0}.self_attn.k_proj:out", f"{L0}.self_attn.v_proj:out"), "op"),
    Row("QK Norm", (f"{L0}.self_attn.q_norm:out", f"{L0}.self_attn.k_norm:out"), "op"),
    Row("RoPE", (f"{L0}.self_attn:q_rope", f"{L0}.self_attn:k_rope"), "op"),
    Row("Attention (probabilities)", (f"{L0}.self_attn:attn_probs",), "block"),
    Row("Attention (output)", (f"{L0}.self_attn.o_proj:in",), "block"),
    Row("O Projection", (f"{L0}.self_attn.o_proj:out",), "op"),
    Row("MLP", (f"{L0}.mlp.gate_proj:out", f"{L0}.mlp.up_proj:out", f"{L0}.mlp:out"), "block"),
    Row("Full Layer 0", (f"{L0}:out",), "block"),
]


def build_talker(ckpt: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, cfg_edit=None) -> Talker:
    """impl's talker stack from a checkpoint folder (text side + decoder layers)."""
    d = json.loads((ckpt / "config.json").read_text())
    if cfg_edit:
        cfg_edit(d)
    cfg = Qwen3TTSConfig.from_dict(d, where=str(ckpt / "config.json"))
    release_models()
    # The engine's own loader (built on meta, the file's tensors become the parameters): the weights once in
    # memory, not a randomly initialised copy plus the loaded one (14 GB at 0.6B dimensions).
    return load_module(lambda: Talker(cfg.talker_config), ckpt, "talker.", device, dtype,
                       where=str(ckpt / "model.safetensors"))


def run_stack(talker: Talker, ref, device: str, attn: str) -> Calls:
    """Run impl on the reference's inputs with attention ``attn`` (the talker's module setting, for this run only);
    return every call of every tap (:class:`Calls`)."""
    ids = ref.input("text_ids").to(device)
    B, T = ids.shape
    if "position_ids" in ref.inputs():
        pos = ref.input("position_ids").to(device)  # (3, B, T) distinct rows
    else:
        pos = torch.arange(T, device=device).expand(3, B, T)  # upstream's default: cache_position, 3 equal rows
    dtype = next(talker.parameters()).dtype
    with attention(talker, attn), recording(talker, prefix="talker", inputs=True) as rec, torch.no_grad():
        mask = causal_mask(T, T, dtype, torch.device(device), None)
        talker.model(talker.embed_text(ids), pos, mask)
    return Calls(rec.records)


# ------------------------------------------------------------------------------------------ generation

GEN_CASES = [pytest.param(m, nsm, id=f"{m}-{'nonstream' if nsm else 'stream'}") for m in MODES for nsm in (False, True)]
TEXT_NAME = {False: "streaming text", True: "non-streaming text"}
MODE_NAME = {"custom_voice": "custom_voice", "voice_design": "voice_design", "xvec": "voice_clone x-vector",
             "icl": "voice_clone ICL"}


_MODELS: dict[tuple, Qwen3TTS] = {}
# Set by conftest on released dimensions and on a user's checkpoint: keep one model in memory, not five (a 0.6B fp32
# model is 4.1 GB). Tests asking for the same (checkpoint, device, dtype, attention) share it.
ONE_MODEL = [False]


def free_memory() -> None:
    """Collect, then hand the C heap's freed pages back to the system. Dropped inside a test (the next model, run
    or component made in the same test's setup), memory otherwise stays resident in the allocator's pools: at 0.6b,
    with the codec encoder's bf16 run dropped, 3.71 GB stayed resident, 0.42 GB after the trim (measured)."""
    import gc

    from .capture_child import return_freed_memory

    gc.collect()
    return_freed_memory()


def release_models() -> None:
    """On released dimensions (``ONE_MODEL``): drop the shared model before a test builds one of its own, so the
    two are never in memory together."""
    if ONE_MODEL[0] and _MODELS:
        _MODELS.clear()
        _RUNS.clear()
        free_memory()


def load_model(ckpt: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, attn: str = "eager") -> Qwen3TTS:
    """Our model from ``ckpt``, loaded once and shared by every test of the session asking for the same one."""
    key = (str(ckpt), device, dtype, attn)
    if key not in _MODELS:
        if len(_MODELS) > (0 if ONE_MODEL[0] else 4):
            _MODELS.clear()
            if ONE_MODEL[0]:
                _RUNS.clear()  # cached generation runs hold their recorded activations: released-size memory too
            free_memory()
        _MODELS[key] = Qwen3TTS.from_pretrained(ckpt, device=device, dtype=dtype, attn=attn)
    return _MODELS[key]


def requests_from_ref(ref) -> list[PromptRequest]:
    """The case's batch as impl requests: stored ids, settings, and upstream's recorded x-vectors / ref codes."""
    s = ref.case
    names = set(ref.inputs())
    n = len(s["texts"])
    reqs = []
    for i in range(n):
        r = PromptRequest(ref.input(f"text_ids_{i}").tolist(), language=s["languages"][i],
                          non_streaming=bool(s["non_streaming"]))
        if f"instruct_ids_{i}" in names:
            r.instruct_ids = ref.input(f"instruct_ids_{i}").tolist()
        if s.get("speakers"):
            r.speaker = s["speakers"][i]
        if ref.has("generate:xvector"):
            r.xvector = ref.tap_steps("generate:xvector")[i]
            if s.get("icl"):
                r.ref_ids = ref.input(f"ref_ids_{i}").tolist()
                r.ref_codes = ref.tap_steps("generate:ref_codes")[i].long()
        reqs.append(r)
    return reqs


def settings_from_ref(tts: Qwen3TTS, ref) -> tuple[GenerationSettings, int | None]:
    s = ref.case
    if s.get("greedy"):
        return GenerationSettings.greedy(int(s["max_new_tokens"])), None
    return tts.settings(max_new_frames=int(s["max_new_tokens"]) - 1, **s["sampling"]), int(s["seed"])


# The taps a cached generation run (``gen_run``, ``bf16_run``) keeps: the prompt, each layer's output (not its
# sub-modules'), the final norms and the heads: what the generation and prompt rows read. Measured at 0.6b (fp32,
# eager, the x-vector streaming case): every tap (624 names) held 1.65 GB of activations beside the model, these
# (56 names) 0.10 GB.
GEN_TAPS = ("talker:*", "talker.model.layers.?:out", "talker.model.layers.??:out", "talker.model.norm:out",
            "talker.codec_head:out", "talker.code_predictor.lm_head.*:out",
            "talker.code_predictor.model.layers.?:out", "talker.code_predictor.model.layers.??:out",
            "talker.code_predictor.model.norm:out")


def run_impl(tts: Qwen3TTS, ref, record_taps: bool = True, include: tuple[str, ...] = ("*",)):
    """impl's generation on a case: (GenerationResult, {tap: [tensor per call]}), the taps matching ``include``."""
    reqs = requests_from_ref(ref)
    settings, seed = settings_from_ref(tts, ref)
    with torch.inference_mode(), \
            recording(tts.talker if record_taps else None, prefix="talker", include=include) as rec:
        prompt = build(tts.talker, tts.config, reqs)
        res = generate(tts.talker, prompt, settings, make_generator(seed, tts.device))
    return res, rec.records


_RUNS: dict[tuple, tuple] = {}  # gen_run's cache (parity_tests/conftest.py)


def compare_codes(name: str, ours: torch.Tensor, ref: torch.Tensor, margins: torch.Tensor) -> CompareResult:
    """Exact codes (frames, 16); on mismatch the first differing (frame, codebook) and our margin there."""
    n = min(ours.shape[0], ref.shape[0])
    if n and not torch.equal(ours[:n].cpu(), ref[:n].cpu()):
        r = compare_exact(name, ours[:n], ref[:n], axes=("frame", "codebook"))
        f, c = r.first_diff
        r.extra["margin_at_first_diff"] = float(margins[f, c])
        r.message += f"; our top1-top2 margin there {float(margins[f, c]):.3g} (a tie if ~0)"
    else:
        r = compare_exact(name, ours, ref, axes=("frame", "codebook"))
        if ours.shape[0] != ref.shape[0]:
            r.message += f" (frames: ours {ours.shape[0]}, upstream {ref.shape[0]}; equal up to frame {n})"
    r.extra.update(frames=int(ref.shape[0]), frames_ours=int(ours.shape[0]),
                   min_margin=float(margins.min()) if margins.numel() else math.inf)
    return r


# ------------------------------------------------------------------------------------------ code predictor, mel


def teacher_run(tts, ref, dtype=torch.float32) -> Calls:
    """impl's teacher-forced predictor on the case inputs -> every call of every tap (:class:`Calls`), under
    ``tts.attn`` (a loaded model's own setting, or the one a stand-in names)."""
    t = tts.talker
    dev = tts.device
    hidden = ref.input("hidden").to(dev, dtype)
    codes = ref.input("codes").to(dev)
    with attention(t, tts.attn), torch.inference_mode(), recording(t, prefix="talker") as rec:
        c0 = t.embed_codec(codes[:, :1])
        t.code_predictor.forward_teacher(hidden, codes, c0)
    return Calls(rec.records)


def mel_results(ref, device: str = "cpu") -> list[CompareResult]:
    wav = ref.tap("speaker_encoder:wav24k").to(device)
    got = impl.mel.mel_spectrogram(wav[None]).transpose(1, 2)  # (1, F, 128), as upstream feeds the encoder
    return [compare("speaker_encoder:in (mel)", got, ref.tap("speaker_encoder:in"), "op")]
