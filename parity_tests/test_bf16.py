"""bf16 on the session's device (CPU by default; CUDA with ``--device cuda``), judged three ways (issue 7, items 1
and 5; issue 18, item 1): every tap holds three tensors,

- the truth: upstream in float64 on CPU (``reference(case, variant, dtype="float64")``; upstream keeps its own
  fp32 islands there, far below bf16 noise),
- upstream in bf16 on the same device (``dtype="bfloat16"`` for the talker, code predictor and speaker encoder;
  ``codec_dtype="bfloat16"`` for the speech tokenizer),
- ours in bf16 on that device, run end to end on the same inputs as upstream's bf16 capture,

and ``reports.compare.compare_three_way`` passes a tap only if ours sits within 2x upstream's own bf16 error of
upstream bf16 (direct), within 3x of the truth (referee), within the row's measured *mirror* bound of upstream bf16
(far under 2x: ours runs upstream's op sequence, so on one device only a kernel's accumulation order may differ),
and above the row's measured SNR/cosine floor (``helpers_bf16.BF16_ROW_BOUNDS``, tiny; other presets keep the
generic ``THREE_WAY_FLOORS["bfloat16"]`` and no mirror bound). Integer taps (codes) are compared exactly with
upstream bf16.

Every run is end to end (no row is fed upstream's recorded input): the truth is then the same computation at full
precision, and upstream's own error at a tap is the accumulated bf16 drift both bf16 sides share.

Rows: talker layer 0 (every LAYER0_ROWS row) and the last layer + final norm; the code predictor teacher-forced
(MTP projection, layers, final norm, the 15 heads, the stacked logits; ``base``, the Linear projection); the codec
decoder (quantizer, op and block outputs, pre-transformer, stage boundaries, waveform); the Mimi encoder (SEANet,
transformer, quantizer inputs, codes); the speaker encoder (blocks, embedding, x-vector from the 24 kHz clip).

On the CPU ours equals upstream bf16 bit for bit, which ``test_same_dtype_exact`` records; the three-way results of
a component are then recorded as one folded row (each tap's direct difference is 0 there: a row per tap group would
only repeat the exact row), still asserted row by row. On CUDA, and in the simulated CUDA judgement, each row is its
own line.

Simulated CUDA judgement: ``QWEN3TTS_BF16_JUDGE=cuda`` runs this file on the CPU as a CUDA run is judged: the exact
rows skip, and ours runs through ``helpers_bf16.other_kernels`` (every bf16 Linear/Conv1d another correct kernel:
fp32 accumulation in another order, the bias in the epilogue), the stand-in for CUDA's kernel differences.
``test_mutations_bf16.py`` holds that judgement to catching the RMSNorm eps at 1e-4 and 1e-3.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from impl.config import Qwen3TTSConfig
from impl.loading import load_into, read_state_dict
from impl.speaker_encoder import SpeakerEncoder, extract_xvector
from impl.taps import recording, set_tap_paths
from reference_export.cases.codec_decoder import OP_MODULES, D, decoder_blocks, pre_transformer_taps

from .helpers import (
    LAYER0_ROWS,
    ONE_MODEL,
    Calls,
    build_talker,
    free_memory,
    load_model,
    release_models,
    run_stack,
    teacher_run,
)
from .helpers_bf16 import (
    JUDGE_ENV,
    cosine_floor,
    cp_rows,
    encoder_rows,
    judge_bf16_row,
    last_layer_row,
    other_kernels,
    row_bounds,
    simulated_cuda,
    tap_glob,
)
from .helpers_codec import ENC, bf16_decode_skip_reason, build_encoder, load_codec
from .rows import Row, assert_row, compare_row

BF16 = torch.bfloat16


def _truth(reference, case: str, variant: str):
    return reference(case, variant, dtype="float64", device="cpu")


def _same_inputs(a, b) -> None:
    """The bf16 capture and the truth ran on the same stored inputs (else the truth is of another computation)."""
    for n in a.inputs():
        assert torch.equal(a.input(n).double(), b.input(n).double()), f"input {n} differs between {a.path.name} " \
                                                                         f"and {b.path.name}"


FOLDED = ("on CPU ours equals upstream bf16 bit for bit (the exact row), so each tap's direct difference is 0; this "
          "row holds every tap's three-way judgement, i.e. upstream's own error against the fp64 truth and the row's "
          "floor; on CUDA each row is its own line")


def _kernels():
    """Ours' kernels: the regular ones, or under the simulated CUDA judgement another correct kernel order."""
    return other_kernels() if simulated_cuda() else contextlib.nullcontext()


