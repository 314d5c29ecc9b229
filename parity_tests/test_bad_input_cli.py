"""Bad input through ``python -m impl synthesize``: every mistake is one ``error:`` line naming the file, key or
value at fault, exit status 2, and no file is created or changed where the output would go.

Each case runs the CLI in-process on a copy of the tiny checkpoint with one thing broken (files that a case does
not change are symlinked to the cached checkpoint, so a broken copy costs one file write). The line the user saw
is asserted first, then recorded for the report's "Bad input" section (``bad_input`` fixture in conftest.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from impl.__main__ import main as impl_main

from .helpers_bad_input import copy_checkpoint, edit_json, edit_weights, replace_file, snapshot

SURFACE = "python -m impl synthesize"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (a checkpoint build's progress bar)
    rc = impl_main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip()


def short(line: str, tmp: Path) -> str:
    """The line as recorded for the report: the test's temporary folder shown as ``<tmp>``."""
    return line.removeprefix("error: ").replace(str(tmp), "<tmp>")


def assert_one_line_error(rc: int, err: str, *fragments: str) -> str:
    lines = err.splitlines()
    # The error line is the last line; nothing before it but nothing at all is expected either.
    assert rc == 2, f"exit {rc}, stderr: {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {err!r}"
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------ the table

CV_ARGS = ["--text", "Hello there.", "--speaker", "ryan", "--greedy", "--max-new-frames", "2"]
CLIP_ARGS = ["--text", "Hello there.", "--x-vector-only", "--greedy", "--max-new-frames", "2"]


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[7] = float("nan")
    return t


def _inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("inf")
    return t


def _wav(path: Path, data: np.ndarray, sr: int) -> str:
    sf.write(str(path), data, sr, subtype="FLOAT")
    return str(path)


