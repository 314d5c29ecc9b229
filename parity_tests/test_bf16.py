"""bf16 on the session's device (CPU by default; CUDA with ``--device cuda``), judged three ways (issue 7, items 1
and 5): every tap holds three tensors,

- the truth: upstream in float64 on CPU (``reference(case, variant, dtype="float64")``; upstream keeps its own
  fp32 islands there, far below bf16 noise),
- upstream in bf16 on the same device (``dtype="bfloat16"`` for the talker, code predictor and speaker encoder;
  ``codec_dtype="bfloat16"`` for the speech tokenizer),
- ours in bf16 on that device, run end to end on the same inputs as upstream's bf16 capture,

and ``reports.compare.compare_three_way`` passes a tap only if ours sits within 2x upstream's own bf16 error of
upstream bf16 (direct), within 3x of the truth (referee), and above the absolute SNR/cosine floor of
``THREE_WAY_FLOORS["bfloat16"]`` (so a large upstream error cannot excuse a large one of ours). Integer taps (codes)
are compared exactly with upstream bf16.

Every run is end to end (no row is fed upstream's recorded input): the truth is then the same computation at full
precision, and upstream's own error at a tap is the accumulated bf16 drift both bf16 sides share.

Rows: talker layer 0 (every LAYER0_ROWS row) and the last layer + final norm; the code predictor teacher-forced
(MTP projection, layers, final norm, the 15 heads, the stacked logits; ``base``, the Linear projection); the codec
decoder (quantizer, op and block outputs, pre-transformer, stage boundaries, waveform); the Mimi encoder (SEANet,
transformer, quantizer inputs, codes); the speaker encoder (blocks, embedding, x-vector from the 24 kHz clip).
"""

from __future__ import annotations

import fnmatch
import json

import pytest
import torch

from impl.config import Qwen3TTSConfig
from impl.loading import load_into, read_state_dict
from impl.speaker_encoder import SpeakerEncoder, extract_xvector
from impl.taps import recording, set_tap_paths
from reference_export.cases.codec_decoder import OP_MODULES, D, decoder_blocks, pre_transformer_taps

from .helpers import LAYER0_ROWS, build_talker, load_model, run_stack, teacher_run
from .helpers_codec import ENC, build_encoder, load_codec
from .rows import Row, assert_row, compare_row, compare_row_three_way

PRECISION = "bfloat16"
BF16 = torch.bfloat16


def _truth(reference, case: str, variant: str):
    return reference(case, variant, dtype="float64", device="cpu")


def _same_inputs(a, b) -> None:
    """The bf16 capture and the truth ran on the same stored inputs (else the truth is of another computation)."""
    for n in a.inputs():
        assert torch.equal(a.input(n).double(), b.input(n).double()), f"input {n} differs between {a.path.name} " \
                                                                         f"and {b.path.name}"


def _judge(row: Row, got, ref16, truth, component: str, variant: str, record, notes: str = ""):
    dev = next(iter(got.values())).device.type  # where ours ran (cpu, or cuda under --device cuda)
    results = compare_row_three_way(row, got, ref16, truth, PRECISION, f"{dev} bf16")
    for r in results:
        record(r, row=f"{row.name} (bf16 three-way)", component=component, variant=variant, notes=notes)
    assert_row(row.name, results)
    return results


def _taps(ref, *globs: str) -> tuple[str, ...]:
    names = ref.meta["expected_taps"]
    return tuple(n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs))


# ------------------------------------------------------------------------------------------ talker


TALKER_VARIANT = "custom_voice"


@pytest.fixture(scope="module")
def talker_bf16(checkpoint_dir, reference, device):
    ckpt = checkpoint_dir(TALKER_VARIANT)
    ref16 = reference("talker_stack", TALKER_VARIANT, dtype="bfloat16", device=device)
    truth = _truth(reference, "talker_stack", TALKER_VARIANT)
    _same_inputs(ref16, truth)
    got = run_stack(build_talker(ckpt, device, BF16), ref16, device, "eager")
    n = json.loads((ckpt / "config.json").read_text())["talker_config"]["num_hidden_layers"]
    return got, ref16, truth, n


@pytest.mark.parametrize("row", LAYER0_ROWS, ids=[r.name for r in LAYER0_ROWS])
def test_talker_layer0(row: Row, talker_bf16, record):
    got, ref16, truth, _ = talker_bf16
    _judge(row, got, ref16, truth, "Talker layer 0, bf16 three-way", TALKER_VARIANT, record)


def test_talker_last_layer(talker_bf16, record):
    got, ref16, truth, n = talker_bf16
    row = Row(f"Last layer ({n - 1}) and final norm", (f"talker.model.layers.{n - 1}:out", "talker.model.norm:out"),
              "three_way")
    _judge(row, got, ref16, truth, "Talker stack, bf16 three-way", TALKER_VARIANT, record)


# ------------------------------------------------------------------------------------------ code predictor

CP = "talker.code_predictor"
CP_VARIANT = "base"  # the Linear MTP projection (the 1.7B form), where a cast boundary can sit


def cp_rows(ref) -> list[Row]:
    return [
        Row("MTP projection", (f"{CP}.small_to_mtp_projection:out",), "three_way"),
        Row("Layers", _taps(ref, f"{CP}.model.layers.*"), "three_way"),
        Row("Final norm", (f"{CP}.model.norm:out",), "three_way"),
        Row("LM heads", _taps(ref, f"{CP}.lm_head.*"), "three_way"),
        Row("Teacher logits", (f"{CP}:teacher_logits",), "three_way"),
    ]


CP_ROW_NAMES = ["MTP projection", "Layers", "Final norm", "LM heads", "Teacher logits"]


