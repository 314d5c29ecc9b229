"""The fp64 tier: every component run in float64 on CPU on both sides, judged near fp64 rounding.

In fp32 a formula difference the size of an eps typo (1e-5 where upstream has 1e-6) can hide inside a block-tier
row's tolerance; in float64 the rounding noise is ~1e-16 per op, so it stands orders of magnitude above it. The
references are upstream run after ``.to(float64)`` (``reference(..., dtype="float64")``; the speech tokenizer too,
``reference_export.export.codec_dtype_for``); ours are loaded in float64. Tiny preset, one variant per component
(``base``: it has the speaker encoder and the Linear MTP projection), every tap judged at tier ``fp64``.

Upstream's own fp32 islands stay fp32 in its fp64 run, and ``impl`` mirrors each one, so they are common to both
sides rather than noise between them: RMSNorm statistics (talker, code predictor, codec pre-transformer), RoPE
angles (``inv_freq`` kept fp32, angles in fp32), the eager softmax (talker, code predictor, codec pre-transformer),
the mel front end (built from the fp32 numpy clip before the cast to the encoder's dtype), and Mimi's codebook
distances (``cdist`` in fp32; codes only). Measured on tiny: every tap of every row below is bit-identical
(max_abs 0) but the codec pre-transformer's input projection and the two layers after it, 1.8e-15 (max_rel
1.4e-13, a few fp64 ulp of one matmul); the tier (rtol 1e-9, atol 1e-10) sits ~5 orders of magnitude above that
and ~5 below the eps typo of the mutation below (8.3e-6), so no row needs an override.

Rows (component "<name>, fp64"):

- Talker: the layer-0 rows of ``test_talker_layer.py`` on ``talker_stack``, the last layer (every tap) and the
  final norm; the decoder layers stream from the file one at a time (``stream_layers``), so the float64 stack
  fits the released-size memory budget;
- Code predictor: teacher-forced (``lm_cp_teacher``): MTP projection, every layer, final norm, 15 heads, logits;
- Codec decoder: the rows of ``test_codec_decoder.py`` up to the waveform (``helpers_codec.row_results``; not the
  chunked ``decode()`` row, whose API returns float32 numpy by design);
- Codec encoder (Mimi, sdpa): every SEANet layer fed upstream's input and the conv stack from the audio; every
  transformer layer fed upstream's input and the stack from the audio; the quantizer inputs and the codes (exact);
- Speaker encoder: the mel, every block fed upstream's input, the network from upstream's mel, the x-vector from
  the stored 16 kHz clip.

Every float tap an fp64 row compares is float64 on both sides, asserted before it is compared
(``helpers.check_fp64``, through ``helpers.compare_tap``: the one place every row here and
``helpers_codec.row_results`` compares at this tier); ``compare`` measures in float64 whatever it is given, so a side
left in float32 would otherwise be judged on fp32 values. The mel is fp32 on both sides by design (see its row) and
is compared where it enters the encoder, cast to the encoder's float64 as both sides do. Every call of a recorded
tap is compared (``helpers.compare_calls``), not only the first.

Mutation self-test: the codec decoder's ConvNeXt LayerNorm with eps 1e-5 instead of upstream's 1e-6 leaves the
fp32 "ConvNeXtBlock" row green (block tier) and must turn its fp64 row red.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import impl.mel
from impl.audio import load_reference_audio
from impl.codec.conv import ConvNeXtBlock
from impl.config import Qwen3TTSConfig
from impl.loading import build_on_meta, finish_loaded, load_into, read_state_dict
from impl.speaker_encoder import SpeakerEncoder, extract_xvector
from impl.talker import Talker
from impl.taps import recording, set_tap_paths
from reference_export.cases.speaker import block_names
from reference_export.cases.talker import layer_taps
from reports.compare import CompareResult, compare, compare_exact

from .helpers import (
    LAYER0_ROWS,
    Calls,
    check_fp64,
    compare_calls,
    compare_tap,
    release_models,
    run_stack,
    teacher_run,
)
from .helpers_codec import (
    ENC,
    LAYER_POINTS,
    build_encoder,
    codes_results,
    end_to_end_taps,
    load_codec,
    row_results,
    rows,
)
from .rows import Row, assert_row, missing

VARIANT = "base"
F64 = torch.float64
DT = "float64"  # the reference's dtype (upstream after .to(float64); the codec too)


def judge(name: str, got: torch.Tensor | None, ref, tier: str = "fp64") -> CompareResult:
    """Tap ``name`` of ours (a value computed here, not recorded) vs the fp64 reference, never rounded to fp32 on
    the way (``compare`` measures in float64; ``rows.compare_row`` casts to fp32 for the fp32 tiers, so it is not
    used here), float64 on both sides asserted first (``compare_tap``)."""
    if got is None:
        return missing(name, "impl", tier)
    if not ref.has(name):
        return missing(name, f"the reference {ref.path.name}", tier)
    return compare_tap(name, got, ref.tap(name), tier)


def judge_calls(name: str, got: Calls, ref, tier: str = "fp64", label: str | None = None) -> list[CompareResult]:
    """Every call ``impl`` recorded of tap ``name`` vs every call of the reference, paired by index, at ``tier``
    (float64 on both sides asserted per call)."""
    return compare_calls(name, got, ref, tier, label=label)


class RowsInF64(torch.nn.Embedding):
    """The text embedding table kept in the file's float32 (mapped from it, as the engine maps its tables), each
    looked-up row cast to float64. Exact: upstream casts the table to float64 and looks up, the same values; the
    151k-row table at 0.6B dimensions is 1.2 GB in float32 and would be 2.5 GB more in float64."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(F64)


