"""Bad input through ``python -m reference_export`` (and Ctrl-C in ``python -m reports``), plus the output-file
rules of ``impl.outfile``: one ``error:`` line, exit 2, no reference file written, nothing replaced.

``capture`` checks the checkpoint (configs parse; weights readable, finite, not blanked) and ``--out`` before it
loads upstream: a reference captured on NaN weights would be NaN throughout and still exit 0.
"""

from __future__ import annotations

import os
import runpy
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from impl.outfile import OutputError, check_output, write_bytes
from reference_export.__main__ import main as export_main

from .helpers_bad_input import copy_checkpoint, replace_file, snapshot

SURFACE = "python -m reference_export"


def _run(args, capsys):
    capsys.readouterr()
    rc = export_main(args)
    return rc, capsys.readouterr().err.strip()


def _nan_weights(ck):
    f = ck / "model.safetensors"
    state = load_file(str(f))
    key = sorted(k for k in state if k.endswith("q_proj.weight"))[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    f.unlink()
    save_file(state, str(f), metadata={"format": "pt"})


CAPTURE_CASES = [
    ("capture on a truncated checkpoint",
     lambda ck, tmp: replace_file(ck / "model.safetensors", (ck / "model.safetensors").read_bytes()[:50000]),
     {}, ["model.safetensors", "cannot read safetensors"]),
    ("capture on a checkpoint with a NaN weight", lambda ck, tmp: _nan_weights(ck), {},
     ["model.safetensors", "q_proj.weight", "non-finite"]),
    ("capture on a checkpoint whose config.json is a list",
     lambda ck, tmp: replace_file(ck / "config.json", "[]"), {}, ["config.json", "expected a JSON object"]),
    ("capture --out names a directory", lambda ck, tmp: (tmp / "out" / "r.h5").mkdir(), {},
     ["r.h5", "is a directory"]),
    ("capture --out in a missing folder", lambda ck, tmp: None, {"--out": "nowhere/r.h5"},
     ["nowhere", "does not exist"]),
    ("capture --out /dev/null", lambda ck, tmp: None, {"--out": "/dev/null"},
     ["/dev/null", "not a regular file"]),
    ("capture --case unknown", lambda ck, tmp: None, {"--case": "no_such_case"}, ["unknown case 'no_such_case'"]),
    ("capture --device mps without MPS", lambda ck, tmp: None, {"--device": "mps"}, ["MPS is not available"]),
]


@pytest.mark.parametrize("case,breaker,over,fragments", CAPTURE_CASES, ids=[c[0] for c in CAPTURE_CASES])
def test_capture_bad_input_is_one_line(case, breaker, over, fragments, checkpoint_dir, tmp_path, capsys,
                                       bad_input):
    ck = copy_checkpoint(checkpoint_dir("custom_voice"), tmp_path / "ck")
    outdir = tmp_path / "out"
    outdir.mkdir()
    breaker(ck, tmp_path)
    before = snapshot(outdir)
    args = {"--checkpoint": str(ck), "--case": "talker_stack", "--out": str(outdir / "r.h5"), **over}
    if args["--out"] == "nowhere/r.h5":
        args["--out"] = str(outdir / "nowhere" / "r.h5")
    dev_null = os.stat("/dev/null").st_mode
    rc, err = _run(["capture", *[x for kv in args.items() for x in kv]], capsys)
    assert rc == 2 and err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    assert snapshot(outdir) == before and os.stat("/dev/null").st_mode == dev_null
    bad_input(case, "one-line error, exit 2, no reference written",
              err.removeprefix("error: ").replace(str(tmp_path), "<tmp>"), SURFACE)


def test_export_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch, bad_input):
    import reference_export.synth as synth

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "build_checkpoint", interrupted)
    rc, err = _run(["synth", "--preset", "tiny", "--variant", "base", "--out", str(tmp_path / "ck")], capsys)
    assert rc == 130 and err.count("\n") == 0 and err.startswith("interrupted") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    bad_input("Ctrl-C during synth", "one line, exit 130", err, SURFACE)