# Each component's bf16 run (our taps, upstream's bf16 and fp64 captures), made once per module. On released
# dimensions (helpers.ONE_MODEL) one component at a time: a component asked for again after another one ran is run
# again. Kept all together, the five reached 10.6 GB at 0.6b (measured: the codec encoder's rows, with the talker,
# code predictor and codec decoder runs still held; 2.4x the 4.34 GB of weights); one at a time, 7.7 GB, as the
# dropped runs stayed resident in the allocator's pools; with free_memory(), 5.9 GB (1.36x).
_COMPONENTS: dict[str, tuple] = {}


def _component(name: str, make):
    if name not in _COMPONENTS:
        if ONE_MODEL[0]:
            _COMPONENTS.clear()
            release_models()
            free_memory()
        with _kernels():
            _COMPONENTS[name] = make()
    return _COMPONENTS[name]


@pytest.fixture(autouse=True, scope="module")
def _components_end_with_the_module():
    yield
    _COMPONENTS.clear()


@pytest.fixture(scope="module")
def bounds_preset(request, preset) -> str:
    """The preset the per-row bounds are looked up for ("checkpoint" for a real checkpoint: none measured)."""
    return "checkpoint" if request.config.getoption("--checkpoint") else preset


def _judge(row: Row, got, ref16, truth, component: str, key: str, variant: str, record, preset: str,
           notes: str = ""):
    dev = next(iter(got.values())).device.type  # where ours ran (cpu, or cuda under --device cuda)
    sim = simulated_cuda()
    where = f"{dev} bf16" + (f", simulated CUDA ({JUDGE_ENV}=cuda: other kernel order, exact rows off)" if sim else "")
    results = judge_bf16_row(row, got, ref16, truth, key, preset, where)
    mirror_k, floors = row_bounds(key, row.name, preset)
    bound = (f"mirror <= {mirror_k:g}x upstream's own error, floor {floors[0]:g} dB (measured on tiny)" if floors
             else f"no bound measured for preset {preset}: generic three-way rule only")
    folded = dev == "cpu" and not sim
    name = "Every row, folded (bf16 three-way)" if folded else f"{row.name} (bf16 three-way)"
    note = "; ".join(x for x in (notes, FOLDED if folded else f"{row.name}: {bound}") if x)
    for r in results:
        record(r, row=name, component=component, variant=variant, notes=note)
    assert_row(row.name, results)
    return results


# ------------------------------------------------------------------------------------------ talker


TALKER_VARIANT = "custom_voice"


def _n_layers(ckpt) -> int:
    return json.loads((ckpt / "config.json").read_text())["talker_config"]["num_hidden_layers"]


def talker_run(checkpoint_dir, reference, device: str = "cpu"):
    """(our taps, upstream bf16, truth, number of layers) for the talker's stack, ours in bf16 on ``device``."""
    ckpt = checkpoint_dir(TALKER_VARIANT)
    ref16 = reference("talker_stack", TALKER_VARIANT, dtype="bfloat16", device=device)
    truth = _truth(reference, "talker_stack", TALKER_VARIANT)
    _same_inputs(ref16, truth)
    got = run_stack(build_talker(ckpt, device, BF16), ref16, device, "eager")
    return got, ref16, truth, _n_layers(ckpt)


@pytest.fixture
def talker_bf16(checkpoint_dir, reference, device):
    return _component("talker", lambda: talker_run(checkpoint_dir, reference, device))


@pytest.mark.parametrize("row", LAYER0_ROWS, ids=[r.name for r in LAYER0_ROWS])
def test_talker_layer0(row: Row, talker_bf16, record, bounds_preset):
    got, ref16, truth, _ = talker_bf16
    _judge(row, got, ref16, truth, "Talker, bf16 three-way", "talker", TALKER_VARIANT, record, bounds_preset)


def test_talker_last_layer(talker_bf16, record, bounds_preset):
    got, ref16, truth, n = talker_bf16
    _judge(last_layer_row(n), got, ref16, truth, "Talker, bf16 three-way", "talker", TALKER_VARIANT, record,
           bounds_preset, notes=f"last layer = layer {n - 1}")


# ------------------------------------------------------------------------------------------ code predictor

CP_VARIANT = "base"  # the Linear MTP projection (the 1.7B form), where a cast boundary can sit


CP_ROW_NAMES = ["MTP projection", "Layers", "Final norm", "LM heads", "Teacher logits"]