def build_talker64(ckpt) -> Talker:
    """The whole talker (text side, decoder layers, code predictor) in float64 from the checkpoint folder, built on
    meta so the file's tensors become the parameters (the weights once in memory), the text table as ``RowsInF64``.
    The decoder layers stay on meta and stream (:func:`stream_layers`)."""
    cfg = Qwen3TTSConfig.from_file(ckpt / "config.json")
    release_models()
    talker = build_on_meta(lambda: Talker(cfg.talker_config))
    table = talker.model.text_embedding
    with torch.device("meta"):
        talker.model.text_embedding = RowsInF64(table.num_embeddings, table.embedding_dim)
    layers, talker.model.layers = talker.model.layers, torch.nn.ModuleList()  # loaded one at a time, when run
    keys = talker.state_dict().keys()
    # One read per sub-tree, in float64, except the text table, read as stored (mapped).
    groups = sorted({".".join(k.split(".")[:2 if k.startswith("model.") else 1]) + "." for k in keys}
                    - {"model.text_embedding."})
    state = {}
    for g in groups:
        state.update({g + k: t for k, t in read_state_dict(ckpt, prefix="talker." + g, dtype=F64).items()})
    state.update({"model.text_embedding." + k: t
                  for k, t in read_state_dict(ckpt, prefix="talker.model.text_embedding.").items()})
    where = str(ckpt / "model.safetensors")
    load_into(talker, state, where, prefix="talker.")
    del state
    finish_loaded(talker, "cpu", where)
    talker.model.layers = layers.eval()
    stream_layers(talker, ckpt)
    return talker


def stream_layers(talker: Talker, ckpt) -> None:
    """The float64 talker's decoder layers live on ``meta`` (shapes only): each is read from the file in float64 just
    before it runs (a forward pre-hook) and dropped back to ``meta`` after (a forward hook), so a run of the stack
    holds one layer, not all (in float64 the 28 layers are 3.5 GB at 0.6B dimensions, 11 GB at 1.7B). The values
    are the same as a resident layer's: the same file tensors, cast the same way."""
    where = str(ckpt / "model.safetensors")

    def loader(i: int):
        prefix = f"talker.model.layers.{i}."

        def load(layer, args):
            load_into(layer, read_state_dict(ckpt, prefix=prefix, dtype=F64), where, prefix=prefix)
        return load

    def drop(layer, args, out):
        layer.to("meta")

    for i, layer in enumerate(talker.model.layers):
        layer.register_forward_pre_hook(loader(i))
        layer.register_forward_hook(drop)


