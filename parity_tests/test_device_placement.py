"""Device placement of the public API: every tensor impl creates takes its device from the weights (or from the
input it combines with), user inputs on any device are moved once at the API boundary, and each public method
returns on its documented device (``impl.model`` module docstring: codes/xvectors on the model device, audio as
CPU float32 numpy).

Three layers, the first two without a GPU:

- ``test_static_*``: an ``ast`` scan of ``impl/**/*.py`` for tensor factories (``torch.zeros``, ``torch.arange``,
  ``torch.tensor``, ``torch.from_numpy``, ...) called without ``device=``; CPU-only uses are allow-listed with a
  reason. A planted snippet proves the scan bites; a stale allow-list entry fails too.
- ``test_meta_*``: the public API run with every weight on the ``meta`` device and every user input on CPU, under
  :class:`ShadowMeta`: each op's tensor arguments must share one device (a CPU tensor meeting a meta weight raises
  :class:`DeviceMixError`, as a CPU tensor meeting a CUDA weight does on a GPU), while a real CPU "shadow" of every
  meta tensor is computed alongside, so host read-backs (``.item()``, ``.tolist()``, ``.cpu()``) return the true
  values and generation runs exactly as on a real device. Planted bugs (the two seen on an H200: a CPU wav into the
  codec encoder, CPU ``ref_codes`` handed back next to device codes; and a factory without ``device=``) are caught.
- ``test_cuda_*`` (``-m cuda``): the same calls with inputs on CPU and on CUDA, checking the returned devices.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from impl import Qwen3TTS

from .helpers import release_models

ROOT = Path(__file__).resolve().parents[1]
IMPL = ROOT / "impl"
META = torch.device("meta")
aten = torch.ops.aten

# ----------------------------------------------------------------------------------------------- static scan

# Factories whose device is the default (CPU) unless ``device=`` is given. ``*_like`` and ``x.new_*`` inherit
# their device and are fine; ``torch.as_tensor(t)`` keeps a tensor's device but makes CPU tensors of lists/arrays.
FACTORIES = {"zeros", "ones", "full", "empty", "empty_strided", "arange", "range", "tensor", "as_tensor",
             "from_numpy", "randn", "rand", "randint", "randperm", "eye", "linspace", "logspace", "scalar_tensor",
             "hann_window", "hamming_window", "Generator"}
# Calls whose argument is module state (moved by ``module.to(device)``), not an inference-time tensor.
MODULE_STATE = {"Parameter", "register_buffer"}

# (file relative to impl/, enclosing function qualname, factory) -> why a CPU tensor is right there.
ALLOWED = {
    ("speaker_encoder.py", "extract_xvector", "from_numpy"):
        "the mel is built on CPU from the float32 numpy clip, as upstream; the mel is moved to the encoder's "
        "device and dtype before the network",
    ("mel.py", "mel_spectrogram", "from_numpy"):
        "the numpy filterbank table, moved with .to(y.device) on the same line",
    ("model.py", "_check_xvector", "as_tensor"):
        "user input (list/array/tensor) normalised on the host for checking; moved to the model device by the "
        "caller (_voice_clone_requests)",
    ("model.py", "Qwen3TTS.encode_reference", "from_numpy"):
        "the host-side reference wav, moved to the codec's device and dtype before the encoder",
    ("codec/__init__.py", "SpeechTokenizer._pad", "as_tensor"):
        "user codes (array/list) -> tensor; decode() moves the padded batch to the codec device",
    ("codec/__init__.py", "SpeechTokenizer.decode_oneshot", "as_tensor"):
        "user codes -> tensor, moved to the codec device before the decoder",
    ("codec/streaming.py", "DecoderStream.push", "as_tensor"):
        "user codes (tensor or array) -> tensor, moved to the decoder's device before the step",
}


def _qualname(stack: list[ast.AST]) -> str:
    return ".".join(n.name for n in stack if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))


def _factory_name(call: ast.Call) -> str | None:
    """``torch.zeros(...)`` -> ``"zeros"``; anything else -> None."""
    f = call.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "torch" \
            and f.attr in FACTORIES:
        return f.attr
    return None


def _is_module_state(call: ast.Call) -> bool:
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in MODULE_STATE


def scan_source(source: str, filename: str) -> list[tuple[str, str, str, int]]:
    """Factory calls without ``device=`` inside functions: (file, qualname, factory, line). Module-level code and
    arguments of ``nn.Parameter(...)`` / ``register_buffer(...)`` (module state, moved with the module) are not
    inference-time tensors and are skipped; docstring examples are strings, never parsed."""
    found: list[tuple[str, str, str, int]] = []

    def visit(node: ast.AST, stack: list[ast.AST], in_state: bool) -> None:
        if isinstance(node, ast.Call):
            name = _factory_name(node)
            has_device = any(k.arg == "device" for k in node.keywords)
            in_func = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in stack)
            if name and not has_device and in_func and not in_state:
                found.append((filename, _qualname(stack), name, node.lineno))
            in_state = in_state or _is_module_state(node)
        for child in ast.iter_child_nodes(node):
            visit(child, stack + [node] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  else stack, in_state)

    visit(ast.parse(source, filename), [], False)
    return found


def _allowed(hit: tuple[str, str, str, int]) -> tuple | None:
    f, q, name, _ = hit
    key = (f, q, name)
    return key if key in ALLOWED else None


def scan_impl() -> tuple[list[tuple[str, str, str, int]], set[tuple]]:
    """(hits not allow-listed, allow-list keys used)."""
    bad, used = [], set()
    for path in sorted(IMPL.rglob("*.py")):
        rel = path.relative_to(IMPL).as_posix()
        for hit in scan_source(path.read_text(encoding="utf-8"), rel):
            key = _allowed(hit)
            if key is None:
                bad.append(hit)
            else:
                used.add(key)
    return bad, used


def test_static_factories_take_a_device():
    """Every tensor factory in impl's functions names its device (from the weights or the input it meets), or is
    allow-listed with a reason; no allow-list entry is stale."""
    bad, used = scan_impl()
    assert not bad, "tensor factories without device= (they land on CPU whatever the model's device):\n" + "\n".join(
        f"  impl/{f}:{line} {q}: torch.{name}(...)" for f, q, name, line in bad)
    stale = set(ALLOWED) - used
    assert not stale, f"allow-list entries that match nothing (remove them): {sorted(stale)}"
    assert all(reason.strip() for reason in ALLOWED.values())


def test_static_scan_catches_a_planted_factory():
    """The scan flags a planted ``torch.zeros(n)`` in an inference function (and the ``torch.tensor`` of ids the
    prompt builder would make without a device), but not module state, ``*_like`` or ``device=`` calls."""
    snippet = '''
import torch
from torch import nn

class M(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))             # module state: moved by .to()
        self.register_buffer("b", torch.arange(n))         # module state
    def forward(self, x):
        a = torch.zeros_like(x) + x.new_zeros(x.shape)    # inherit x's device
        m = torch.zeros(x.shape[0], device=x.device)      # fine
        bad = torch.zeros(x.shape[0])                      # PLANTED: CPU whatever x is
        return a + m + bad

def ids(x):
    return torch.tensor([x], dtype=torch.long)             # PLANTED: the prompt's _ids without device=
'''
    hits = scan_source(snippet, "planted.py")
    assert [(q, name) for _, q, name, _ in hits] == [("M.forward", "zeros"), ("ids", "tensor")], hits


# -------------------------------------------------------------------------------------- meta + shadow runs


class DeviceMixError(RuntimeError):
    """An op met tensors on two devices (what ``Expected all tensors to be on the same device`` is on a GPU)."""


# Ops that legitimately take tensors on two devices: moves and copies.
CROSS_DEVICE_OK = {aten._to_copy, aten.to, aten.copy_, aten._copy_from, aten._copy_from_and_resize}


def _aliases(func) -> bool:
    """True for ops whose outputs alias an input (views, in-place, out=)."""
    return func._schema.is_mutable or any(r.alias_info is not None for r in func._schema.returns)


def _on_meta(d) -> bool:
    return d is not None and torch.device(d).type == "meta"


class ShadowMeta(TorchDispatchMode):
    """Run ops on real CPU "shadows" (values) of ``meta`` tensors (devices).

    An op that touches a meta tensor (or makes one) runs on the shadows; its outputs are meta twins of the real
    results (in-place and view ops run on the meta arguments as well, so their outputs alias them). A meta tensor's shadow is its ``_shadow`` attribute; weights get theirs from :func:`to_shadowed_meta`, op
    outputs from running the same op on the shadows. Host read-backs of meta tensors (``.item()``, ``.tolist()``,
    ``.cpu()``) return the shadow's values, so data-dependent code runs as on a real device. Every op first checks
    that its tensor arguments share one device, exempting 0-dim CPU tensors (CUDA ops accept those as scalars)
    and moves/copies; a mix raises :class:`DeviceMixError`. ``ops_on_meta`` counts the ops that touched meta."""

    def __init__(self):
        super().__init__()
        self.ops_on_meta = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        targets = [d for d in leaves if isinstance(d, torch.device)]  # factories' and moves' device arguments
        devices = {t.device for t in tensors if t.ndim > 0 or t.device.type != "cpu"}
        if len(devices) > 1 and func.overloadpacket not in CROSS_DEVICE_OK:
            raise DeviceMixError(f"{func}: tensors on {sorted(map(str, devices))} "
                                 f"(shapes {[tuple(t.shape) for t in tensors]})")
        if not any(t.device.type == "meta" for t in tensors) and not any(_on_meta(d) for d in targets):
            return func(*args, **kwargs)
        self.ops_on_meta += 1

        def shadow(x):
            if isinstance(x, torch.Tensor) and x.device.type == "meta":
                s = getattr(x, "_shadow", None)
                if s is None:
                    raise AssertionError(f"{func}: a meta tensor {tuple(x.shape)} without a shadow (made outside "
                                         "the dispatcher?)")
                return s
            return torch.device("cpu") if isinstance(x, torch.device) and x.type == "meta" else x

        real = func(*tree_map(shadow, args), **tree_map(shadow, kwargs))
        if not any(isinstance(o, torch.Tensor) for o in tree_leaves(real)):
            return real  # item(), equal(), ...: host values
        if (targets and not any(_on_meta(d) for d in targets)) or (
                func.overloadpacket is aten.copy_ and args[0].device.type != "meta"):
            return real  # a move/copy to the host: the values are the point
        if _aliases(func):  # in-place and view ops run on meta too: their outputs alias the meta arguments
            out = func(*args, **kwargs)
        else:  # a meta twin of each real output: values live in the shadows (whose views alias as they should)
            out = tree_map(lambda r: torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=META)
                           if isinstance(r, torch.Tensor) else r, real)
        for m, r in zip(tree_leaves(out), tree_leaves(real)):
            if isinstance(m, torch.Tensor) and m.device.type == "meta":
                m._shadow = r
        return out


class ShadowFactories(TorchFunctionMode):
    """``torch.tensor(data, device=meta)`` builds its meta tensor without the dispatcher (no shadow): build it on
    CPU and move it, which the dispatcher sees."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _on_meta(kwargs.get("device")):
            return func(*args, **{k: v for k, v in kwargs.items() if k != "device"}).to(META)
        return func(*args, **kwargs)