def cp_run(checkpoint_dir, reference, device: str = "cpu"):
    """(our taps, upstream bf16, truth) for the teacher-forced code predictor, ours in bf16 on ``device``."""
    ref16 = reference("lm_cp_teacher", CP_VARIANT, dtype="bfloat16", device=device)
    truth = _truth(reference, "lm_cp_teacher", CP_VARIANT)
    _same_inputs(ref16, truth)
    tts = load_model(checkpoint_dir(CP_VARIANT), device, BF16, "eager")
    return teacher_run(tts, ref16, BF16), ref16, truth


@pytest.fixture
def cp_bf16(checkpoint_dir, reference, device):
    return _component("code predictor", lambda: cp_run(checkpoint_dir, reference, device))


@pytest.mark.parametrize("row_name", CP_ROW_NAMES)
def test_code_predictor(row_name: str, cp_bf16, record, bounds_preset):
    got, ref16, truth = cp_bf16
    row = {r.name: r for r in cp_rows(ref16)}[row_name]
    _judge(row, got, ref16, truth, "Code predictor, bf16 three-way", "code_predictor", CP_VARIANT, record,
           bounds_preset, notes="teacher-forced")


# ------------------------------------------------------------------------------------------ codec decoder

CODEC_VARIANT = "base"


def decoder_rows(st_cfg: dict) -> list[Row]:
    out = lambda mods: tuple(f"{D}.{m}:out" for m in mods)  # noqa: E731
    pre = tuple(t for t in pre_transformer_taps(st_cfg)[1:])  # everything after the input projection's input
    return [
        Row("Quantizer decode", (f"{D}.quantizer.rvq_first.output_proj:out", f"{D}.quantizer.rvq_rest.output_proj:out",
                                 f"{D}.pre_conv:in"), "three_way"),
        Row("Causal Conv1d", out(OP_MODULES["conv"]), "three_way"),
        Row("SnakeBeta", out(OP_MODULES["snake"]), "three_way"),
        Row("CausalTransConv1d", out(OP_MODULES["transconv"]), "three_way"),
        Row("ConvNeXtBlock", out(OP_MODULES["convnext"]), "three_way"),
        Row("ResidualUnit", out(OP_MODULES["resunit"]), "three_way"),
        Row("DecoderBlock", out(decoder_blocks(st_cfg)), "three_way"),
        Row("Pre-transformer", pre, "three_way"),
        Row("Full decoder", (f"{D}:out",), "three_way"),
    ]


DECODER_ROW_NAMES = ["Quantizer decode", "Causal Conv1d", "SnakeBeta", "CausalTransConv1d", "ConvNeXtBlock",
                     "ResidualUnit", "DecoderBlock", "Pre-transformer", "Full decoder"]


def decoder_run(checkpoint_dir, reference, device: str = "cpu"):
    """(our taps, upstream bf16, truth, speech-tokenizer config) for a one-shot decode, ours in bf16 on ``device``."""
    ckpt = checkpoint_dir(CODEC_VARIANT)
    ref16 = reference("codec_decoder", CODEC_VARIANT, device=device, codec_dtype="bfloat16")
    truth = _truth(reference, "codec_decoder", CODEC_VARIANT)
    _same_inputs(ref16, truth)
    attn = ref16.meta["attn"]
    dec = load_codec(ckpt, device, attn, BF16).decoder
    with recording(dec, prefix=D, inputs=True) as rec, torch.no_grad():
        wav = dec(ref16.input("codes_bqf").to(device))
    got = Calls(rec.records)  # a tap called twice raises: every call is compared or none
    got[f"{D}:out"] = wav
    st_cfg = json.loads((ckpt / "speech_tokenizer" / "config.json").read_text())
    return got, ref16, truth, st_cfg


@pytest.fixture
def decoder_bf16(checkpoint_dir, reference, device):
    if why := bf16_decode_skip_reason(device):
        pytest.skip(why)
    return _component("codec decoder", lambda: decoder_run(checkpoint_dir, reference, device))


@pytest.mark.parametrize("row_name", DECODER_ROW_NAMES)
def test_codec_decoder(row_name: str, decoder_bf16, record, bounds_preset):
    got, ref16, truth, st_cfg = decoder_bf16
    row = {r.name: r for r in decoder_rows(st_cfg)}[row_name]
    _judge(row, got, ref16, truth, "Codec decoder, bf16 three-way", "codec_decoder", CODEC_VARIANT, record,
           bounds_preset, notes="end to end from the codes")