# ------------------------------------------------------------------------------------------ talker


def _talker_rows(n_layers: int) -> list[Row]:
    """Layer 0's rows, every tap of the last layer, the final norm (the stack's end), all at ``fp64``."""
    return [Row(r.name, r.taps, "fp64") for r in LAYER0_ROWS] + [
        Row("Last layer", tuple(layer_taps("talker.model", n_layers - 1)), "fp64"),
        Row("Final norm", ("talker.model.norm:out",), "fp64"),
    ]


TALKER_ROW_NAMES = [r.name for r in _talker_rows(1)]


class TestTalker:
    """The talker and its code predictor: the float64 talker (its decoder layers streamed) lives for this class only
    (class-scoped fixtures end with the class's last test), so it is never in memory beside the float64 codec or
    encoders of the classes below."""

    @pytest.fixture(scope="class")
    def talker64(self, checkpoint_dir, reference):
        for case in ("talker_stack", "lm_cp_teacher"):  # captured (in a child, at released sizes) before ours loads
            reference(case, VARIANT, dtype=DT, device="cpu")
        return build_talker64(checkpoint_dir(VARIANT))

    @pytest.fixture(scope="class")
    def talker_run(self, talker64, reference):
        ref = reference("talker_stack", VARIANT, dtype=DT, device="cpu")
        got = run_stack(talker64, ref, "cpu", "eager")
        assert all(p.is_meta for p in talker64.model.layers.parameters()), "a streamed layer stayed in memory"
        return got, ref

    @pytest.mark.parametrize("row_name", TALKER_ROW_NAMES)
    def test_talker(self, row_name, talker_run, talker64, record):
        got, ref = talker_run
        n = len(talker64.model.layers)
        row = {r.name: r for r in _talker_rows(n)}[row_name]
        results = [r for t in row.taps for r in judge_calls(t, got, ref, row.tier_of(t))]
        for r in results:
            record(r, row=f"{row.name} (fp64)", component="Talker, fp64", variant=VARIANT,
                   notes=f"layer {n - 1} of {n}" if row.name == "Last layer" else "")
        assert_row(row.name, results)

    def test_code_predictor(self, talker64, reference, record):
        ref = reference("lm_cp_teacher", VARIANT, dtype=DT, device="cpu")
        got = teacher_run(SimpleNamespace(talker=talker64, device="cpu", attn="eager"), ref, F64)
        results = [r for n in ref.meta["expected_taps"] for r in judge_calls(n, got, ref)]
        assert len(results) >= 10
        for r in results:
            record(r, row="Code predictor (teacher-forced, fp64)", component="Code predictor, fp64", variant=VARIANT)
        assert_row("Code predictor (teacher-forced, fp64)", results)


# ------------------------------------------------------------------------------------------ codec decoder

DECODER_ROWS = [r.name for r in rows({"decoder_config": {"upsample_rates": [8, 5, 4, 3]}}) if r.driver != "chunked"]


class TestCodecDecoder:
    """The codec decoder in float64 (class-scoped, freed before the encoder loads)."""

    @pytest.fixture(scope="class")
    def decoder_env(self, checkpoint_dir, reference):
        ckpt = checkpoint_dir(VARIANT)
        st_cfg = json.loads((ckpt / "speech_tokenizer" / "config.json").read_text())
        ref = reference("codec_decoder", VARIANT, dtype=DT, device="cpu")  # captured before ours loads
        return load_codec(ckpt, "cpu", "eager", F64), ref, \
            {r.name: Row(r.name, r.taps, "fp64", driver=r.driver, modules=r.modules) for r in rows(st_cfg)}

    @pytest.mark.parametrize("row_name", DECODER_ROWS)
    def test_codec_decoder(self, row_name, decoder_env, record):
        codec, ref, by_name = decoder_env
        results = row_results(by_name[row_name], codec, ref, "eager")
        for r in results:
            record(r, row=f"{row_name} (fp64)", component="Codec decoder, fp64", variant=VARIANT)
        assert_row(row_name, results)