class shadow_meta:
    """``with shadow_meta() as mode:`` both modes; ``mode.ops_on_meta`` afterwards."""

    def __enter__(self) -> ShadowMeta:
        self._fn, self._mode = ShadowFactories(), ShadowMeta()
        self._fn.__enter__()
        return self._mode.__enter__()

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._fn.__exit__(*exc)
        return False


def to_shadowed_meta(module: nn.Module) -> nn.Module:
    """Replace every parameter and buffer by a meta tensor whose shadow is the original (tied weights stay tied)."""
    memo: dict[int, torch.Tensor] = {}

    def meta_of(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in memo:
            m = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=META)
            m = nn.Parameter(m, requires_grad=False) if param else m
            m._shadow = t.detach()
            memo[id(t)] = m
        return memo[id(t)]

    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = meta_of(p, True)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = meta_of(b, False)
    return module


def meta_model(ckpt: Path) -> Qwen3TTS:
    """A fresh model loaded on CPU, every part (talker, codec, speaker encoder) then moved to shadowed meta."""
    tts = Qwen3TTS.from_pretrained(ckpt, device="cpu", attn="eager")
    to_shadowed_meta(tts.talker)
    to_shadowed_meta(tts.codec)
    if tts.config.speaker_encoder_config is not None:
        to_shadowed_meta(tts.speaker_encoder)
    tts.device = META
    return tts