# (id, variant, break(ckpt, tmp) -> extra args | None, base args, fragments the line must hold)
CASES = [
    ("model folder missing", "custom_voice", lambda ck, tmp: ["--model", str(tmp / "absent")], CV_ARGS,
     ["absent", "not a checkpoint folder"]),
    ("model.safetensors truncated", "custom_voice",
     lambda ck, tmp: replace_file(ck / "model.safetensors", (ck / "model.safetensors").read_bytes()[:100000]),
     CV_ARGS, ["model.safetensors", "cannot read safetensors"]),
    ("model.safetensors 0 bytes", "custom_voice", lambda ck, tmp: replace_file(ck / "model.safetensors", b""),
     CV_ARGS, ["model.safetensors", "cannot read safetensors"]),
    ("model.safetensors random bytes", "custom_voice",
     lambda ck, tmp: replace_file(ck / "model.safetensors", np.random.default_rng(0).bytes(4096)),
     CV_ARGS, ["model.safetensors", "cannot read safetensors"]),
    ("talker weight with a NaN", "custom_voice",
     lambda ck, tmp: edit_weights(ck / "model.safetensors", lambda k: k.endswith("q_proj.weight"), _nan),
     CV_ARGS, ["model.safetensors", "q_proj.weight", "non-finite", "1 NaN"]),
    ("talker weight with an Inf", "custom_voice",
     lambda ck, tmp: edit_weights(ck / "model.safetensors", lambda k: k.endswith("codec_head.weight"), _inf),
     CV_ARGS, ["codec_head.weight", "non-finite", "1 Inf"]),
    ("talker weight all zeros", "custom_voice",
     lambda ck, tmp: edit_weights(ck / "model.safetensors", lambda k: k.endswith("down_proj.weight"),
                                  torch.zeros_like), CV_ARGS, ["down_proj.weight", "all zeros"]),
    ("talker weight of integer dtype", "custom_voice",
     lambda ck, tmp: edit_weights(ck / "model.safetensors", lambda k: k.endswith("o_proj.weight"),
                                  lambda t: (t * 100).to(torch.int32)), CV_ARGS,
     ["o_proj.weight", "int32", "floating-point"]),
    ("codec weight with a NaN", "custom_voice",
     lambda ck, tmp: edit_weights(ck / "speech_tokenizer" / "model.safetensors",
                                  lambda k: k.startswith("decoder.") and k.endswith("weight"), _nan),
     CV_ARGS, ["speech_tokenizer", "non-finite"]),
    ("speech_tokenizer/ missing", "custom_voice",
     lambda ck, tmp: [p.unlink() for p in (ck / "speech_tokenizer").iterdir()] and None, CV_ARGS,
     ["speech_tokenizer/config.json", "missing"]),
    ("config.json is a JSON list", "custom_voice", lambda ck, tmp: replace_file(ck / "config.json", "[1, 2]"),
     CV_ARGS, ["config.json", "expected a JSON object", "list"]),
    ("config.json not JSON", "custom_voice", lambda ck, tmp: replace_file(ck / "config.json", "{oops"),
     CV_ARGS, ["config.json", "not valid JSON"]),
    ("config.json hidden_size \"sixty-four\"", "custom_voice",
     lambda ck, tmp: edit_json(ck / "config.json",
                               lambda d: {**d, "talker_config": {**d["talker_config"], "hidden_size": "sixty-four"}}),
     CV_ARGS, ["config.json", "talker_config", "hidden_size", "'sixty-four'", "expected int"]),
    ("config.json hidden_size changed (64 -> 96)", "custom_voice",
     lambda ck, tmp: edit_json(ck / "config.json",
                               lambda d: {**d, "talker_config": {**d["talker_config"], "hidden_size": 96}}),
     CV_ARGS, ["model.safetensors", "has shape", "model expects", "(does config.json match"]),
    ("generation_config.json not JSON", "custom_voice",
     lambda ck, tmp: replace_file(ck / "generation_config.json", "temperature = hot"), CV_ARGS,
     ["generation_config.json", "not valid JSON"]),
    ("generation_config.json temperature \"hot\"", "custom_voice",
     lambda ck, tmp: edit_json(ck / "generation_config.json", lambda d: {**d, "temperature": "hot"}), CV_ARGS,
     ["generation_config.json", "temperature 'hot'", "> 0"]),
    ("--text not UTF-8", "custom_voice",
     lambda ck, tmp: ["--text", b"caf\xe9 au lait".decode("utf-8", "surrogateescape")],
     ["--speaker", "ryan", "--greedy", "--max-new-frames", "2"], ["--text #1", "not valid UTF-8", "0xe9"]),
    ("--instruct not UTF-8", "custom_voice",
     lambda ck, tmp: ["--instruct", b"\xff whisper".decode("utf-8", "surrogateescape")], CV_ARGS,
     ["--instruct is not valid UTF-8", "0xff"]),
    ("--ref-audio given to a CustomVoice checkpoint", "custom_voice",
     lambda ck, tmp: ["--ref-audio", _wav(tmp / "ok.wav", 0.1 * np.sin(np.arange(24000) * 0.05), 24000)], CV_ARGS,
     ["mode 'custom_voice' takes no reference, but got ref_audio"]),
    ("--text empty", "custom_voice", lambda ck, tmp: ["--text", "   "],
     ["--speaker", "ryan", "--greedy", "--max-new-frames", "2"], ["--text #1 is empty"]),
    ("--text of only zero-width characters", "custom_voice", lambda ck, tmp: ["--text", "\u200b \u2060\ufeff"],
     ["--speaker", "ryan", "--greedy", "--max-new-frames", "2"],
     ["--text #1 is empty: it holds only invisible characters (U+200B ZERO WIDTH SPACE, U+2060 WORD JOINER, "
      "U+FEFF ZERO WIDTH NO-BREAK SPACE)"]),
    ("--seed abc", "custom_voice", lambda ck, tmp: ["--seed", "abc"], CV_ARGS,
     ["argument --seed: invalid int value: 'abc'", "--help"]),
    ("--seed 2**64", "custom_voice", lambda ck, tmp: ["--seed", str(2**64)], CV_ARGS,
     ["seed 18446744073709551616 is out of range"]),
    ("an unknown flag (--sead 3)", "custom_voice", lambda ck, tmp: ["--sead", "3"], CV_ARGS,
     ["unrecognized arguments: --sead 3"]),
    ("--device mps without MPS", "custom_voice", lambda ck, tmp: ["--device", "mps"], CV_ARGS,
     ["'mps'", "MPS is not available"]),
    ("--device bogus", "custom_voice", lambda ck, tmp: ["--device", "tpu9"], CV_ARGS,
     ["'tpu9'", "not a torch device"]),
    ("--out names an existing directory", "custom_voice",
     lambda ck, tmp: (tmp / "out" / "sub.wav").mkdir() or ["--out", str(tmp / "out" / "sub.wav")], CV_ARGS,
     ["sub.wav", "is a directory"]),
    ("--out in a folder that does not exist", "custom_voice",
     lambda ck, tmp: ["--out", str(tmp / "out" / "nowhere" / "x.wav")], CV_ARGS, ["nowhere", "does not exist"]),
    ("--max-new-frames 0", "custom_voice", lambda ck, tmp: ["--max-new-frames", "0"], CV_ARGS,
     ["max_new_frames 0 is out of range"]),
    ("--max-new-frames 1000000000", "custom_voice", lambda ck, tmp: ["--max-new-frames", "1000000000"], CV_ARGS,
     ["max_new_frames 1000000000", "out of range"]),
    ("--temperature 0", "custom_voice", lambda ck, tmp: ["--temperature", "0"], CV_ARGS,
     ["temperature 0.0", "> 0"]),
    ("--top-p 0", "custom_voice", lambda ck, tmp: ["--top-p", "0"], CV_ARGS, ["top_p 0.0", "(0, 1]"]),
    ("--top-p 1.5", "custom_voice", lambda ck, tmp: ["--top-p", "1.5"], CV_ARGS, ["top_p 1.5", "(0, 1]"]),
    ("--top-k -3", "custom_voice", lambda ck, tmp: ["--top-k", "-3"], CV_ARGS, ["top_k -3", ">= 0"]),
    ("--repetition-penalty -2", "custom_voice", lambda ck, tmp: ["--repetition-penalty", "-2"], CV_ARGS,
     ["repetition_penalty -2.0", "> 0"]),
    ("--speaker unknown", "custom_voice", lambda ck, tmp: ["--speaker", "nobody"], CV_ARGS, ["'nobody'"]),
    ("--language unknown", "custom_voice", lambda ck, tmp: ["--language", "klingon"], CV_ARGS,
     ["'klingon'", "supported"]),
    ("--mode voice_clone on a CustomVoice checkpoint", "custom_voice", lambda ck, tmp: ["--mode", "voice_clone"],
     CV_ARGS, ["'custom_voice' checkpoint does not serve mode 'voice_clone'"]),
    ("--speaker given to a Base checkpoint", "base",
     lambda ck, tmp: ["--speaker", "ryan", "--ref-audio", _wav(tmp / "ok.wav", 0.1 * np.sin(np.arange(24000) * 0.05),
                                                                24000)], CLIP_ARGS,
     ["mode 'voice_clone' takes no speaker, but got 'ryan'"]),
    ("--ref-audio a URL", "base", lambda ck, tmp: ["--ref-audio", "https://example.com/me.wav"], CLIP_ARGS,
     ["https://example.com/me.wav", "no network I/O"]),
    ("--ref-audio missing file", "base", lambda ck, tmp: ["--ref-audio", str(tmp / "nope.wav")], CLIP_ARGS,
     ["--ref-audio", "nope.wav: file not found"]),
    ("--ref-audio not audio", "base",
     lambda ck, tmp: (tmp / "a.wav").write_text("not audio") and ["--ref-audio", str(tmp / "a.wav")], CLIP_ARGS,
     ["a.wav", "cannot read audio"]),
    ("--ref-audio with NaN samples", "base",
     lambda ck, tmp: ["--ref-audio", _wav(tmp / "nan.wav", np.where(np.arange(24000) == 5, np.nan,
                                                                    0.1 * np.sin(np.arange(24000) * 0.05)), 24000)],
     CLIP_ARGS, ["nan.wav", "1 of 24000 samples are NaN or Inf"]),
    ("--ref-audio at 1 Hz", "base",
     lambda ck, tmp: ["--ref-audio", _wav(tmp / "onehz.wav", np.zeros(50, np.float32), 1)], CLIP_ARGS,
     ["onehz.wav", "1 Hz is below 1000 Hz"]),
    ("--ref-audio too short", "base",
     lambda ck, tmp: ["--ref-audio", _wav(tmp / "short.wav", np.full(500, 0.1, np.float32), 24000)], CLIP_ARGS,
     ["short.wav", "too short"]),
    ("--ref-text missing for ICL", "base",
     lambda ck, tmp: ["--ref-audio", _wav(tmp / "ok.wav", 0.1 * np.sin(np.arange(24000) * 0.05), 24000)],
     ["--text", "Hello there.", "--greedy", "--max-new-frames", "2"], ["ref_text is required"]),
]