# ------------------------------------------------------------------------------------------ codec encoder


def _seanet(enc, ref, got) -> list[CompareResult]:
    out = []
    x = ref.input("audio").to(F64)[:, None]
    with torch.no_grad():
        for i, layer in enumerate(enc.encoder.layers):
            name = f"{ENC}.encoder.layers.{i}:out"
            out.append(judge(name, layer(x), ref))
            x = ref.tap(name)  # the next layer starts from upstream's output
    name = f"{ENC}.encoder:out"
    out.extend(judge_calls(name, got, ref, label=name + " (stack, from audio)"))
    return out


def _transformer(enc, ref, got) -> list[CompareResult]:
    tr = enc.encoder_transformer
    x = ref.tap(f"{ENC}.encoder:out").transpose(1, 2)  # (B, T25, C)
    T = x.shape[1]
    cos, sin = tr.rotary_emb(x, torch.arange(T)[None])
    mask = tr.attention_mask(T, x.dtype, x.device, enc.resolved_window_mode())  # enc was built under sdpa
    out = []
    for i, layer in enumerate(tr.layers):
        base = f"{ENC}.encoder_transformer.layers.{i}"
        with recording(enc, ENC) as rec, torch.no_grad():
            layer(x, cos, sin, mask)
        for p in LAYER_POINTS:
            name = f"{base}{p}" if p.startswith(":") else f"{base}.{p}"
            out.extend(judge_calls(name, Calls(rec.records), ref))
        x = ref.tap(f"{base}:out")
    last = f"{ENC}.encoder_transformer.layers.{len(tr.layers) - 1}:out"
    out.extend(judge_calls(last, got, ref, label=last + " (stack, from audio)"))
    return out


def _codes(enc, ref, got, items) -> list[CompareResult]:
    return codes_results(ref, got, items, tier="fp64")


ENCODER_ROWS = {"Mimi SEANet": lambda e, r, g, i: _seanet(e, r, g),
                "Mimi transformer": lambda e, r, g, i: _transformer(e, r, g), "Mimi codes": _codes}


class TestCodecEncoder:
    """Mimi in float64 (class-scoped)."""

    @pytest.fixture(scope="class")
    def encoder_run(self, checkpoint_dir, reference):
        """Mimi in float64 under sdpa on the reference's audio (cast to the model dtype, as upstream's wrapper feeds
        its tokenizer): (encoder, reference, {tap: tensor}, per-item trimmed codes)."""
        ref = reference("codec_encoder", VARIANT, dtype=DT, device="cpu")
        enc = build_encoder(checkpoint_dir(VARIANT), "cpu", F64, "sdpa")
        with recording(enc, ENC, include=end_to_end_taps(enc)) as rec, torch.no_grad():
            out = enc(ref.input("audio").to(F64), ref.input("padding_mask"))
        items = [c[:, :n].transpose(0, 1) for c, n in zip(out.codes, out.lengths.tolist())]
        return enc, ref, Calls(rec.records), items

    @pytest.mark.parametrize("row_name", list(ENCODER_ROWS))
    def test_codec_encoder(self, row_name, encoder_run, record):
        results = ENCODER_ROWS[row_name](*encoder_run)
        for r in results:
            record(r, row=f"{row_name} (fp64)", component="Codec encoder, fp64", variant=VARIANT, notes="sdpa")
        assert_row(row_name, results)



# ------------------------------------------------------------------------------------------ speaker encoder


def build_speaker_encoder64(ckpt) -> SpeakerEncoder:
    cfg = Qwen3TTSConfig.from_file(ckpt / "config.json")
    se = SpeakerEncoder(cfg.speaker_encoder_config)
    load_into(se, read_state_dict(ckpt, "speaker_encoder."), str(ckpt / "model.safetensors"), "speaker_encoder.")
    set_tap_paths(se, "speaker_encoder")
    return se.to(F64).eval()