def real(t: torch.Tensor) -> torch.Tensor:
    """The values of a meta tensor (its shadow), or the tensor itself."""
    return t._shadow if t.device.type == "meta" else t


def _wav(seconds: float = 0.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal(int(24000 * seconds))).astype(np.float32)


@pytest.fixture(scope="module")
def base_cpu(checkpoint_dir):
    release_models()
    return Qwen3TTS.from_pretrained(checkpoint_dir("base"), device="cpu", attn="eager")


@pytest.fixture(scope="module")
def base_meta(checkpoint_dir):
    return meta_model(checkpoint_dir("base"))


@pytest.fixture(scope="module")
def custom_meta(checkpoint_dir):
    return meta_model(checkpoint_dir("custom_voice"))


def test_shadow_meta_catches_a_mix_and_reads_back():
    """The harness itself: a CPU tensor meeting a meta one raises; host read-backs give the shadow's values."""
    w = to_shadowed_meta(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        w._parameters["weight"]._shadow.copy_(torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]))
    with shadow_meta() as mode, torch.inference_mode():
        y = w(torch.ones(1, 3).to(META))
        assert y.device == META and y.tolist() == [[1.0, 2.0]] and int(y.sum()) == 3
        assert torch.tensor([4, 5], device=META).cpu().tolist() == [4, 5]
        with pytest.raises(DeviceMixError, match="cpu.*meta"):
            w(torch.ones(1, 3))  # a CPU input into meta weights: the test_encode_api failure on a GPU
        with pytest.raises(DeviceMixError):
            torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long, device=META)])
    assert mode.ops_on_meta > 0


