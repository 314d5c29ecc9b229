"""``python -m impl synthesize`` and ``python -m reference_export``: outputs, one-line errors, no partial files."""

from __future__ import annotations

import soundfile as sf

from impl.__main__ import main as impl_main
from reference_export.__main__ import main as export_main


def test_synthesize_writes_a_wav_of_frames_x_1920(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "out.wav"
    rc = impl_main(["synthesize", "--model", str(checkpoint_dir("custom_voice")), "--text", "Hello there.",
                    "--mode", "custom_voice", "--speaker", "ryan", "--greedy", "--max-new-frames", "6",
                    "--out", str(out)])
    assert rc == 0
    wav, sr = sf.read(out)
    printed = capsys.readouterr().out
    frames = int(printed.split(": ")[1].split(" frames")[0])
    assert sr == 24000 and len(wav) == frames * 1920 and 1 <= frames <= 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]


def test_bad_input_is_one_line_and_leaves_no_file(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "x.wav"
    assert impl_main(["synthesize", "--model", str(tmp_path / "absent"), "--text", "hi", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "absent" in err and "not a checkpoint folder" in err
    rc = impl_main(["synthesize", "--model", str(checkpoint_dir("custom_voice")), "--text", "hi",
                    "--mode", "custom_voice", "--speaker", "nobody", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "'nobody'" in err and err.count("\n") == 0
    assert not out.exists()


def test_synth_refuses_to_overwrite_and_capture_names_unknown_case(tmp_path, capsys):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    assert export_main(["synth", "--preset", "tiny", "--variant", "base", "--out", str(d)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (d / "keep.txt").read_text() == "mine"
    assert export_main(["capture", "--checkpoint", str(d), "--case", "no_such_case", "--out",
                        str(tmp_path / "r.h5")]) == 2
    assert "unknown case 'no_such_case'" in capsys.readouterr().err
    assert not (tmp_path / "r.h5").exists()


def test_codec_stays_fp32_when_the_language_model_runs_bf16(checkpoint_dir):
    import torch

    from impl import Qwen3TTS

    tts = Qwen3TTS.from_pretrained(checkpoint_dir("custom_voice"), dtype=torch.bfloat16)
    assert next(tts.talker.parameters()).dtype == torch.bfloat16
    assert next(tts.codec.decoder.parameters()).dtype == torch.float32
    tts16 = Qwen3TTS.from_pretrained(checkpoint_dir("custom_voice"), codec_dtype=torch.bfloat16)
    assert next(tts16.codec.decoder.parameters()).dtype == torch.bfloat16