def _mel(se, ref, cfg) -> list[CompareResult]:
    got = impl.mel.mel_spectrogram(ref.tap("speaker_encoder:wav24k")[None]).transpose(1, 2)  # fp32, as upstream
    # The tap is the encoder's input: both sides build the mel in fp32 (upstream's fp32 island) and cast it to the
    # encoder's dtype before the network (impl.speaker_encoder.extract_xvector does the same), so ours is taken at
    # that point too: our fp32 mel cast to float64, against upstream's float64 input.
    return [compare_tap("speaker_encoder:in (mel)", got.to(F64), ref.tap("speaker_encoder:in"), "fp64")]


def _blocks(se, ref, cfg) -> list[CompareResult]:
    out = []
    with torch.no_grad():
        for name in block_names(cfg):
            mod = se.get_submodule(name.removeprefix("speaker_encoder."))
            out.append(judge(f"{name}:out", mod(ref.tap(f"{name}:in")), ref))
        y = se(ref.tap("speaker_encoder:in")).embedding
    out.append(compare_tap("speaker_encoder:out (stack, from upstream's mel)", y, ref.tap("speaker_encoder:out"),
                           "fp64"))
    return out


def _xvector(se, ref, cfg) -> list[CompareResult]:
    wav24 = load_reference_audio((ref.input("wav").numpy(), int(ref.input("sample_rate"))))
    # The 24 kHz clip is float32 numpy on both sides (the audio intake, before any model dtype): judged bit for bit
    # (exact tier), not at fp64; the x-vector after it is float64 on both sides.
    return [compare_exact("speaker_encoder:wav24k", torch.from_numpy(wav24), ref.tap("speaker_encoder:wav24k"),
                          axes=("sample",)),
            judge("speaker_encoder:xvector", extract_xvector(se, wav24, 24000), ref)]


SPEAKER_ROWS = {"Mel spectrogram": (_mel, "mel in fp32 on both sides: upstream builds it from the fp32 clip "
                                          "before casting to the encoder's dtype"),
                "Speaker encoder blocks": (_blocks, ""), "x-vector": (_xvector, "16 kHz clip -> soxr HQ -> mel "
                                                                             "(fp32) -> ECAPA-TDNN (fp64)")}


class TestSpeakerEncoder:
    """The speaker encoder in float64 (class-scoped)."""

    @pytest.fixture(scope="class")
    def speaker64(self, checkpoint_dir, reference):
        ckpt = checkpoint_dir(VARIANT)
        ref = reference("speaker_xvector", VARIANT, dtype=DT, device="cpu")  # captured before ours loads
        return build_speaker_encoder64(ckpt), ref, json.loads((ckpt / "config.json").read_text())

    @pytest.mark.parametrize("row_name", list(SPEAKER_ROWS))
    def test_speaker_encoder(self, row_name, speaker64, record):
        fn, notes = SPEAKER_ROWS[row_name]
        results = fn(*speaker64)
        for r in results:
            record(r, row=f"{row_name} (fp64)", component="Speaker encoder, fp64", variant=VARIANT, notes=notes)
        assert_row(row_name, results)



# ------------------------------------------------------------------------------------------ mutation self-test


def _convnext_row(codec, ref, st_cfg: dict, tier: str) -> list[CompareResult]:
    row = {r.name: r for r in rows(st_cfg)}["ConvNeXtBlock"]
    return row_results(Row(row.name, (), tier, driver=row.driver, modules=row.modules), codec, ref, "eager")