def test_meta_encode_reference_and_xvector(base_meta, base_cpu):
    """``encode_reference``, ``xvector`` and the codec's own ``encode`` take CPU input into device weights and
    return on the model device, with the values of a plain CPU run."""
    wav = _wav()
    want_codes, want_x = base_cpu.encode_reference((wav, 24000)), base_cpu.xvector((wav, 24000))
    with shadow_meta() as mode:
        codes = base_meta.encode_reference((wav, 24000))
        x = base_meta.xvector((torch.from_numpy(wav), 24000))  # a torch wav works as a numpy one does
        x_dev = base_meta.xvector((torch.from_numpy(wav).to(META), 24000))  # ... on the model device too
        codes_dev = base_meta.encode_reference((torch.from_numpy(wav).to(META).bfloat16(), 24000))
        mask = torch.ones(1, wav.shape[0], dtype=torch.long)
        direct = base_meta.codec.encode(torch.from_numpy(wav)[None], mask)  # CPU audio into device weights
    assert mode.ops_on_meta > 100
    assert codes.device == META and codes.dtype == torch.long and x.device == META
    assert direct[0].device == META
    assert torch.equal(real(codes), want_codes) and torch.equal(real(direct[0]), want_codes)
    torch.testing.assert_close(real(x), want_x)
    torch.testing.assert_close(real(x_dev), want_x)
    assert codes_dev.device == META and codes_dev.shape == codes.shape


@pytest.mark.parametrize("given_on", ["cpu", "model"])
def test_meta_voice_clone_icl(base_meta, base_cpu, given_on):
    """Base ICL with a precomputed xvector and ref_codes on CPU or on the model device: generate_codes returns
    every tensor on the model device (ref_codes included, so ``cat([ref, codes])`` works: the
    test_stream_and_synthesize[base] failure on a GPU) with the codes of a CPU run; decode and stream return CPU
    float32 numpy."""
    wav = _wav(0.25)
    xv, rc = base_cpu.xvector((wav, 24000)), base_cpu.encode_reference((wav, 24000))
    kw = dict(ref_text="Reference words here.", language="english", greedy=True, max_new_frames=3)
    want = base_cpu.generate_codes("Hello device.", xvector=xv, ref_codes=rc, **kw)
    with shadow_meta():
        if given_on == "model":
            xv, rc = xv.to(META), rc.to(META)
        res = base_meta.generate_codes("Hello device.", xvector=xv, ref_codes=rc, **kw)
        for name in ("codes", "hidden", "margins", "ref_codes"):
            for t in getattr(res, name):
                assert t.device == META, f"GenerationResult.{name} on {t.device}, not the model device"
        joined = torch.cat([res.ref_codes[0], res.codes[0]])  # what test_stream_and_synthesize does
        if given_on == "cpu":  # the audio paths once (the inputs are on the model device after requests())
            wavs = base_meta.decode(res)
            chunks = list(base_meta.stream("Hello device.", chunk_frames=2, xvector=xv, ref_codes=rc, **kw))
    assert torch.equal(real(res.codes[0]), want.codes[0]) and joined.shape[0] == rc.shape[0] + want.codes[0].shape[0]
    if given_on == "cpu":
        assert isinstance(wavs[0], np.ndarray) and wavs[0].dtype == np.float32
        np.testing.assert_allclose(wavs[0], base_cpu.decode(want)[0], atol=1e-5)
        assert all(isinstance(c, np.ndarray) and c.dtype == np.float32 for c in chunks)
        assert sum(len(c) for c in chunks) == len(wavs[0])


