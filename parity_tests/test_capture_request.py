"""``capture --request``: any request captured from upstream end to end, our engine dumped the same way, compared.

- A request capture equals the fixed-case capture it overlaps (``lm_prefill``: same batch, same settings): same
  ids, same taps (values equal exactly), same codes.
- Ours vs upstream (``capture --impl`` vs ``capture``, each one request) is green under ``reports compare`` for every
  mode of every variant (custom_voice, voice_design with a padded batch of two, base ICL, base x-vector-only), and a
  planted bug (RoPE's rotate_half with the other sign) is named as the first divergence.
- Streaming: the file holds every step's taps as chunked gzip datasets, the recorder buffers nothing, and an
  interrupted capture leaves no file; ``--steps`` / ``--taps`` keep what they name and the file lists the rest.
- Open formats: ``convert`` to npz / safetensors with ``tap@step_N`` keys, which ``reports compare`` reads back.
- Bad input through ``python -m reference_export capture``: one line naming the argument, exit 2, nothing written.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch

from reference_export.__main__ import main as export_main
from reference_export.cases.lm import GEN_INCLUDE, MODES, TEXTS
from reference_export.h5io import RefFile
from reference_export.request import PadZeroer, Request, capture_request
from reports.port_compare import check_port, main_compare

from .helpers_bad_input import snapshot

FRAMES = 3
_MODELS: dict[tuple, object] = {}


def _model(ckpt, impl: bool, attn: str = "sdpa"):
    """One loaded model per (checkpoint, side, attention) for this module: loading dominates a tiny capture."""
    key = (str(ckpt), impl, attn)
    if key not in _MODELS:
        if impl:
            from impl import Qwen3TTS

            _MODELS[key] = Qwen3TTS.from_pretrained(ckpt, attn=attn)
        else:
            from reference_export.upstream import load_upstream

            _MODELS[key] = load_upstream(ckpt, attn=attn)
    return _MODELS[key]


def _capture(req: Request, ckpt, out, impl: bool = False, attn: str = "sdpa", **kw):
    return capture_request(req, ckpt, out, impl=impl, attn=attn, progress=False, model=_model(ckpt, impl, attn),
                           **kw)


@pytest.fixture(scope="module")
def ref_wav(tmp_path_factory):
    """A 24 kHz reference clip (noise under a slow envelope, as the fixed base cases use)."""
    g = np.random.default_rng(0)
    n = 1920 * 6 + 333
    env = np.abs(np.sin(np.linspace(0, 3.14, n))) + 0.2
    p = tmp_path_factory.mktemp("ref") / "ref.wav"
    sf.write(p, (g.standard_normal(n) * 0.1 * env).astype(np.float32), 24000, subtype="FLOAT")
    return str(p)


def _mode_requests(ref_wav):
    return {
        "custom_voice": ("custom_voice", Request(text=["Hello there."], speaker="ryan", language="english",
                                                 max_new_frames=FRAMES)),
        "voice_design": ("voice_design", Request(text=["Hi there, friend.", "Second one, a little longer."],
                                                 instruct="A calm deep voice.", max_new_frames=FRAMES)),
        "base-icl": ("base", Request(text=["Hello clone."], ref_audio=ref_wav, ref_text="Reference words.",
                                     max_new_frames=FRAMES)),
        "base-xvec": ("base", Request(text=["Hello clone."], ref_audio=ref_wav, x_vector_only=True,
                                      max_new_frames=FRAMES)),
    }


@pytest.fixture(scope="module")
def upstream_cv(checkpoint_dir, tmp_path_factory, ref_wav):
    ckpt = checkpoint_dir("custom_voice")
    out = tmp_path_factory.mktemp("cv") / "upstream.h5"
    _capture(_mode_requests(ref_wav)["custom_voice"][1], ckpt, out)
    return ckpt, out


def test_release_talker_frees_it_before_the_decode_and_changes_nothing_written(upstream_cv, ref_wav, tmp_path):
    """``release_talker`` (what the CLI does on its last request, for the released-size memory budget): the talker's
    weights are gone once ``generate`` returned, and the file is the same, dataset for dataset, as without it."""
    import h5py

    from reference_export.upstream import load_upstream

    ckpt, kept = upstream_cv
    up = load_upstream(ckpt, attn="sdpa")  # its own copy (as `_model` loads it): the shared one must stay usable
    out = tmp_path / "released.h5"
    seen = {}

    def decode_pre(module, args):  # the codec decode runs after the release
        seen["talker_numel"] = sum(p.numel() for p in up.model.talker.parameters())

    h = up.speech_tokenizer.decoder.register_forward_pre_hook(decode_pre)
    try:
        capture_request(_mode_requests(ref_wav)["custom_voice"][1], ckpt, out, progress=False, model=up,
                        release_talker=True)
    finally:
        h.remove()
    assert seen["talker_numel"] == 0

    def datasets(path):
        got = {}
        with h5py.File(path) as f:
            f["taps"].visititems(lambda k, v: got.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        return got

    a, b = datasets(kept), datasets(out)
    assert sorted(set(a) ^ set(b)) == [] and len(a) > 100
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []


# ------------------------------------------------------------------------------ request == fixed case


def test_request_equals_fixed_case_where_they_overlap(checkpoint_dir, reference, tmp_path):
    """``lm_prefill`` (batch of three, per-item speakers/languages/instructs, non-streaming text, 2 tokens) is a
    request: the same ids, every tap the case holds equal exactly (padded prefill positions aside, which the request
    capture zeroes), the same codes."""
    case = reference("lm_prefill", "custom_voice")
    _, s = MODES["custom_voice"]
    req = Request(text=TEXTS, speaker=s["speakers"], language=s["languages"], instruct=s["instructs"],
                  non_streaming_text=True, max_new_frames=int(case.case["max_new_tokens"]) - 1)
    ckpt = checkpoint_dir("custom_voice")
    out = _capture(req, ckpt, tmp_path / "req.h5", attn=case.meta["attn"], taps=list(GEN_INCLUDE), all_taps=True)
    with RefFile(out) as r:
        for i in range(len(TEXTS)):
            assert torch.equal(r.input(f"text_ids_{i}"), case.input(f"text_ids_{i}")), f"text_ids_{i}"
            if f"instruct_ids_{i}" in case.inputs():
                assert torch.equal(r.input(f"instruct_ids_{i}"), case.input(f"instruct_ids_{i}"))
        names = case.names()
        assert names and not [n for n in names if not r.has(n)], "taps of the case the request lacks"
        pads = PadZeroer(type("R", (), {"in_loop": True, "step": 0})())
        pads.observe("talker:prompt_mask", case.tap("talker:prompt_mask"))
        compared = 0
        for n in names:
            want, got = case.tap_steps(n), r.tap_steps(n)
            assert len(want) == len(got), f"{n}: {len(got)} calls, the case recorded {len(want)}"
            for k, (a, b) in enumerate(zip(got, want)):
                b = pads(n, b) if case.tap_step_numbers(n)[k] == 0 else b
                assert a.dtype == b.dtype and torch.equal(a, b), f"{n} call {k} differs"
                compared += 1
        assert compared > 20 and "generate:codes" in names
        assert r.meta["producer"].startswith("upstream") and r.case["request"]["speaker"] == s["speakers"]


# ------------------------------------------------------------------------------ ours vs upstream


# custom_voice is judged on every tap; the other modes, to keep the suite quick, on the taps of what they add (the
# prompt, the speaker encoder, the codec encoder) plus one layer of each transformer and every output.
MODE_TAPS = ["talker.model.layers.0*", "talker.model.norm:*", "talker:*", "talker.code_predictor.model.layers.0*",
             "talker.code_predictor:*", "generate:*", "speech_tokenizer.decoder.pre_transformer.layers.0*",
             "speech_tokenizer.decoder:*"]
BASE_TAPS = ["speaker_encoder*", "speech_tokenizer.encoder.encoder_transformer.layers.0*",
             "speech_tokenizer.encoder.quantizer*"]


@pytest.mark.parametrize("mode", ["custom_voice", "voice_design", "base-icl", "base-xvec"])
def test_ours_vs_upstream_request_is_green(mode, checkpoint_dir, tmp_path, ref_wav, upstream_cv):
    variant, req = _mode_requests(ref_wav)[mode]
    ckpt = checkpoint_dir(variant)
    taps = None if mode == "custom_voice" else MODE_TAPS + (BASE_TAPS if variant == "base" else [])
    up = upstream_cv[1] if mode == "custom_voice" else _capture(req, ckpt, tmp_path / "upstream.h5", taps=taps)
    ours = _capture(req, ckpt, tmp_path / "ours.h5", impl=True, taps=taps)
    c = check_port(ours, up)
    first = c.first_divergence
    assert c.ok, (first.result.message if first else f"missing {c.missing[:3]} problems {c.problems[:3]}")
    names = {t.name for t in c.checks}
    for must in ("generate:codes", "generate:wav", "talker:prompt_embeds", "talker:logits",
                 "talker.code_predictor:logits_14", "talker.model.layers.0.self_attn:q_rope"):
        assert must in names, must
    if variant == "base":
        assert "generate:xvector" in names and ("generate:ref_codes" in names) == (mode == "base-icl")
        assert any(n.startswith("speaker_encoder.") for n in names)
        assert any(n.startswith("speech_tokenizer.encoder.") for n in names)
    with RefFile(up) as r:
        assert len(r.meta["stop_reason"]) == len(req.text)
        assert len(r.tap_steps("talker.model.norm:out")) == r.meta["decode_steps"] >= 2  # one per decode step


def test_seeded_sampled_request_matches(upstream_cv, tmp_path):
    """``--seed``: a sampled run (non-default temperature); our seeded generator draws upstream's stream, so the
    codes and the logits of every decision agree."""
    ckpt, _ = upstream_cv
    req = Request(text=["Hello sampled."], speaker="ryan", seed=7, temperature=1.2, max_new_frames=FRAMES + 2)
    taps = ["generate:*", "talker:*", "talker.code_predictor:*"]
    up = _capture(req, ckpt, tmp_path / "upstream.h5", taps=taps)
    ours = _capture(req, ckpt, tmp_path / "ours.h5", impl=True, taps=taps)
    c = check_port(ours, up)
    assert c.ok and "generate:codes" in {t.name for t in c.checks}, c.first_divergence
    with RefFile(up) as r:
        assert r.case["generate_kwargs"]["do_sample"] and r.case["generate_kwargs"]["temperature"] == 1.2
        assert r.case["greedy"] is False and r.meta["seed"] == 7


def test_planted_bug_is_the_first_divergence(upstream_cv, tmp_path, monkeypatch):
    """One wrong constant in our engine (layer 1's post-attention RMSNorm eps 1e-2 instead of the checkpoint's
    1e-6): the compare names that norm's output at the prefill as the first divergence, everything before it green."""
    ckpt, up = upstream_cv
    tts = _model(ckpt, True)
    monkeypatch.setattr(tts.talker.model.layers[1].post_attention_layernorm, "eps", 1e-2)
    ours = _capture(Request(text=["Hello there."], speaker="ryan", language="english", max_new_frames=FRAMES),
                    ckpt, tmp_path / "ours.h5", impl=True)
    c = check_port(ours, up)
    first = c.first_divergence
    assert first is not None and first.label == "talker.model.layers.1.post_attention_layernorm:out@step_0", \
        first and first.result.message
    assert all(t.result for t in c.checks if t.order < first.order)  # green up to the bug
    assert sum(t.order < first.order for t in c.checks) > 20  # … and that is many taps (prompt, layer 0)