@pytest.mark.parametrize("case,variant,breaker,base,fragments", CASES, ids=[c[0] for c in CASES])
def test_cli_bad_input_is_one_line_and_touches_nothing(case, variant, breaker, base, fragments, checkpoint_dir,
                                                       tmp_path, capsys, bad_input):
    ck = copy_checkpoint(checkpoint_dir(variant), tmp_path / "ck")
    outdir = tmp_path / "out"
    outdir.mkdir()
    keep = outdir / "keep.wav"
    keep.write_bytes(b"an earlier result")
    extra = breaker(ck, tmp_path)
    extra = extra if isinstance(extra, list) else []  # a breaker returns CLI args, or edits files only
    before = snapshot(outdir)
    args = ["synthesize", "--model", str(ck), "--out", str(outdir / "new.wav"), *base]
    # Later flags win in argparse for single-valued options; --text appends, so a case's --text replaces base's.
    if "--text" in extra:
        args = [a for i, a in enumerate(args) if not (a == "--text" or (i and args[i - 1] == "--text"))]
    rc, _, err = run_cli(args + extra, capsys)
    line = assert_one_line_error(rc, err, *fragments)
    assert snapshot(outdir) == before and keep.read_bytes() == b"an earlier result"
    bad_input(case, "one-line error, exit 2, nothing written", short(line, tmp_path), SURFACE)