def cp_run(checkpoint_dir, reference, device: str = "cpu"):
    """(our taps, upstream bf16, truth) for the teacher-forced code predictor, ours in bf16 on ``device``."""
    ref16 = reference("lm_cp_teacher", CP_VARIANT, dtype="bfloat16", device=device)
    truth = _truth(reference, "lm_cp_teacher", CP_VARIANT)
    _same_inputs(ref16, truth)
    tts = load_model(checkpoint_dir(CP_VARIANT), device, BF16, "eager")
    return teacher_run(tts, ref16, BF16), ref16, truth


@pytest.fixture(scope="module")
def cp_bf16(checkpoint_dir, reference, device):
    return cp_run(checkpoint_dir, reference, device)


@pytest.mark.parametrize("row_name", CP_ROW_NAMES)
def test_code_predictor(row_name: str, cp_bf16, record):
    got, ref16, truth = cp_bf16
    row = {r.name: r for r in cp_rows(ref16)}[row_name]
    _judge(row, got, ref16, truth, "Code predictor, bf16 three-way", CP_VARIANT, record, notes="teacher-forced")


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
    got = {k: v[0] for k, v in rec.records.items()}
    got[f"{D}:out"] = wav
    st_cfg = json.loads((ckpt / "speech_tokenizer" / "config.json").read_text())
    return got, ref16, truth, st_cfg


@pytest.fixture(scope="module")
def decoder_bf16(checkpoint_dir, reference, device):
    return decoder_run(checkpoint_dir, reference, device)


@pytest.mark.parametrize("row_name", DECODER_ROW_NAMES)
def test_codec_decoder(row_name: str, decoder_bf16, record):
    got, ref16, truth, st_cfg = decoder_bf16
    row = {r.name: r for r in decoder_rows(st_cfg)}[row_name]
    _judge(row, got, ref16, truth, "Codec decoder, bf16 three-way", CODEC_VARIANT, record,
           notes="end to end from the codes")


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
    got = {k: v[0] for k, v in rec.records.items()}
    for i, (c, n) in enumerate(zip(out.codes, out.lengths.tolist())):
        got[f"speech_tokenizer:codes_{i}"] = c[:, :n].transpose(0, 1)
    return got, ref16, truth


@pytest.fixture(scope="module")
def encoder_bf16(checkpoint_dir, reference, device):
    return encoder_run(checkpoint_dir, reference, device)


def encoder_rows(ref) -> list[Row]:
    return [
        Row("Mimi SEANet", _taps(ref, f"{ENC}.encoder.layers.*:out", f"{ENC}.encoder:out"), "three_way"),
        Row("Mimi transformer", _taps(ref, f"{ENC}.encoder_transformer.layers.*"), "three_way"),
        Row("Mimi quantizer inputs", _taps(ref, f"{ENC}.downsample:out", f"{ENC}.quantizer.*.input_proj:out"),
            "three_way"),
    ]


@pytest.mark.parametrize("row_name", ["Mimi SEANet", "Mimi transformer", "Mimi quantizer inputs"])
def test_codec_encoder(row_name: str, encoder_bf16, record):
    got, ref16, truth = encoder_bf16
    row = {r.name: r for r in encoder_rows(ref16)}[row_name]
    _judge(row, got, ref16, truth, "Codec encoder, bf16 three-way", CODEC_VARIANT, record, notes="sdpa, from audio")


def test_codec_encoder_codes(encoder_bf16, record):
    """Codes: exact against upstream bf16 (the truth's codes are another question: bf16 moves latents across
    quantizer decision boundaries on both sides alike)."""
    from reports.compare import compare_exact

    got, ref16, _ = encoder_bf16
    results = [compare_exact(f"{ENC}.quantizer:codes", got[f"{ENC}.quantizer:codes"],
                             ref16.tap(f"{ENC}.quantizer:codes"), axes=("batch", "codebook", "frame"))]
    for i in range(2):
        n = f"speech_tokenizer:codes_{i}"
        results.append(compare_exact(n, got[n], ref16.tap(n), axes=("frame", "codebook")))
    for r in results:
        record(r, row="Mimi codes (bf16 vs upstream bf16)", component="Codec encoder, bf16 three-way",
               variant=CODEC_VARIANT, notes="exact")
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
    got = {k: v[0] for k, v in rec.records.items()}
    with torch.no_grad():
        got["speaker_encoder:xvector"] = extract_xvector(se, ref16.tap("speaker_encoder:wav24k").numpy(), 24000)
    return got, ref16, truth


@pytest.fixture(scope="module")
def speaker_bf16(checkpoint_dir, reference, device):
    return speaker_run(checkpoint_dir, reference, device)


def speaker_rows(ref) -> list[Row]:
    return [
        Row("Speaker encoder blocks", _taps(ref, "speaker_encoder.*:out"), "three_way"),
        Row("x-vector", ("speaker_encoder:out", "speaker_encoder:xvector"), "three_way"),
    ]


@pytest.mark.parametrize("row_name", ["Speaker encoder blocks", "x-vector"])
def test_speaker_encoder(row_name: str, speaker_bf16, record):
    got, ref16, truth = speaker_bf16
    row = {r.name: r for r in speaker_rows(ref16)}[row_name]
    _judge(row, got, ref16, truth, "Speaker encoder, bf16 three-way", "base", record)


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
    if component == "Talker":
        got, ref16, _, n = request.getfixturevalue("talker_bf16")
        taps = [t for r in LAYER0_ROWS for t in r.taps] + [f"talker.model.layers.{n - 1}:out", "talker.model.norm:out"]
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