@pytest.mark.mutation
def test_mutation_layernorm_eps_hidden_in_fp32(checkpoint_dir, reference, record):
    """The codec decoder's ConvNeXt LayerNorm with eps 1e-5 where upstream has 1e-6: the fp32 "ConvNeXtBlock" row
    (block tier) stays green -- fp32 rounding allowance hides it -- and the same row in fp64 must turn red.
    Mutated on freshly loaded models only (instance attribute), so nothing leaks into other tests."""
    ckpt = checkpoint_dir(VARIANT)
    st_cfg = json.loads((ckpt / "speech_tokenizer" / "config.json").read_text())
    results = {}
    for dt, tier in (("float32", "block"), (DT, "fp64")):
        codec = load_codec(ckpt, "cpu", "eager", getattr(torch, dt))
        ref = reference("codec_decoder", VARIANT, dtype=dt, device="cpu")
        assert all(_convnext_row(codec, ref, st_cfg, tier)), f"ConvNeXtBlock ({dt}) must be green before mutating"
        blocks = [m for m in codec.decoder.modules() if isinstance(m, ConvNeXtBlock)]
        assert blocks and all(b.norm.eps == 1e-6 for b in blocks)
        for b in blocks:
            b.norm.eps = 1e-5  # the typo
        results[dt] = _convnext_row(codec, ref, st_cfg, tier)
    fp32, fp64 = results["float32"], results[DT]
    worst32 = max(fp32, key=lambda r: r.max_abs)
    for r in fp64:
        record(r, row="mutation convnext-layernorm-eps-1e-5 → ConvNeXtBlock (fp64)", component="Mutation self-test",
               variant=VARIANT, expect_fail=True,
               notes=f"the same mutation leaves the fp32 block-tier row green: max_abs {worst32.max_abs:.3g} "
                     f"(needs atol {worst32.needed_atol:.3g} at rtol {worst32.rtol:g}; block tier atol {worst32.atol:g})")
    assert all(fp32), "the eps typo turned the fp32 row red: this test needs a mutation fp32 cannot see: " + \
        " | ".join(r.message for r in fp32 if not r)
    assert not any(fp64), "mutation convnext-layernorm-eps left the fp64 ConvNeXtBlock row green: " \
        "the fp64 tier cannot see an eps typo"


# ------------------------------------------------------------------------------------------ the float64 check


def test_fp64_check_refuses_a_float32_side():
    """``check_fp64`` (run by ``compare_tap`` before every fp64 comparison) fails, naming the tap and both dtypes,
    when either side is float32, although ``compare`` alone would pass these equal values."""
    x = torch.arange(-4, 4, dtype=F64) / 4  # exact in float32 too: the values agree whatever the dtype
    check_fp64("t:out", x, x.clone())  # both float64: no complaint
    assert compare_tap("t:out", x, x.clone(), "fp64")
    for ours, theirs in ((x.float(), x), (x, x.float())):
        assert compare("t:out", ours, theirs, "fp64"), "compare alone passes a float32 side: the check refuses it"
        with pytest.raises(AssertionError, match=rf"t:out: an fp64 row compares float64 on both sides, got ours "
                                                 rf"{ours.dtype}, upstream {theirs.dtype}"):
            compare_tap("t:out", ours, theirs, "fp64")
    assert compare_tap("t:out", x.float(), x.float(), "block"), "the fp32 tiers take float32 as before"
    ids = torch.arange(4)
    assert compare_tap("t:codes", ids, ids.clone(), "fp64"), "integer taps are judged exactly, not dtype-checked"


@pytest.mark.parametrize("side", ["ours", "upstream"])
def test_fp64_row_refuses_a_float32_side(side, checkpoint_dir, reference):
    """A real fp64 row (the codec decoder's "Quantizer decode", through ``helpers_codec.row_results``) with one
    side in float32 -- our codec loaded in float32, or the reference captured in float32 -- raises the check's
    assertion instead of comparing."""
    ckpt = checkpoint_dir(VARIANT)
    st_cfg = json.loads((ckpt / "speech_tokenizer" / "config.json").read_text())
    row = {r.name: r for r in rows(st_cfg)}["Quantizer decode"]
    row = Row(row.name, (), "fp64", driver=row.driver)
    ours_dt, ref_dt = (torch.float32, DT) if side == "ours" else (F64, "float32")
    codec = load_codec(ckpt, "cpu", "eager", ours_dt)
    ref = reference("codec_decoder", VARIANT, dtype=ref_dt, device="cpu")
    want = "ours torch.float32, upstream torch.float64" if side == "ours" else \
        "ours torch.float64, upstream torch.float32"
    with pytest.raises(AssertionError, match=r"speech_tokenizer\.decoder\.quantizer\..*: an fp64 row compares "
                                             rf"float64 on both sides, got {want}"):
        row_results(row, codec, ref, "eager")
