"""A small outside port of Qwen3-TTS in numpy: the talker's text path and first decoder layer, and one codec
decoder block. It exists to prove that the harness judges a port it knows nothing about.

Written from the upstream model's description and the checkpoint's own layout, not from ``impl/``: numpy and
the standard library only, weights read from the checkpoint's ``model.safetensors``
files by a 20-line reader below, activations written to safetensors under this port's own names (``tlk.L0.q``,
``dec.B1.snake`` …). ``map.txt`` next to this file renames them to the harness's tap names.

    python examples/numpy_port/port.py --checkpoint CKPT --inputs INPUTS_DIR --out DUMP_DIR [--break OP]

``INPUTS_DIR`` holds ``text_ids.npy`` (1, T) int64 and ``decoder_block_in.npy`` (B, C, T) float32, the inputs the
reference was captured with (``feed.py`` extracts them). Writes ``DUMP_DIR/talker_layer0.safetensors`` and
``DUMP_DIR/codec_block1.safetensors``. ``--break`` plants one classic porting bug, to watch the harness find it.

Scope: prefill with positions 0..T-1 and three equal M-RoPE rows (the ``talker_stack`` case), where Qwen3-TTS's
interleaved M-RoPE equals plain half-split RoPE; eager causal attention; fp32 throughout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

BREAKS = {
    "rope_pairs": "rotate adjacent pairs (GPT-J style) instead of the two halves (NeoX style)",
    "snake_no_exp": "use SnakeBeta's alpha as the frequency instead of exp(alpha)",
    "rmsnorm_eps": "RMSNorm epsilon 1e-2 instead of the config's",
}

# ------------------------------------------------------------------------------------------ safetensors


_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8"),
              "I32": np.dtype("<i4"), "BF16": np.dtype("<u2")}


def read_safetensors(path: Path, keys: set[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as numpy arrays (bf16 upcast to float32 by shifting its bits)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        base = 8 + n
        out = {}
        for k, info in header.items():
            if k == "__metadata__" or (keys is not None and k not in keys):
                continue
            a, b = info["data_offsets"]
            fh.seek(base + a)
            arr = np.frombuffer(fh.read(b - a), dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
            if info["dtype"] == "BF16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)  # bf16 is the top half of an fp32
            out[k] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write float32/int64 arrays as a safetensors file (header JSON padded to 8 bytes, then raw data)."""
    names = {np.dtype("float32"): "F32", np.dtype("int64"): "I64"}
    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        v = np.ascontiguousarray(v)
        data = v.astype(v.dtype.newbyteorder("<")).tobytes()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(len(h).to_bytes(8, "little") + h)
        for b in blobs:
            fh.write(b)