def test_cli_device_cuda_without_cuda(checkpoint_dir, tmp_path, capsys, bad_input):
    """``--device cuda`` with no CUDA (or a CUDA index past the last device, where CUDA exists)."""
    dev, frag = ("cuda:99", "CUDA device(s) here") if torch.cuda.is_available() else ("cuda", "CUDA is not available")
    out = tmp_path / "x.wav"
    rc, _, err = run_cli(["synthesize", "--model", str(checkpoint_dir("custom_voice")), "--out", str(out),
                          "--device", dev, *CV_ARGS], capsys)
    line = assert_one_line_error(rc, err, f"'{dev}'", frag)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    bad_input(f"--device {dev} without it", "one-line error, exit 2, nothing written", line.removeprefix("error: "),
              SURFACE)


def test_cli_ctrl_c_is_one_line_and_exit_130(checkpoint_dir, tmp_path, capsys, monkeypatch, bad_input):
    from impl.model import Qwen3TTS

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Qwen3TTS, "generate_codes", interrupted)
    out = tmp_path / "out.wav"
    out.write_bytes(b"an earlier result")
    rc, _, err = run_cli(["synthesize", "--model", str(checkpoint_dir("custom_voice")), "--out", str(out),
                          *CV_ARGS], capsys)
    assert rc == 130 and err.count("\n") == 0 and err.startswith("interrupted") and "Traceback" not in err
    assert out.read_bytes() == b"an earlier result" and sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]
    bad_input("Ctrl-C during generation", "one line, exit 130, existing output kept", err, SURFACE)


def test_cli_out_symlink_is_followed_and_kept(checkpoint_dir, tmp_path, capsys, bad_input):
    real = tmp_path / "real.wav"
    real.write_bytes(b"old")
    link = tmp_path / "link.wav"
    link.symlink_to(real)
    rc, out, err = run_cli(["synthesize", "--model", str(checkpoint_dir("custom_voice")), "--out", str(link),
                            *CV_ARGS], capsys)
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    wav, sr = sf.read(real)
    assert sr == 24000 and len(wav) % 1920 == 0 and len(wav) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.wav", "real.wav"]
    bad_input("--out is a symlink", "handled: the link is followed and stays a link",
              short(out.strip().splitlines()[0], tmp_path), SURFACE)


@pytest.mark.skipif(not os.access("/dev/null", os.W_OK), reason="/dev/null is not writable here")
def test_cli_out_dev_null_is_written_through(checkpoint_dir, capsys, bad_input):
    rc, out, err = run_cli(["synthesize", "--model", str(checkpoint_dir("custom_voice")), "--out", "/dev/null",
                            *CV_ARGS], capsys)
    assert rc == 0, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode), "/dev/null was replaced by a regular file"
    bad_input("--out /dev/null (a character device)", "handled: written through, the device stays a device",
              out.strip().splitlines()[0], SURFACE)


def test_cli_budget_stop_is_said_on_stderr(checkpoint_dir, tmp_path, capsys, monkeypatch, bad_input):
    """With no --max-new-frames the default budget (from the text length) applies; hitting it says stop=budget."""
    import impl.generate as gen

    monkeypatch.setattr(gen, "BUDGET_BASE_FRAMES", 2)  # so that the default budget is hit in a short test
    monkeypatch.setattr(gen, "BUDGET_FRAMES_PER_TOKEN", 0)
    out = tmp_path / "o.wav"
    rc, stdout, err = run_cli(["synthesize", "--model", str(checkpoint_dir("custom_voice")), "--out", str(out),
                               "--text", "Hello there.", "--speaker", "ryan", "--greedy"], capsys)
    assert rc == 0, err
    assert "2 frames" in stdout and "stop=budget" in stdout
    warn = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "stop=budget" in warn[0] and "default budget" in warn[0]
    bad_input("no EOS within the default budget", "handled: stops, says stop=budget on stderr",
              short(warn[0], tmp_path), SURFACE)