# ------------------------------------------------------------------------------ streaming, filters, formats


def test_capture_streams_every_step_and_says_what_it_left_out(upstream_cv, tmp_path):
    ckpt, up = upstream_cv
    with RefFile(up) as r, h5py.File(up) as f:
        steps = r.tap_step_numbers("talker.model.layers.0:out")
        assert steps == list(range(FRAMES + 1))  # every decode step, each stamped
        wav = f["taps/speech_tokenizer.decoder/out"]  # large: chunked, gzip (any HDF5 reader has it)
        assert wav.compression == "gzip" and wav.chunks
        assert set(f["left_out/taps"].asstr()[()]) and list(f["left_out/steps"][()]) == []
        assert r.case["taps_default_skip"] and r.meta["stop_reason"] in (["budget"], ["eos"])
    req = Request(text=["Hello there."], speaker="ryan", language="english", max_new_frames=FRAMES)
    out = _capture(req, ckpt, tmp_path / "some.h5", taps=["talker.model.layers.1:*", "generate:codes"],
                   steps=frozenset({0, 2}))
    with RefFile(out) as r, h5py.File(out) as f:
        assert set(r.names()) == {"talker.model.layers.1:out", "generate:codes"}
        assert r.tap_step_numbers("talker.model.layers.1:out") == [0, 2]
        assert sorted(f["taps/talker.model.layers.1/out"]) == ["step_00000", "step_00002"]  # each call's own number
        assert list(f["left_out/steps"][()]) == [1, 3] and "talker.model.norm:out" in f["left_out/taps"].asstr()[()]
    with RefFile(up) as full, RefFile(out) as part:  # a kept call is the same tensor as in the full capture
        assert torch.equal(part.tap_steps("talker.model.layers.1:out")[1], full.tap_steps("talker.model.layers.1:out")[2])
    ours = _capture(req, ckpt, tmp_path / "some-ours.h5", impl=True, taps=["talker.model.layers.1:*", "generate:codes"],
                    steps=frozenset({0, 2}))
    c = check_port(ours, out)  # the same subset on both sides lines up call for call
    assert c.ok and len(c.checks) == 3, c.first_divergence