# ------------------------------------------------------------------------------------------ Mimi encoder


def encoder_run(checkpoint_dir, reference, device: str = "cpu"):
    """(our taps, upstream bf16, truth) for the Mimi encoder on the stored batch, ours in bf16 on ``device``
    (sdpa)."""
    ref16 = reference("codec_encoder", CODEC_VARIANT, device=device, codec_dtype="bfloat16")
    truth = _truth(reference, "codec_encoder", CODEC_VARIANT)
    _same_inputs(ref16, truth)
    attn = ref16.meta["attn"]
    enc = build_encoder(checkpoint_dir(CODEC_VARIANT), device, BF16, attn=attn)
    with recording(enc, ENC) as rec, torch.no_grad():
        # as upstream's wrapper: the audio in the tokenizer's dtype
        out = enc(ref16.input("audio").to(device, BF16), ref16.input("padding_mask").to(device))
    got = Calls(rec.records)  # a tap called twice raises: every call is compared or none
    for i, (c, n) in enumerate(zip(out.codes, out.lengths.tolist())):
        got[f"speech_tokenizer:codes_{i}"] = c[:, :n].transpose(0, 1)
    return got, ref16, truth


@pytest.fixture
def encoder_bf16(checkpoint_dir, reference, device):
    return _component("codec encoder", lambda: encoder_run(checkpoint_dir, reference, device))


@pytest.mark.parametrize("row_name", ["Mimi SEANet", "Mimi transformer", "Mimi quantizer inputs"])
def test_codec_encoder(row_name: str, encoder_bf16, record, bounds_preset):
    got, ref16, truth = encoder_bf16
    row = {r.name: r for r in encoder_rows(ref16)}[row_name]
    _judge(row, got, ref16, truth, "Codec encoder, bf16 three-way", "codec_encoder", CODEC_VARIANT, record,
           bounds_preset, notes="sdpa, from audio")


# Codes where kernels may differ (CUDA, simulated CUDA): a latent within rounding of a quantizer decision boundary
# goes either way, and the residual quantizers after it follow. Ours may differ from upstream bf16 in at most
# CODES_MIRROR x the codes upstream bf16 itself changes against the fp64 truth. Measured on tiny (2 x 16 x 151
# codes): upstream bf16 vs the truth 698 codes; ours under other_kernels() vs upstream bf16 225 (2 chunks) and 241
# (4 chunks), at most 0.35x per tap (codes_0: 105-141 of 362; codes_1: 62-89 of 287); bound 1.5 x 0.35, rounded
# up to 0.55.
CODES_MIRROR = 0.55


def test_codec_encoder_codes(encoder_bf16, record, device):
    """Codes: on the CPU exact against upstream bf16 (the same kernels round the same way). Where kernels may differ
    (CUDA, or the simulated CUDA judgement), the mirror rule of ``CODES_MIRROR`` against upstream's own changes."""
    from reports.compare import compare_exact

    got, ref16, truth = encoder_bf16
    axes = {f"{ENC}.quantizer:codes": ("batch", "codebook", "frame"), "speech_tokenizer:codes_0": ("frame", "codebook"),
            "speech_tokenizer:codes_1": ("frame", "codebook")}
    exact = device == "cpu" and not simulated_cuda()
    results = []
    for n, ax in axes.items():
        r = compare_exact(n, got[n], ref16.tap(n), axes=ax)
        if not exact and r.judged_by != "shape mismatch" and r.n:
            t = truth.tap(n)
            own = int((ref16.tap(n) != t).sum()) if t.shape == ref16.tap(n).shape else r.n
            r.passed = r.n_mismatch <= CODES_MIRROR * own
            r.judged_by = (f"codes where kernels differ: ours may change at most {CODES_MIRROR} x the codes upstream "
                           f"bf16 changes against the fp64 truth")
            r.extra = {"ours_vs_upstream_bf16": r.n_mismatch, "upstream_bf16_vs_truth": own}
            r.message = (f"{n}: {r.n_mismatch}/{r.n} codes differ from upstream bf16 "
                         f"({'within' if r.passed else 'ABOVE'} {CODES_MIRROR} x upstream's own {own} against the "
                         f"fp64 truth)" + (f"; first at {r.first_diff}" if r.first_diff else ""))
        results.append(r)
    for r in results:
        record(r, row="Mimi codes (bf16 vs upstream bf16)", component="Codec encoder, bf16 three-way",
               variant=CODEC_VARIANT, notes="exact" if exact else "mirror rule on code changes")
    assert_row("Mimi codes", results)