def test_meta_voice_clone_from_audio(base_meta):
    """Base from reference audio (the path the CLI takes): x-vector and ICL codes computed inside, on device."""
    with shadow_meta():
        res = base_meta.generate_codes("Hi.", ref_audio=(_wav(0.25), 24000), ref_text="Reference words.",
                                       language="english", greedy=True, max_new_frames=2)
    assert res.codes[0].device == META and res.ref_codes[0].device == META


def test_meta_custom_voice(custom_meta):
    """CustomVoice: a left-padded batch (mask, key padding, positions), synthesize, stream, sampling."""
    kw = dict(speaker="ryan", language="english", max_new_frames=2)
    with shadow_meta() as mode:
        res = custom_meta.generate_codes(["Hello there, device.", "Hi"], greedy=True, **kw)
        # Sampled, torch's global RNG (a seeded torch.Generator cannot live on meta; the CUDA test seeds one).
        wav, sr = custom_meta.synthesize("Hi", **kw)
        chunks = list(custom_meta.stream("Hi", chunk_frames=1, greedy=True, **kw))
    assert mode.ops_on_meta > 100
    assert all(c.device == META for c in res.codes + res.hidden + res.margins)
    assert isinstance(wav, np.ndarray) and wav.dtype == np.float32 and sr == 24000
    assert all(isinstance(c, np.ndarray) and c.dtype == np.float32 for c in chunks)


def test_meta_fast_decode(custom_meta, monkeypatch):
    """``from_pretrained(fast="eager")``: greedy generate_codes on the static decode step, on the model device."""
    monkeypatch.setattr(custom_meta, "fast", "eager")
    with shadow_meta():
        res = custom_meta.generate_codes(["Hello there, device.", "Hi"], speaker="ryan", language="english",
                                         greedy=True, max_new_frames=2)
    assert all(t.device == META for t in res.codes + res.hidden + res.margins)


def test_meta_catches_planted_bugs(base_meta, monkeypatch):
    """The meta run fails on the bugs seen on an H200, planted back: (1) the codec encoder fed a CPU wav (no move
    at its boundary); (2) ICL ref_codes left on CPU next to device codes; (3) the prompt's ids made without a
    device (a factory the static scan would also flag)."""
    from impl import model as model_mod
    from impl import prompt as prompt_mod
    from impl.codec import encoder as enc_mod

    wav = _wav()
    with monkeypatch.context() as m:
        m.setattr(enc_mod.CodecEncoder, "encode",  # the pre-fix encode: no move at the boundary
                  lambda self, audio, mask: [c.transpose(0, 1) for c in self(audio, mask).codes])
        with shadow_meta(), pytest.raises(DeviceMixError):
            base_meta.codec.encode(torch.from_numpy(wav)[None], torch.ones(1, wav.shape[0], dtype=torch.long))

    orig = model_mod.Qwen3TTS._voice_clone_requests

    def cpu_ref_codes(self, reqs, *a):
        orig(self, reqs, *a)
        for r in reqs:
            r.ref_codes = r.ref_codes.cpu() if r.ref_codes is not None else None

    rc = torch.zeros(3, 16, dtype=torch.long)
    kw = dict(xvector=torch.zeros(base_meta.talker.cfg.hidden_size), ref_codes=rc, ref_text="Ref words.",
              language="english", greedy=True, max_new_frames=2)
    with monkeypatch.context() as m:
        m.setattr(model_mod.Qwen3TTS, "_voice_clone_requests", cpu_ref_codes)
        with shadow_meta():
            res = base_meta.generate_codes("Hi.", **kw)
            assert res.ref_codes[0].device != res.codes[0].device  # the contract check in the test above fails
            with pytest.raises(DeviceMixError):
                torch.cat([res.ref_codes[0], res.codes[0]])

    with monkeypatch.context() as m:
        m.setattr(prompt_mod, "_ids", lambda x, device: torch.tensor([list(x)], dtype=torch.long))
        with shadow_meta(), pytest.raises(DeviceMixError, match="embedding"):
            base_meta.generate_codes("Hi.", **kw)