def test_default_budget_is_the_same_on_both_sides(upstream_cv):
    """Without --max-new-frames, each side counts the prompt's text tokens with its own tokenizer: the budgets (and so
    the frames both sides may generate) must agree."""
    from reference_export.request import _ImplRun, _UpstreamRun, check_request

    ckpt, _ = upstream_cv
    cfg = json.loads((ckpt / "config.json").read_text())
    gen = json.loads((ckpt / "generation_config.json").read_text())
    res = check_request(Request(text=["Hello there, a longer sentence.", "Hi"], speaker="ryan"), ckpt, cfg)
    args = (res, ckpt, cfg, gen, "cpu", torch.float32, torch.float32, "sdpa")
    n_up = _UpstreamRun(*args, model=_model(ckpt, False)).n_tokens
    n_ours = _ImplRun(*args, model=_model(ckpt, True)).n_tokens
    assert n_up == n_ours > 75 + 15 * 5  # the longer text has more than 5 tokens


def test_interrupted_capture_leaves_no_file(upstream_cv, tmp_path, monkeypatch):
    from reference_export import h5stream

    ckpt, _ = upstream_cv
    real = h5stream.H5TapStream.write
    count = [0]

    def write(self, *a, **kw):
        count[0] += 1
        if count[0] == 200:
            raise KeyboardInterrupt  # Ctrl-C mid-run
        return real(self, *a, **kw)

    monkeypatch.setattr(h5stream.H5TapStream, "write", write)
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        _capture(Request(text=["Hello there."], speaker="ryan", max_new_frames=FRAMES), ckpt,
                 tmp_path / "out" / "r.h5")
    assert count[0] == 200 and list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_open_format_reads_back_in_compare(fmt, upstream_cv, tmp_path, capsys):
    _, up = upstream_cv
    out = tmp_path / f"capture.{fmt}"
    assert export_main(["convert", str(up), "--format", fmt, "--out", str(out)]) == 0
    if fmt == "npz":
        keys = set(np.load(out).files)
    else:
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            keys = set(f.keys())
            assert json.loads(f.metadata()["case"])["mode"] == "custom_voice"
    assert "talker.model.layers.0:out@step_0" in keys and f"talker.model.layers.0:out@step_{FRAMES}" in keys
    assert "generate:codes" in keys  # recorded once: a plain key
    assert main_compare(str(out), str(up), "exact", [], None) == 0, capsys.readouterr().out[-2000:]