# ------------------------------------------------------------------------------------------ speaker encoder


def speaker_run(checkpoint_dir, reference, device: str = "cpu"):
    """(our taps, upstream bf16, truth): our bf16 encoder on upstream's bf16 mel input (the same bits: both sides
    build the mel in fp32 and cast it), plus the x-vector from the stored 24 kHz clip through our mel."""
    ckpt = checkpoint_dir("base")
    ref16 = reference("speaker_xvector", "base", dtype="bfloat16", device=device)
    truth = _truth(reference, "speaker_xvector", "base")
    _same_inputs(ref16, truth)
    cfg = Qwen3TTSConfig.from_file(ckpt / "config.json")
    se = SpeakerEncoder(cfg.speaker_encoder_config)
    load_into(se, read_state_dict(ckpt, "speaker_encoder."), str(ckpt / "model.safetensors"), "speaker_encoder.")
    set_tap_paths(se, "speaker_encoder")
    se = se.to(device, BF16).eval()
    with recording(se, "speaker_encoder") as rec, torch.no_grad():
        se(ref16.tap("speaker_encoder:in").to(device))
    got = Calls(rec.records)  # a tap called twice raises: every call is compared or none
    with torch.no_grad():
        got["speaker_encoder:xvector"] = extract_xvector(se, ref16.tap("speaker_encoder:wav24k").numpy(), 24000)
    return got, ref16, truth


@pytest.fixture
def speaker_bf16(checkpoint_dir, reference, device):
    return _component("speaker encoder", lambda: speaker_run(checkpoint_dir, reference, device))


def speaker_rows(ref) -> list[Row]:
    return [
        Row("Speaker encoder blocks", tap_glob(ref, "speaker_encoder.*:out"), "three_way"),
        Row("x-vector", ("speaker_encoder:out", "speaker_encoder:xvector"), "three_way"),
    ]


@pytest.mark.parametrize("row_name", ["Speaker encoder blocks", "x-vector"])
def test_speaker_encoder(row_name: str, speaker_bf16, record, bounds_preset):
    got, ref16, truth = speaker_bf16
    row = {r.name: r for r in speaker_rows(ref16)}[row_name]
    _judge(row, got, ref16, truth, "Speaker encoder, bf16 three-way", "speaker_encoder", "base", record,
           bounds_preset)


# ------------------------------------------------------------------------------------------ bit for bit


@pytest.mark.parametrize("component", ["Talker", "Code predictor", "Codec decoder", "Codec encoder",
                                       "Speaker encoder"])
def test_same_dtype_exact(component: str, request, record, device):
    """On CPU, ours in bf16 equals upstream in bf16 bit for bit at every float tap of every component (measured:
    the direct RMS of every three-way row above is 0): the same ops in the same order round the same way. This
    is the row that sees a rounding-order bug far below upstream's own bf16 error, which the three-way's 2x
    direct bar cannot (test_mutations_bf16.py: softmax arithmetic in bf16, a code-predictor cast boundary).
    CPU only: CUDA kernels differ between call sites."""
    if device != "cpu":
        pytest.skip(f"bit-for-bit bf16 is a CPU claim; on {device} the three-way rows above judge bf16")
    if simulated_cuda():
        pytest.skip(f"{JUDGE_ENV}=cuda: the simulated CUDA judgement runs without the exact rows, as on CUDA")
    if component == "Talker":
        got, ref16, _, n = request.getfixturevalue("talker_bf16")
        taps = [t for r in LAYER0_ROWS for t in r.taps] + list(last_layer_row(n).taps)
        variant = TALKER_VARIANT
    elif component == "Code predictor":
        got, ref16, _ = request.getfixturevalue("cp_bf16")
        taps = [t for r in cp_rows(ref16) for t in r.taps]
        variant = CP_VARIANT
    elif component == "Codec decoder":
        got, ref16, _, st_cfg = request.getfixturevalue("decoder_bf16")
        taps = [t for r in decoder_rows(st_cfg) for t in r.taps]
        variant = CODEC_VARIANT
    elif component == "Codec encoder":
        got, ref16, _ = request.getfixturevalue("encoder_bf16")
        taps = [t for r in encoder_rows(ref16) for t in r.taps]
        variant = CODEC_VARIANT
    else:
        got, ref16, _ = request.getfixturevalue("speaker_bf16")
        taps = [t for r in speaker_rows(ref16) for t in r.taps]
        variant = "base"
    row = Row(f"{component} (bf16 vs upstream bf16)", tuple(dict.fromkeys(taps)), "exact")
    results = compare_row(row, got, ref16)
    for r in results:
        record(r, row=row.name, component=f"{component}, bf16 three-way", variant=variant, notes="bit for bit, CPU")
    assert_row(row.name, results)


