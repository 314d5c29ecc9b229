"""Mapped CPU weights (``impl.loading``, ``mmap=True``, the default): a weight stored in the dtype it is loaded in
(a lookup table when a model loads; any tensor for ``read_state_dict`` itself) is a view of a private mapping of
the safetensors file, as upstream's loader leaves it, so the rows a run never reads (most of the 151k-row text
embedding) stay out of memory. These tests pin what that must not change: the values, the checks on them (NaN/Inf,
all-zero matrices, now read through a bounded buffer), the file (a write to a weight copies the page), the aligned
matmul weights, and the cases that cannot be mapped (a cast at load, an unaligned offset)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import impl.loading as loading
from impl import Qwen3TTS
from impl.loading import CheckpointError, gathered_keys, read_state_dict

from .helpers import free_memory, release_models

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux)")


def _mapped(t: torch.Tensor, path: Path) -> bool:
    """Whether ``t``'s storage lies in a mapping of ``path`` (``/proc/self/maps``)."""
    ptr = t.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


# safetensors dtype names of the tensors our checkpoints hold
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


_READ = 1 << 26  # bytes of the file read at a time when a tensor is compared with it


def _equal_to_file(path: Path, sd: dict[str, torch.Tensor], prefix: str = "") -> set[str]:
    """Compare each tensor of ``sd`` with the tensor ``prefix + key`` of a safetensors file, read with plain reads
    64 MiB at a time (asserting dtype, shape and values); return the keys found. A check against the file holds
    one chunk of it in memory, never a second copy of a tensor (the 151k-row text table is 1.2 GB at 0.6B
    dimensions), and maps nothing (``safe_open(...).get_tensor`` views a mapping of the whole file, whose touched
    pages all count as resident)."""
    seen = set()
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        for key, meta in header.items():
            k = key[len(prefix):]
            if key == "__metadata__" or not key.startswith(prefix) or k not in sd:
                continue
            ours, dt = sd[k], _ST_DTYPES[meta["dtype"]]
            assert (ours.dtype, list(ours.shape)) == (dt, meta["shape"]), \
                f"{k}: ours {ours.dtype} {list(ours.shape)}, the file {dt} {meta['shape']}"
            flat, step = ours.reshape(-1), max(1, _READ // dt.itemsize)
            fh.seek(8 + n + meta["data_offsets"][0])
            for i in range(0, flat.numel(), step):
                part = flat[i:i + step]
                got = torch.frombuffer(bytearray(fh.read(part.numel() * dt.itemsize)), dtype=dt)
                assert torch.equal(part, got), f"{k}: differs from the file in elements {i}..{i + part.numel()}"
            seen.add(k)
    return seen


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def test_cpu_weights_are_mapped_and_equal_to_read_ones(checkpoint_dir):
    """A mapped load holds the file's tensors (compared one at a time with the file, so a released-size run never
    holds two models) and generates what a read load generates (the two loaded one after the other).

    Compared through ``safe_open(...).get_tensor``, a second mapping of the file, this test reached 9.0 GB of RSS at
    0.6b (2.08x the weights, the highest of the whole run); with each file tensor read whole, 6.66 GB (1.54x)."""
    ck = checkpoint_dir("custom_voice")
    release_models()
    mapped = Qwen3TTS.from_pretrained(ck)
    f, st = ck / "model.safetensors", ck / "speech_tokenizer" / "model.safetensors"
    assert _mapped(mapped.talker.model.text_embedding.weight, f)
    assert _mapped(mapped.talker.model.codec_embedding.weight, f)
    # Matmul weights are read, 64-byte aligned: MKL's GEMM rounds differently at the file's 8-byte alignment.
    q = mapped.talker.model.layers[0].self_attn.q_proj.weight
    assert not _mapped(q, f) and q.data_ptr() % 64 == 0
    assert not any(_mapped(p, st) for p in mapped.codec.decoder.parameters() if p.ndim >= 2)
    assert gathered_keys(mapped.talker) >= {"model.text_embedding.weight", "model.codec_embedding.weight"}
    for module, path, prefix in ((mapped.talker, f, "talker."), (mapped.codec, st, "")):
        sd = module.state_dict()
        seen = _equal_to_file(path, sd, prefix)
        assert seen == set(sd), f"{path.name}: not in the file: {sorted(set(sd) - seen)[:5]}"
    x = mapped.generate_codes("Hello there.", speaker=mapped.speakers[0], greedy=True, max_new_frames=6).codes
    del mapped, sd, q
    free_memory()  # the mapped model's heap goes back to the system before the read one loads
    read = Qwen3TTS.from_pretrained(ck, mmap=False)
    assert not _mapped(read.talker.model.text_embedding.weight, f)
    y = read.generate_codes("Hello there.", speaker=read.speakers[0], greedy=True, max_new_frames=6).codes
    assert len(x) == len(y) == 1 and torch.equal(x[0], y[0])


def test_a_cast_at_load_is_not_mapped(checkpoint_dir):
    ck = checkpoint_dir("custom_voice")
    assert json.loads((ck / "config.json").read_text()).get("torch_dtype", "float32") != "bfloat16"
    release_models()
    tts = Qwen3TTS.from_pretrained(ck, dtype=torch.bfloat16)
    assert tts.talker.model.text_embedding.weight.dtype == torch.bfloat16
    assert not _mapped(tts.talker.model.text_embedding.weight, ck / "model.safetensors")


def test_a_write_to_a_mapped_weight_leaves_the_file_alone(tmp_path, checkpoint_dir):
    shutil.copy(checkpoint_dir("custom_voice") / "model.safetensors", tmp_path / "model.safetensors")
    before = _sha256(tmp_path / "model.safetensors")  # a hash, not the bytes: at 0.6b two copies took 8.3 GB
    state = read_state_dict(tmp_path, "talker.model.layers.0.")
    w = state["self_attn.q_proj.weight"]
    assert _mapped(w, tmp_path / "model.safetensors")
    w.mul_(2.0)  # copy-on-write: this process's page only
    assert _sha256(tmp_path / "model.safetensors") == before
    again = read_state_dict(tmp_path, "talker.model.layers.0.", mmap=False)["self_attn.q_proj.weight"]
    assert torch.equal(again * 2.0, w)


@pytest.mark.parametrize("mmap", [True, False])
def test_checks_see_a_bad_value_past_the_first_chunk(tmp_path, monkeypatch, mmap):
    """The mapped path checks through a bounded buffer: a NaN in a later chunk and an all-zero matrix spanning
    many chunks raise the same one line as the read path."""
    monkeypatch.setattr(loading, "_CHECK_CHUNK", 64)  # 16 floats per chunk: the bad value is in chunk 60+
    w = torch.randn(40, 25)
    w[-1, -1] = float("nan")
    save_file({"m.weight": w}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: key m.weight holds non-finite values \(1 NaN, "
                                              r"0 Inf of 1000\)"):
        read_state_dict(tmp_path, mmap=mmap)
    save_file({"m.weight": torch.zeros(40, 25), "m.bias": torch.zeros(40)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"key m.weight \(40, 25\) is all zeros"):
        read_state_dict(tmp_path, mmap=mmap)
    save_file({"m.bias": torch.zeros(40)}, str(tmp_path / "model.safetensors"))  # a zero vector is legitimate
    assert torch.equal(read_state_dict(tmp_path, mmap=mmap)["m.bias"], torch.zeros(40))


def test_an_unaligned_tensor_is_read_not_mapped(tmp_path):
    """The format allows any byte offset; a float32 tensor at offset 3 cannot be a typed view of the mapping, so
    it is read into process memory (same values)."""
    b = torch.arange(1.0, 5.0).reshape(2, 2)
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [3, 19]}}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(h)) + h + bytes([7, 8, 9]) + b.numpy().tobytes())
    state = read_state_dict(tmp_path)
    assert torch.equal(state["b"], b) and state["a"].tolist() == [7, 8, 9]
    assert not _mapped(state["b"], f)
    assert _mapped(state["a"], f)  # a byte tensor is aligned anywhere
