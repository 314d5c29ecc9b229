"""The reference side's own recorder (``reference_export/recorder.py``), checked against upstream itself.

- Independence: nothing under ``reference_export/`` imports ``impl.taps`` (a recorder bug must not hit both sides).
- Direct calls: on a short upstream generation, every recorded call of a tap equals what the module returned for
  the inputs it got (saved by this test's own hooks), and re-calling a stateless module on those inputs gives the
  recorded value again.
- Every call: a module called many times (each talker layer once per decode step, each predictor layer 2 + 14 times
  per frame) has one record per call, in call order, each stamped with the decode step (talker forward) it ran in.
- The reference cache key changes with everything that changes a reference.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
from pathlib import Path

import pytest
import torch

import conftest
from reference_export.capture import capture
from reference_export.recorder import Recorder, output_tensor, parse_steps

ROOT = Path(__file__).resolve().parent.parent
WATCHED = ("talker.model.layers.0", "talker.model.layers.0.mlp", "talker.model.norm", "talker.codec_head",
           "talker.code_predictor.model.layers.1", "talker.code_predictor.model.layers.0.mlp",
           "talker.code_predictor.lm_head.3")
STATELESS = ("talker.model.layers.0.mlp", "talker.model.norm", "talker.codec_head",
             "talker.code_predictor.model.layers.0.mlp", "talker.code_predictor.lm_head.3")
FRAMES = 3


def test_reference_export_never_imports_impl_taps():
    for f in sorted((ROOT / "reference_export").rglob("*.py")):
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if f.name == "request.py":  # the impl dump (capture --impl) runs impl.taps on impl, by design
                continue
            assert not any(n == "impl.taps" or n.startswith("impl.taps.") for n in names), f"{f} imports impl.taps"


@pytest.fixture(scope="module")
def generation(checkpoint_dir):
    """Upstream greedy generation of FRAMES frames under the harness recorder, with this test's own hooks saving
    each watched module's inputs and output per call, and the talker call index at that moment."""
    from reference_export.upstream import load_upstream

    ckpt = checkpoint_dir("custom_voice")
    up = load_upstream(ckpt, attn="sdpa")
    model = up.model
    ids = [torch.tensor([[151644, 77091, 198, 9707, 1879, 13, 151645, 198, 151644, 77091, 198]])]
    seen: dict[str, list] = {n: [] for n in WATCHED}
    talker_calls = [0]
    handles = [model.talker.register_forward_pre_hook(lambda m, a: talker_calls.__setitem__(0, talker_calls[0] + 1))]
    for name in WATCHED:
        mod = up.roots()["talker"].get_submodule(name.removeprefix("talker."))

        def hook(m, args, kwargs, out, _n=name):
            keep = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            seen[_n].append((tuple(keep(a) for a in args), {k: keep(v) for k, v in kwargs.items()},
                             output_tensor(out).detach().clone(), talker_calls[0] - 1))

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with capture({"talker": model.talker}) as rec, torch.no_grad():
            model.generate(input_ids=ids, languages=["english"], speakers=["ryan"], non_streaming_mode=True,
                           max_new_tokens=FRAMES + 1, do_sample=False, subtalker_dosample=False)
    finally:
        for h in handles:
            h.remove()
    return up, rec, seen


def test_every_call_recorded_with_its_step(generation):
    _, rec, seen = generation
    for name, calls in seen.items():
        tap = f"{name}:out"
        assert len(calls) >= 2, f"{name}: the generation should call it several times"
        assert len(rec.records[tap]) == len(calls), f"{tap}: {len(rec.records[tap])} records for {len(calls)} calls"
        assert rec.step_of[tap] == [c[3] for c in calls], f"{tap}: steps {rec.step_of[tap]}"
        for i, (got, (_, _, want, _)) in enumerate(zip(rec.records[tap], calls)):
            assert got.dtype == want.dtype and torch.equal(got, want), f"{tap} call {i} differs from the module's output"
    steps = rec.step_of["talker.model.layers.0:out"]
    assert steps == list(range(len(steps))) and len(steps) == FRAMES + 1  # prefill = 0, then one per decode step
    cp = rec.step_of["talker.code_predictor.model.layers.1:out"]
    assert cp[0] == 1 and sorted(cp) == cp and len(cp) == 15 * FRAMES  # the predictor runs inside step k + 1


def test_recorded_value_is_what_a_direct_call_returns(generation):
    up, rec, seen = generation
    talker = up.roots()["talker"]
    with torch.no_grad():
        for name in STATELESS:
            mod = talker.get_submodule(name.removeprefix("talker."))
            for i in (0, len(seen[name]) - 1):  # the first and the last call
                args, kwargs, _, _ = seen[name][i]
                direct = output_tensor(mod(*args, **kwargs))
                assert torch.equal(rec.records[f"{name}:out"][i], direct), f"{name} call {i}"


def test_recorder_filters_and_counts_what_it_leaves_out():
    rec = Recorder(include=("a.*",), exclude=("a.skip:*",), steps=frozenset({1}))
    rec.add("a.x:out", torch.ones(1))  # outside the loop: kept whatever the steps
    rec.in_loop = True
    for step in range(3):
        rec.step = step
        rec.add("a.x:out", torch.full((1,), float(step)))
        rec.add("a.skip:out", torch.ones(1))
        rec.add("b.y:out", torch.ones(1))
    assert [float(t) for t in rec.records["a.x:out"]] == [1.0, 1.0] and rec.step_of["a.x:out"] == [0, 1]
    assert rec.left_out == {"a.skip:out", "b.y:out"} and rec.left_out_steps == {0, 2}
    assert rec.calls["a.x:out"] == 4 and rec.unmatched(["a.*", "zzz*"]) == ["zzz*"]
    assert parse_steps("0:3,7") == frozenset({0, 1, 2, 7})
    for bad in ("3:1", "x", "-1", ""):
        with pytest.raises(ValueError, match="--steps"):
            parse_steps(bad)


def test_reference_cache_key_covers_what_changes_a_reference(monkeypatch):
    assert "reference_export/recorder.py" in conftest.CAPTURE_SOURCES
    base = conftest.capture_key()
    parts = conftest.capture_key_parts()
    assert parts["torch"] == str(torch.__version__) and parts["transformers"] == md.version("transformers")
    assert parts["qwen-tts"] == md.version("qwen-tts") and parts["seed"] == str(conftest.SEED)
    changed = {}
    monkeypatch.setattr(conftest, "SEED", conftest.SEED + 1)
    changed["seed"] = conftest.capture_key()
    monkeypatch.undo()
    was = torch.backends.cuda.matmul.allow_tf32  # a torch property: set and restored by hand
    torch.backends.cuda.matmul.allow_tf32 = not was
    try:
        changed["tf32"] = conftest.capture_key()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was
    real_version = md.version
    monkeypatch.setattr(md, "version", lambda p: "9.9.9" if p == "transformers" else real_version(p))
    changed["transformers"] = conftest.capture_key()
    monkeypatch.undo()
    monkeypatch.setattr(conftest, "_src_hash", lambda *rels: "recorder-edited" if
                        "reference_export/recorder.py" in rels else "x")
    changed["recorder"] = conftest.capture_key()
    monkeypatch.undo()
    assert conftest.capture_key() == base
    same = [k for k, v in changed.items() if v == base]
    assert not same, f"the cache key ignores {same}"