# ------------------------------------------------------------------------------------------ talker


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))).astype(np.float32) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def rope(x: np.ndarray, pos: np.ndarray, theta: float, broken: bool) -> np.ndarray:
    """x (B, H, T, D) rotated by position: NeoX half-split pairs (i, i + D/2) share frequency theta^(-2i/D)."""
    D = x.shape[-1]
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D)))).astype(np.float32)
    ang = pos.astype(np.float32)[:, None] * inv[None, :]  # (T, D/2)
    cos, sin = np.cos(ang), np.sin(ang)
    if broken:  # rope_pairs: (x0, x1), (x2, x3) … rotated together, the layout of GPT-J ports
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x1 * cos + x0 * sin
        return out
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def talker_layer0(ckpt: Path, text_ids: np.ndarray, brk: str | None) -> dict[str, np.ndarray]:
    cfg = json.loads((ckpt / "config.json").read_text())["talker_config"]
    p = "talker.model.layers.0."
    W = read_safetensors(ckpt / "model.safetensors", {
        "talker.model.text_embedding.weight", "talker.text_projection.linear_fc1.weight",
        "talker.text_projection.linear_fc1.bias", "talker.text_projection.linear_fc2.weight",
        "talker.text_projection.linear_fc2.bias",
        *(p + k + ".weight" for k in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                                      "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                      "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj",
                                      "mlp.down_proj"))})
    H, K, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = 1e-2 if brk == "rmsnorm_eps" else cfg["rms_norm_eps"]
    B, T = text_ids.shape
    d: dict[str, np.ndarray] = {}

    def lin(x, name, bias=False):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if bias else y

    d["tlk.embed"] = e = W["talker.model.text_embedding.weight"][text_ids]  # (B, T, text_hidden)
    d["tlk.proj.fc1"] = h = lin(e, "talker.text_projection.linear_fc1", bias=True)
    d["tlk.proj.silu"] = h = silu(h)
    d["tlk.proj"] = x = lin(h, "talker.text_projection.linear_fc2", bias=True)  # (B, T, hidden)
    d["tlk.L0.x"] = x
    d["tlk.L0.ln1"] = a = rmsnorm(x, W[p + "input_layernorm.weight"], eps)
    q, k, v = (lin(a, p + f"self_attn.{n}_proj") for n in "qkv")
    d["tlk.L0.q"], d["tlk.L0.k"], d["tlk.L0.v"] = q, k, v
    q = rmsnorm(q.reshape(B, T, H, D), W[p + "self_attn.q_norm.weight"], eps)  # per-head norm, before RoPE
    k = rmsnorm(k.reshape(B, T, K, D), W[p + "self_attn.k_norm.weight"], eps)
    d["tlk.L0.qn"], d["tlk.L0.kn"] = q, k
    pos = np.arange(T)
    q = rope(q.transpose(0, 2, 1, 3), pos, cfg["rope_theta"], brk == "rope_pairs")  # (B, H, T, D)
    k = rope(k.transpose(0, 2, 1, 3), pos, cfg["rope_theta"], brk == "rope_pairs")  # (B, K, T, D)
    d["tlk.L0.q_rot"], d["tlk.L0.k_rot"] = q, k
    v = v.reshape(B, T, K, D).transpose(0, 2, 1, 3)  # (B, K, T, D)
    k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)  # GQA: each kv head serves H/K q heads
    s = (q @ k.transpose(0, 1, 3, 2)) * np.float32(D ** -0.5)  # (B, H, T, T)
    s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    d["tlk.L0.probs"] = prob = (s / s.sum(-1, keepdims=True)).astype(np.float32)
    ctx = (prob @ v).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    d["tlk.L0.ctx"] = ctx
    d["tlk.L0.attn"] = o = lin(ctx, p + "self_attn.o_proj")
    d["tlk.L0.h"] = h = x + o
    d["tlk.L0.ln2"] = m = rmsnorm(h, W[p + "post_attention_layernorm.weight"], eps)
    d["tlk.L0.gate"], d["tlk.L0.up"] = g, u = lin(m, p + "mlp.gate_proj"), lin(m, p + "mlp.up_proj")
    d["tlk.L0.act"] = g = silu(g)
    d["tlk.L0.glu"] = gu = g * u
    d["tlk.L0.mlp"] = mo = lin(gu, p + "mlp.down_proj")
    d["tlk.L0.out"] = h + mo
    d["dbg.rope_pos"] = pos.astype(np.int64)  # scratch the map ignores
    return d


# ------------------------------------------------------------------------------------------ codec


def snake(x: np.ndarray, alpha: np.ndarray, beta: np.ndarray, brk: str | None) -> np.ndarray:
    """SnakeBeta, x (B, C, T): x + sin²(x·a) / b with a = exp(alpha), b = exp(beta) (log-scale parameters)."""
    a = alpha if brk == "snake_no_exp" else np.exp(alpha)
    b = np.exp(beta)
    return x + (np.float32(1) / (b[None, :, None] + np.float32(1e-9))) * np.sin(x * a[None, :, None]) ** 2