# ------------------------------------------------------------------------------ bad input

SURFACE = "python -m reference_export capture --request"


def _bad(args, tmp_path, capsys):
    (tmp_path / "out").mkdir(exist_ok=True)
    before = snapshot(tmp_path / "out")
    capsys.readouterr()
    rc = export_main(["capture", *args, "--out", str(tmp_path / "out" / "r.h5"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert snapshot(tmp_path / "out") == before, "something was written"
    return err


@pytest.mark.parametrize("case, variant, args, expect", [
    ("unknown speaker for the checkpoint", "custom_voice", ["--speaker", "bob"], ["--speaker 'bob'", "not a speaker"]),
    ("reference audio without --ref-text in ICL mode", "base", ["--ref-audio", "REF"], ["--ref-text is required"]),
    ("a tap glob that matches nothing", "custom_voice", ["--speaker", "ryan", "--taps", "talker.nothing*"],
     ["--taps 'talker.nothing*'", "matches no tap"]),
    ("steps beyond the run", "custom_voice", ["--speaker", "ryan", "--steps", "0:2,40"],
     ["--steps", "step 40 is beyond the run"]),
])
def test_bad_request_one_line_exit_2_nothing_written(case, variant, args, expect, checkpoint_dir, tmp_path, capsys,
                                                      bad_input, ref_wav):
    ckpt = checkpoint_dir(variant)
    args = [a.replace("REF", ref_wav) for a in args]
    err = _bad(["--checkpoint", str(ckpt), "--request", "--text", "Hello.", "--max-new-frames", "2", *args],
               tmp_path, capsys)
    for e in expect:
        assert e in err, err
    bad_input(f"capture --request: {case}", "one-line error", err, surface=SURFACE)


@pytest.mark.parametrize("content, expect", [
    ('{"text": "Hello."}', "expected a non-empty list of requests, got a JSON dict"),
    ('[]', "got an empty list"),
    ('["Hello."]', "entry 0 is a JSON str"),
    ('[{"text": "Hi", "voice": "x"}]', "unknown key(s) ['voice']"),
])
def test_bad_request_file(content, expect, checkpoint_dir, tmp_path, capsys, bad_input):
    f = tmp_path / "reqs.json"
    f.write_text(content)
    err = _bad(["--checkpoint", str(checkpoint_dir("custom_voice")), "--request-file", str(f)], tmp_path, capsys)
    assert "--request-file" in err and expect in err, err
    bad_input(f"capture --request-file: {expect.split(',')[0]}", "one-line error", err, surface=SURFACE)


def test_request_file_writes_one_file_per_request(checkpoint_dir, tmp_path, capsys):
    f = tmp_path / "reqs.json"
    f.write_text(json.dumps([{"text": "Hello.", "speaker": "ryan", "max_new_frames": 2},
                             {"text": "Bye.", "speaker": "eric", "max_new_frames": 2, "name": "bye"}]))
    (tmp_path / "out").mkdir()
    capsys.readouterr()
    rc = export_main(["capture", "--checkpoint", str(checkpoint_dir("custom_voice")), "--request-file", str(f),
                      "--out", str(tmp_path / "out" / "run.h5"), "--taps", "generate:*"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "upstream decode" in err and "3/3" in err  # the progress bar: one tick per decode step
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run_0.h5", "run_bye.h5"]
    with RefFile(tmp_path / "out" / "run_bye.h5") as r:
        assert r.case["request"]["speaker"] == "eric" and r.tap_steps("generate:codes")[0].shape[1] == 16


def test_capture_format_npz_writes_only_the_npz(checkpoint_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "hello.npz"
    rc = export_main(["capture", "--checkpoint", str(checkpoint_dir("custom_voice")), "--request", "--text", "Hi.",
                      "--speaker", "ryan", "--max-new-frames", "2", "--taps", "generate:*", "--taps", "talker:*",
                      "--format", "npz", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["hello.npz"]  # the HDF5 it streamed to is gone
    keys = set(np.load(out).files)
    assert {"generate:codes", "generate:wav", "talker:prompt_embeds", "talker:logits@step_2"} <= keys


def test_a_hook_that_stops_firing_fails_the_capture(upstream_cv, tmp_path, monkeypatch):
    """The request registry (``expected_request_taps``): a capture missing one of its taps raises, and no file is
    left (here the logits hooks are not installed)."""
    import reference_export.request as request

    ckpt, _ = upstream_cv
    monkeypatch.setattr(request, "_logit_hooks", lambda talker, rec: [])
    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError, match="did not record .*talker:logits"):
        _capture(Request(text=["Hello there."], speaker="ryan", max_new_frames=1), ckpt, tmp_path / "out" / "r.h5")
    assert list((tmp_path / "out").iterdir()) == []


def test_steps_and_taps_checked_against_what_ran():
    """After the run: a --steps step the run never reached (it stopped early at EOS) and a --taps glob that matched
    no tap are errors naming the argument (the file is then never renamed into place)."""
    from reference_export.recorder import Recorder
    from reference_export.request import RequestError, check_after

    rec = Recorder(in_loop=True)
    for step in range(3):
        rec.step = step
        rec.add("talker.model.norm:out", torch.zeros(1))
    check_after(rec, ["talker.model.*"], frozenset({0, 2}))  # all present: no error
    with pytest.raises(RequestError, match=r"--steps: step 5 is beyond the run \(decode steps 0..2 ran\)"):
        check_after(rec, None, frozenset({1, 5}))
    with pytest.raises(RequestError, match="--taps 'speaker_encoder.*': matches no tap"):
        check_after(rec, ["talker.*", "speaker_encoder.*"], None)