# ------------------------------------------------------------------------------------------------------ CUDA


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the meta tests above cover placement without one)")


@pytest.mark.cuda
@pytest.mark.parametrize("inputs_on", ["cpu", "cuda"])
def test_cuda_public_api_devices(checkpoint_dir, inputs_on):
    """from_pretrained(device="cuda"): every public method with inputs on CPU or on the GPU; codes, hidden,
    margins, ref_codes, xvector on cuda; audio as CPU float32 numpy."""
    _cuda()
    dev = torch.device(inputs_on)
    tts = Qwen3TTS.from_pretrained(checkpoint_dir("base"), device="cuda")
    wav = _wav()
    for src in ((wav, 24000), (torch.from_numpy(wav).to(dev), 24000)):
        assert tts.encode_reference(src).device.type == "cuda"
        assert tts.xvector(src).device.type == "cuda"
    mask = torch.ones(1, wav.shape[0], dtype=torch.long, device=dev)
    assert tts.codec.encode(torch.from_numpy(wav)[None].to(dev), mask)[0].device.type == "cuda"
    xv, rc = tts.xvector((wav, 24000)).to(dev), tts.encode_reference((wav, 24000)).to(dev)
    kw = dict(xvector=xv, ref_codes=rc, ref_text="Reference words here.", language="english", greedy=True,
              max_new_frames=4)
    res = tts.generate_codes("Hello device.", **kw)
    for name in ("codes", "hidden", "margins", "ref_codes"):
        assert all(t.device.type == "cuda" for t in getattr(res, name)), name
    torch.cat([res.ref_codes[0], res.codes[0]])
    w, sr = tts.synthesize("Hello device.", **kw)
    assert isinstance(w, np.ndarray) and w.dtype == np.float32 and sr == 24000
    assert all(isinstance(c, np.ndarray) for c in tts.stream("Hello device.", chunk_frames=2, **kw))
    res = tts.generate_codes("Hi.", ref_audio=(torch.from_numpy(wav).to(dev), 24000), ref_text="Reference words.",
                             language="english", greedy=True, max_new_frames=3)
    assert res.codes[0].device.type == "cuda" and res.ref_codes[0].device.type == "cuda"
    assert isinstance(tts.decode(res)[0], np.ndarray)
    cv = Qwen3TTS.from_pretrained(checkpoint_dir("custom_voice"), device="cuda")
    res = cv.generate_codes(["Hello there, device.", "Hi"], speaker="ryan", language="english", seed=1,
                            max_new_frames=3)
    assert all(c.device.type == "cuda" for c in res.codes)
    assert isinstance(cv.synthesize("Hi", speaker="ryan", language="english", max_new_frames=3)[0], np.ndarray)
    assert cv.codec.decode_oneshot(res.codes[0].to(dev)).dtype == np.float32


@pytest.mark.cuda
def test_cuda_cli(checkpoint_dir, tmp_path):
    """``python -m impl synthesize --device cuda`` for a Base checkpoint from a reference file (ICL)."""
    _cuda()
    import soundfile as sf

    from impl.__main__ import main

    ref = tmp_path / "ref.wav"
    sf.write(ref, _wav(), 24000)
    out = tmp_path / "out.wav"
    rc = main(["synthesize", "--model", str(checkpoint_dir("base")), "--text", "Hello device.", "--out", str(out),
               "--ref-audio", str(ref), "--ref-text", "Reference words.", "--language", "english", "--greedy",
               "--max-new-frames", "3", "--device", "cuda"])
    assert rc == 0 and out.stat().st_size > 0