def causal_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, dilation: int = 1) -> np.ndarray:
    """x (B, Ci, T), w (Co, Ci, k): zero-pad (k-1)·d on the left, so output t sees inputs ≤ t."""
    Co, Ci, k = w.shape
    pad = (k - 1) * dilation
    xp = np.concatenate([np.zeros(x.shape[:2] + (pad,), np.float32), x], axis=-1)
    T = x.shape[-1]
    y = np.zeros((x.shape[0], Co, T), np.float32)
    for j in range(k):
        y += np.einsum("oc,bct->bot", w[:, :, j], xp[:, :, j * dilation: j * dilation + T])
    return y + b[None, :, None]


def trans_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """Transposed conv, x (B, Ci, T), w (Ci, Co, k): overlap-add, then keep the first T·stride samples."""
    Ci, Co, k = w.shape
    T = x.shape[-1]
    full = np.zeros((x.shape[0], Co, (T - 1) * stride + k), np.float32)
    for j in range(k):
        full[:, :, j: j + (T - 1) * stride + 1: stride] += np.einsum("co,bct->bot", w[:, :, j], x)
    return full[:, :, : T * stride] + b[None, :, None]  # the causal trim drops the k - stride tail


def codec_block1(ckpt: Path, x: np.ndarray, brk: str | None) -> dict[str, np.ndarray]:
    p = "decoder.decoder.1.block."
    W = read_safetensors(ckpt / "speech_tokenizer" / "model.safetensors")
    W = {k[len(p):]: v for k, v in W.items() if k.startswith(p)}
    rate = W["1.conv.weight"].shape[-1] // 2  # kernel = 2 × rate
    d = {"dec.B1.x": x}
    d["dec.B1.snake"] = h = snake(x, W["0.alpha"], W["0.beta"], brk)
    d["dec.B1.up"] = h = trans_conv(h, W["1.conv.weight"], W["1.conv.bias"], rate)
    for i, dil in enumerate((1, 3, 9)):  # residual units block.2..4
        u = f"{i + 2}."
        r = snake(h, W[u + "act1.alpha"], W[u + "act1.beta"], brk)
        d[f"dec.B1.r{i}.snake1"] = r
        r = causal_conv(r, W[u + "conv1.conv.weight"], W[u + "conv1.conv.bias"], dil)
        d[f"dec.B1.r{i}.conv1"] = r
        r = snake(r, W[u + "act2.alpha"], W[u + "act2.beta"], brk)
        r = causal_conv(r, W[u + "conv2.conv.weight"], W[u + "conv2.conv.bias"])
        d[f"dec.B1.r{i}"] = h = h + r
    d["dec.B1.out"] = h
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (config.json, model.safetensors)")
    ap.add_argument("--inputs", required=True, type=Path, help="folder with text_ids.npy and decoder_block_in.npy")
    ap.add_argument("--out", required=True, type=Path, help="folder for the two safetensors dumps")
    ap.add_argument("--break", dest="brk", choices=sorted(BREAKS), default=None,
                    help="plant one bug: " + "; ".join(f"{k}: {v}" for k, v in BREAKS.items()))
    a = ap.parse_args(argv)
    for f in (a.checkpoint / "config.json", a.inputs / "text_ids.npy", a.inputs / "decoder_block_in.npy"):
        if not f.is_file():
            print(f"numpy_port: {f} not found", file=sys.stderr)
            return 2
    ids = np.load(a.inputs / "text_ids.npy")
    xb = np.load(a.inputs / "decoder_block_in.npy").astype(np.float32)
    write_safetensors(a.out / "talker_layer0.safetensors", talker_layer0(a.checkpoint, ids, a.brk))
    write_safetensors(a.out / "codec_block1.safetensors", codec_block1(a.checkpoint, xb, a.brk))
    print(f"numpy_port: wrote {a.out / 'talker_layer0.safetensors'} and {a.out / 'codec_block1.safetensors'}"
          + (f" (broken on purpose: {a.brk})" if a.brk else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
