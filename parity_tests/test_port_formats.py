"""``reports compare`` on the dump formats ports write (safetensors, npz, .npy folder, our HDF5), ``--map`` rename
rules, per-call ``name@step_N`` taps, everything that cannot be compared listed by name, the per-port report, and
bad input (one line on stderr naming the file or value, exit 2)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from reference_export.h5io import write_refs
from reports.__main__ import main as reports_main
from reports.port_compare import check_port, component_group
from reports.port_dumps import PortInputError, load_map, map_key

SURFACE = "reports compare"


def _reference(tmp_path: Path) -> tuple[Path, OrderedDict]:
    """A small reference: float taps in execution order, an integer tap, and a tap called three times."""
    g = torch.Generator().manual_seed(0)
    recs = OrderedDict()
    recs["m.embed:out"] = [torch.randn(1, 5, 8, generator=g)]
    recs["m.ids:out"] = [torch.arange(5)[None]]
    for i in range(2):
        recs[f"m.layers.{i}.attn:out"] = [torch.randn(1, 5, 8, generator=g)]
        recs[f"m.layers.{i}:out"] = [torch.randn(1, 5, 8, generator=g)]
    recs["m.step:logits"] = [torch.randn(1, 4, generator=g) for _ in range(3)]
    ref = write_refs(tmp_path / "ref.h5", meta={"checkpoint_sha256": "ab" * 32, "case_name": "toy"}, case={},
                     inputs={}, records=recs, progress=False)
    return ref, recs


def _flat(recs: OrderedDict) -> dict[str, torch.Tensor]:
    """Our tap names, per-call taps as ``name@step_N``."""
    out = {}
    for k, v in recs.items():
        if len(v) == 1:
            out[k] = v[0].clone()
        else:
            out.update({f"{k}@step_{i}": t.clone() for i, t in enumerate(v)})
    return out


def _write(fmt: str, path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    if fmt == "npz":
        np.savez(path.with_suffix(".npz"), **{k: v.numpy() for k, v in tensors.items()})
        return path.with_suffix(".npz")
    if fmt == "npy":
        path.mkdir()
        for k, v in tensors.items():
            np.save(path / f"{k.replace(':', '__')}.npy", v.numpy())  # the ':'-free spelling
        return path
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "npy"])
def test_each_format_passes_when_equal_and_names_the_first_divergence(tmp_path, fmt):
    ref, recs = _reference(tmp_path)
    good = _write(fmt, tmp_path / "good", _flat(recs))
    c = check_port(good, ref, "op")
    assert c.ok, (c.missing, c.problems, [t.result.message for t in c.checks if not t.result])
    assert len(c.checks) == 9  # 6 single taps + 3 calls of m.step:logits
    assert "m.step:logits@step_2" in [t.label for t in c.checks]
    bad_t = _flat(recs)
    bad_t["m.layers.1:out"][0, 2, 3] += 1e-3  # the later layer breaks …
    bad_t["m.step:logits@step_1"][0, 0] += 1.0  # … and so does a later decode step
    bad = _write(fmt, tmp_path / "bad", bad_t)
    c = check_port(bad, ref, "op")
    assert not c.ok
    assert c.first_divergence.label == "m.layers.1:out"
    r = c.first_divergence.result
    assert r.worst_index == [0, 2, 3] and r.needed_atol == pytest.approx(1e-3, rel=1e-2)
    assert [t.label for t in c.checks if not t.result] == ["m.layers.1:out", "m.step:logits@step_1"]


def test_hdf5_dump_reads_as_before(tmp_path):
    ref, recs = _reference(tmp_path)
    c = check_port(ref, ref, "exact")
    assert c.ok and len(c.checks) == 9 and c.fmt == "hdf5"


def test_map_rules_globs_regex_several_targets_ignore_and_steps(tmp_path):
    rules_file = tmp_path / "map.txt"
    rules_file.write_text(
        "# comment\n"
        "p.emb -> m.embed:out   # trailing comment\n"
        "p.L*.att -> m.layers.{1}.attn:out\n"
        r"re:^p\.L(?P<n>\d+)\.o$ -> m.layers.{n}:out, m.layers.{n}.copy:out" "\n"
        "p.logits -> m.step:logits\n"
        "scratch.* -> -\n")
    rules = load_map(rules_file)
    assert map_key("p.emb", rules) == ["m.embed:out"]
    assert map_key("p.L12.att", rules) == ["m.layers.12.attn:out"]
    assert map_key("p.L3.o", rules) == ["m.layers.3:out", "m.layers.3.copy:out"]
    assert map_key("p.logits@step_7", rules) == ["m.step:logits@step_7"]  # the step suffix survives
    assert map_key("scratch.anything", rules) == ["-"]
    assert map_key("m.ids:out", rules) == ["m.ids:out"]  # no rule: kept as written
    json_rules = tmp_path / "map.json"
    json_rules.write_text('[{"glob": "p.L*.att", "to": "m.layers.{1}.attn:out"}, {"regex": "q(\\\\d)", "to": "x:{1}"}]')
    assert map_key("p.L0.att", load_map(json_rules)) == ["m.layers.0.attn:out"]
    assert map_key("q7", load_map(json_rules)) == ["x:7"]

    ref, recs = _reference(tmp_path)
    ours = {"p.emb": recs["m.embed:out"][0], "m.ids:out": recs["m.ids:out"][0], "scratch.tmp": torch.ones(2)}
    for i in range(2):
        ours[f"p.L{i}.att"] = recs[f"m.layers.{i}.attn:out"][0]
        ours[f"p.L{i}.o"] = recs[f"m.layers.{i}:out"][0]
    ours.update({f"p.logits@step_{i}": t for i, t in enumerate(recs["m.step:logits"])})
    dump = _write("safetensors", tmp_path / "port", ours)
    c = check_port(dump, ref, "op", map_file=rules_file)
    assert c.ok, (c.missing, c.problems)
    assert c.ignored == ["scratch.tmp"]
    assert sorted(c.unknown) == ["m.layers.0.copy:out", "m.layers.1.copy:out"]  # listed, not judged


@pytest.mark.parametrize("text, where", [
    ("a.b c.d:out\n", "map.txt:1"),  # no arrow
    ("ok -> x:out\nbad -> not_a_tap\n", "map.txt:2"),  # target without ':'
    ("re:( -> x:out\n", "map.txt:1"),  # bad regex
])
def test_bad_map_lines_are_named_with_their_line(tmp_path, text, where):
    f = tmp_path / "map.txt"
    f.write_text(text)
    with pytest.raises(PortInputError, match=where):
        load_map(f)


def test_everything_not_comparable_is_listed_by_name(tmp_path):
    ref, recs = _reference(tmp_path)
    t = _flat(recs)
    t["m.embed:out"] = t["m.embed:out"][0]  # (5, 8) for (1, 5, 8): a missing batch axis, read and said so
    t["m.layers.0.attn:out"] = torch.zeros(1, 5, 7)  # a real shape mismatch
    t["m.ids:out"] = t["m.ids:out"].float()  # float where the reference holds integers
    t["m.layers.1:out"] = t["m.layers.1:out"].to(torch.bfloat16)  # bf16 dump
    t["notatap"] = torch.ones(1)  # a key that is not a tap name
    t["m.extra:out"] = torch.ones(1)  # a tap the reference lacks
    del t["m.layers.1.attn:out"]  # a tap the port lacks
    del t["m.step:logits@step_1"]  # a gap in the calls
    c = check_port(_write("safetensors", tmp_path / "port", t), ref, "stack")
    msgs = {x.label: x.result.message for x in c.checks}
    assert c.first_divergence.label == "m.ids:out" and "integer vs float" in msgs["m.ids:out"]
    assert "shape (1, 5, 7) != reference (1, 5, 8)" in msgs["m.layers.0.attn:out"]
    assert bool(next(x for x in c.checks if x.label == "m.embed:out").result)  # compared after the note
    assert any("m.embed:out: shape (5, 8) read as the reference's (1, 5, 8)" in n for n in c.notes)
    assert any("bfloat16" in n and "float32" in n for n in c.notes)
    assert any(p.startswith("notatap:") for p in c.problems)
    assert any(p.startswith("m.step:logits:") and "@step_1 missing" in p for p in c.problems)
    assert c.unknown == ["m.extra:out"]
    assert c.missing == ["m.layers.1.attn:out", "m.step:logits"]
    assert not c.ok


def test_bf16_dump_is_judged_in_fp32(tmp_path):
    ref_t = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).float()
    ref = write_refs(tmp_path / "ref.h5", meta={}, case={}, inputs={}, records={"a.b:out": [ref_t]}, progress=False)
    dump = _write("safetensors", tmp_path / "port", {"a.b:out": ref_t.to(torch.bfloat16)})
    c = check_port(dump, ref, "op")
    assert c.ok and c.checks[0].result.max_abs == 0.0  # bf16 -> fp32 is exact
    rounded = _write("safetensors", tmp_path / "port2", {"a.b:out": (ref_t * 1.02).to(torch.bfloat16)})
    assert not check_port(rounded, ref, "op").ok


def test_component_groups_follow_layers():
    assert component_group("talker.model.layers.3.self_attn:q_rope") == "talker.model.layers.3"
    assert component_group("speech_tokenizer.decoder.decoder.1.block.2.act1:out") == "speech_tokenizer.decoder.decoder.1"
    assert component_group("talker.text_projection.linear_fc1:out") == "talker.text_projection"


def test_cli_report_names_divergence_hash_and_draws_the_plot(tmp_path, capsys):
    ref, recs = _reference(tmp_path)
    t = _flat(recs)
    t["m.layers.1.attn:out"] += 0.5
    dump = _write("npz", tmp_path / "port", t)
    out = tmp_path / "report"
    rc = reports_main(["compare", str(dump), str(ref), "--tier", "op", "--out", str(out)])
    assert rc == 1
    printed = capsys.readouterr().out
    assert "first divergence (upstream execution order): m.layers.1.attn:out" in printed
    md = (out / "REPORT.md").read_text()
    assert "`m.layers.1.attn:out`" in md and "ab" * 32 in md and "❌ FAIL" in md
    assert "smallest passing tolerance" in md and "atol 0.5" in md
    assert (out / "error_growth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"ok": false' in (out / "results.json").read_text()
    rc = reports_main(["compare", str(_write("npz", tmp_path / "same", _flat(recs))), str(ref), "--tier", "op"])
    assert rc == 0


# ------------------------------------------------------------------------------------------ bad input


def _bad_files(tmp_path: Path, ref: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (compare arguments, what the one-line message must name)."""
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(ref.read_bytes()[:1000])
    text = tmp_path / "notes.txt"
    text.write_text("these are not tensors\n")
    wrong = tmp_path / "wrong_schema.h5"
    with h5py.File(wrong, "w") as f:
        f.attrs["schema_version"] = 99
    nogroups = tmp_path / "no_taps.h5"
    with h5py.File(nogroups, "w") as f:
        f.attrs["schema_version"] = 1
    st = tmp_path / "port.safetensors"
    save_file({"m.embed:out": torch.ones(1000)}, str(st))
    st_trunc = tmp_path / "trunc.safetensors"
    st_trunc.write_bytes(st.read_bytes()[:-100])
    npz_bad = tmp_path / "bad.npz"
    npz_bad.write_bytes(b"PK\x03\x04" + b"\0" * 30)
    badmap = tmp_path / "bad_map.txt"
    badmap.write_text("p.x -> m.embed:out\np.y m.ids:out\n")
    good = str(ref)
    return {
        "missing OURS file": ([str(tmp_path / "nope.safetensors"), good], "nope.safetensors"),
        "missing REF file": ([good, str(tmp_path / "nope.h5")], "nope.h5"),
        "0-byte OURS file": ([str(empty), good], "empty.h5"),
        "0-byte REF file": ([good, str(empty)], "empty.h5"),
        "truncated HDF5 REF": ([good, str(trunc)], "trunc.h5"),
        "truncated HDF5 OURS": ([str(trunc), good], "trunc.h5"),
        "non-HDF5 REF (text file)": ([good, str(text)], "notes.txt"),
        "unknown OURS format (text file)": ([str(text), good], "notes.txt"),
        "wrong schema_version REF": ([good, str(wrong)], "wrong_schema.h5"),
        "REF without /case /inputs /taps": ([good, str(nogroups)], "no_taps.h5"),
        "truncated safetensors OURS": ([str(st_trunc), good], "trunc.safetensors"),
        "corrupt npz OURS": ([str(npz_bad), good], "bad.npz"),
        "--tier bogus": ([good, good, "--tier", "bogus"], "--tier 'bogus'"),
        "--override without '='": ([good, good, "--override", "*attn_probs"], "'*attn_probs'"),
        "--override with an unknown tier": ([good, good, "--override", "*x=loose"], "--override '*x=loose'"),
        "--map file missing": ([good, good, "--map", str(tmp_path / "nomap.txt")], "nomap.txt"),
        "--map line without '->'": ([good, good, "--map", str(badmap)], "bad_map.txt:2"),
    }


def test_bad_input_gives_one_line_naming_the_file_or_value(tmp_path, capsys, bad_input):
    ref, _ = _reference(tmp_path)
    for case, (args, names) in _bad_files(tmp_path, ref).items():
        rc = reports_main(["compare", *args])
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert rc == 2, (case, rc, cap.err, cap.out)
        assert len(lines) == 1 and "Traceback" not in cap.err, (case, cap.err)
        assert names in lines[0], (case, lines[0])
        assert cap.out == "", (case, cap.out)
        bad_input(case, "one-line error, exit 2", lines[0], surface=SURFACE)