# runpy warns that reports.__main__ is already imported (other tests import it); running it again as __main__ is the point.
@pytest.mark.filterwarnings("ignore:'reports.__main__' found in sys.modules:RuntimeWarning")
def test_reports_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch, bad_input):
    """``python -m reports`` run as a script: a KeyboardInterrupt anywhere ends in one line and exit 130."""
    import reports.render

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(reports.render, "render", interrupted)
    monkeypatch.setattr("sys.argv", ["reports", "render", "--results", str(tmp_path / "r.json"),
                                     "--out", str(tmp_path / "V.md")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runpy.run_module("reports", run_name="__main__", alter_sys=False)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and err == "interrupted"
    assert list(tmp_path.iterdir()) == []
    bad_input("Ctrl-C in python -m reports", "one line, exit 130", err, "python -m reports")


# ------------------------------------------------------------------------------------------ impl.outfile


def test_outfile_rules(tmp_path, bad_input):
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    assert write_bytes(link, b"new") == real
    assert link.is_symlink() and real.read_bytes() == b"new"
    dangling = tmp_path / "dangling.bin"
    dangling.symlink_to(tmp_path / "target.bin")
    write_bytes(dangling, b"x")
    assert dangling.is_symlink() and (tmp_path / "target.bin").read_bytes() == b"x"
    with pytest.raises(OutputError) as e:
        check_output(tmp_path)
    assert "is a directory" in str(e.value)
    bad_input("output path is a directory (atomic writer)", "refused, one line",
              str(e.value).replace(str(tmp_path), "<tmp>"), "impl.outfile")
    sock_dir = tmp_path / "s"
    sock_dir.mkdir()
    import socket

    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock_dir / "sock"))
        with pytest.raises(OutputError) as e:
            check_output(sock_dir / "sock")
    finally:
        s.close()
    assert "not a regular file, character device or FIFO" in str(e.value)
    bad_input("output path is a socket", "refused, one line", str(e.value).replace(str(tmp_path), "<tmp>"),
              "impl.outfile")
    # a FIFO is written through (a reader on the other end gets the bytes; the FIFO stays a FIFO)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    import threading

    got = []
    t = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    t.start()
    write_bytes(fifo, b"stream me")
    t.join(10)
    assert got == [b"stream me"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    bad_input("output path is a FIFO", "handled: written through, stays a FIFO", "9 bytes through the FIFO",
              "impl.outfile")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.bin", "fifo", "link.bin", "real.bin", "s",
                                                          "target.bin"]


def test_load_check_is_one_reduction_and_passes_real_shapes():
    """The load-time value check passes ordinary tensors (incl. zero biases and 1-D zeros), refuses the rest."""
    from impl.loading import CheckpointError, check_values

    check_values(torch.zeros(8), "bias", "f")  # a zero bias is normal
    check_values(torch.randn(4, 4), "w", "f")
    check_values(torch.arange(4), "ids", "f")  # integers are judged by dtype elsewhere
    for bad, frag in ((torch.full((2, 2), float("nan")), "4 NaN"), (torch.tensor([1.0, -np.inf]), "1 Inf"),
                      (torch.zeros(3, 3), "all zeros")):
        with pytest.raises(CheckpointError, match=frag):
            check_values(bad, "k", "f")


def test_capture_warns_when_a_reference_is_not_finite(tmp_path, capsys, bad_input):
    """Weights are checked before a capture; NaN that the computation itself makes (bf16 overflow) is said loudly."""
    from reference_export.__main__ import _warn_nonfinite
    from reference_export.h5io import write_refs

    recs = {"m.a:out": [torch.ones(3)], "m.b:out": [torch.tensor([1.0, float("nan")])]}
    path = write_refs(tmp_path / "r.h5", meta={"checkpoint_sha256": "ab" * 32}, case={}, inputs={}, records=recs,
                      progress=False)
    capsys.readouterr()
    _warn_nonfinite(path)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "1 of 2 tap datasets hold NaN/Inf (first: m.b/out)" in err, err
    bad_input("a captured reference holds NaN taps", "warned on stderr (not silent)",
              err.replace(str(tmp_path), "<tmp>"), SURFACE)