# ------------------------------------------------------------------------------------------ the judge itself


def test_three_way_mirror_and_row_floor():
    """The mirror bound and a row floor each turn a tap red on their own, with the failing judgement named."""
    from reports.compare import compare_three_way

    g = torch.Generator().manual_seed(0)
    truth = torch.randn(4096, generator=g, dtype=torch.float64)
    up = truth + 1e-2 * torch.randn(4096, generator=g, dtype=torch.float64)  # upstream's own error: RMS ~1e-2
    near = up + 5e-4 * torch.randn(4096, generator=g, dtype=torch.float64)  # 0.05x upstream's own error
    far = up + 3e-3 * torch.randn(4096, generator=g, dtype=torch.float64)  # 0.3x: passes 2x, not a 0.1 mirror
    assert compare_three_way("t", near, up, truth, mirror_k=0.1)
    r = compare_three_way("t", far, up, truth, mirror_k=0.1)
    assert not r and r.extra["ok"] == {"direct": True, "mirror": False, "referee": True, "absolute floor": True}
    assert "FAILED on mirror" in r.message
    assert compare_three_way("t", far, up, truth)  # the generic rule alone lets it through
    snr = 10 * math.log10(float(truth.pow(2).sum() / (far - truth).pow(2).sum()))
    hi = compare_three_way("t", far, up, truth, floors=(snr + 1, cosine_floor(snr + 1)))
    assert not hi and hi.extra["ok"]["absolute floor"] is False and hi.extra["floor_source"] == "row"
    assert compare_three_way("t", far, up, truth, floors=(snr - 1, cosine_floor(snr - 1)))


def test_bounds_cover_every_row(checkpoint_dir, reference, device):
    """Every bf16 row has its measured bounds under its exact name (a renamed row would otherwise lose them
    silently), no bound is left for a row that no longer exists, and another preset gets none. The rows are built
    from the checkpoints' configs and upstream's bf16 captures, as the tests above build them (no run of ours)."""
    from .helpers_bf16 import BF16_ROW_BOUNDS

    st_cfg = json.loads((checkpoint_dir(CODEC_VARIANT) / "speech_tokenizer" / "config.json").read_text())
    rows = {("talker", r.name) for r in LAYER0_ROWS}
    rows |= {("talker", last_layer_row(_n_layers(checkpoint_dir(TALKER_VARIANT))).name)}
    rows |= {("code_predictor", r.name)
             for r in cp_rows(reference("lm_cp_teacher", CP_VARIANT, dtype="bfloat16", device=device))}
    rows |= {("codec_decoder", r.name) for r in decoder_rows(st_cfg)}
    rows |= {("codec_encoder", r.name)
             for r in encoder_rows(reference("codec_encoder", CODEC_VARIANT, device=device, codec_dtype="bfloat16"))}
    rows |= {("speaker_encoder", r.name)
             for r in speaker_rows(reference("speaker_xvector", "base", dtype="bfloat16", device=device))}
    assert rows == set(BF16_ROW_BOUNDS), f"rows without bounds: {sorted(rows - set(BF16_ROW_BOUNDS))}; bounds " \
                                         f"without a row: {sorted(set(BF16_ROW_BOUNDS) - rows)}"
    assert row_bounds("talker", "RMS Norm", "0.6b") == (None, None)


def test_other_kernels_touch_only_impl():
    """The simulated-CUDA kernels replace impl's bf16 Linear (fp32 accumulation over reversed K halves, the bias
    before the one rounding) and leave every other caller, upstream's capture included, on torch's own kernel."""
    from impl.layers import Linear

    g = torch.Generator().manual_seed(0)
    lin = Linear(96, 40).to(BF16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=g))
        lin.bias.copy_(torch.randn(40, generator=g))
    x = torch.randn(3, 96, generator=g).to(BF16)
    w, b = lin.weight, lin.bias
    want = (x[:, 48:].float() @ w[:, 48:].float().T + x[:, :48].float() @ w[:, :48].float().T + b.float()).to(BF16)
    plain = torch.nn.functional.linear(x, w, b)
    with other_kernels(), torch.no_grad():
        assert torch.equal(lin(x), want)
        assert torch.equal(torch.nn.functional.linear(x, w, b), plain)  # this module is not impl: untouched
