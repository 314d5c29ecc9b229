"""Qwen2 byte-level BPE text tokenizer, loaded from a checkpoint folder without ``transformers``.

Reproduces what upstream's ``Qwen3TTSProcessor`` (a wrapper of transformers 4.57.3 ``Qwen2TokenizerFast``, built
from ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` by ``Qwen2Converter`` and loaded with
``fix_mistral_regex=True``) gives for ``processor(text=...)["input_ids"]``: NFC normalizer, a regex ``Split``
pre-tokenizer followed by byte-level mapping, byte-level BPE, the added tokens of ``tokenizer_config.json``
matched verbatim in the text, and no special tokens added around the text.

Deliberate reproduction of a transformers quirk: with ``fix_mistral_regex=True``, transformers 4.57.3 replaces
the Qwen2 pre-tokenizer regex with Mistral's whenever the folder's ``config.json`` says it was written by a
transformers newer than 4.57.2 and older than 5 (or gives no version, or gives a Mistral ``model_type``).
``pretokenizer_regex_name`` tells which regex is in force; the two split CamelCase text differently.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# The Qwen2 pre-tokenizer regex (as written by transformers' Qwen2Converter).
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# The regex transformers 4.57.3 substitutes under ``fix_mistral_regex=True``.
MISTRAL_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# config.json model types for which transformers applies the fix even when the version is old.
_MISTRAL_MODEL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")
# transformers only considers the patch for tokenizers whose base vocabulary exceeds this.
_PATCH_MIN_VOCAB = 100_000


class TokenizerFileError(ValueError):
    """A tokenizer file in the checkpoint folder is missing or malformed."""


# --- a small PEP 440 ordering, enough to compare "transformers_version" strings ----------------------------
_VERSION_RE = re.compile(
    r"""^\s*v?
    (?:(?P<epoch>\d+)!)?
    (?P<release>\d+(?:\.\d+)*)
    (?:[-_.]?(?P<pre_l>alpha|a|beta|b|preview|pre|c|rc)[-_.]?(?P<pre_n>\d*))?
    (?:-(?P<post_n1>\d+)|[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n2>\d*))?
    (?:[-_.]?(?P<dev_l>dev)[-_.]?(?P<dev_n>\d*))?
    (?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?
    \s*$""",
    re.VERBOSE | re.IGNORECASE,
)
_PRE_ORDER = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}
_INF = float("inf")


def version_key(text: str) -> tuple:
    """Sort key ordering version strings as PEP 440 (``packaging.version``) does; raises ValueError if invalid."""
    m = _VERSION_RE.match(text)
    if m is None:
        raise ValueError(f"invalid version string {text!r}")
    release = [int(p) for p in m["release"].split(".")]
    while len(release) > 1 and release[-1] == 0:  # 4.57 == 4.57.0
        release.pop()
    pre = (_PRE_ORDER[m["pre_l"].lower()], int(m["pre_n"] or 0)) if m["pre_l"] else None
    post_n = m["post_n1"] or (m["post_n2"] or "0" if m["post_l"] else None)
    post = (int(post_n),) if post_n is not None else (-_INF,)
    dev = (int(m["dev_n"] or 0),) if m["dev_l"] else (_INF,)
    if pre is None:
        # a dev release with no pre/post sorts before every pre-release of the same version
        pre = (-_INF, 0) if m["dev_l"] and post_n is None else (_INF, 0)
    if m["local"]:  # numeric local segments sort above alphanumeric ones; any local sorts above none
        local = tuple((0, int(p), "") if p.isdigit() else (-1, 0, p.lower()) for p in re.split(r"[-_.]", m["local"]))
    else:
        local = ((-2, 0, ""),)
    return (int(m["epoch"] or 0), tuple(release), pre, post, dev, local)


def mistral_regex_in_force(folder: Path, base_vocab_size: int, fix_mistral_regex: bool = True) -> bool:
    """Whether transformers 4.57.3, loading ``folder`` with ``fix_mistral_regex``, swaps in the Mistral regex.

    Mirrors ``PreTrainedTokenizerBase._patch_mistral_regex`` for a local folder: no ``config.json`` → no patch;
    a version ≤ 4.57.2 with a non-Mistral ``model_type`` → no patch; a version ≥ 5 → no patch; anything else
    (4.57.2 < version < 5, version missing, or old version with a Mistral/missing model_type) → patch.
    """
    if not fix_mistral_regex or base_vocab_size <= _PATCH_MIN_VOCAB:
        return False
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        version = config.get("transformers_version")
        model_type = config.get("model_type")
        key = version_key(version) if version else None
    except (ValueError, AttributeError, TypeError) as e:
        raise TokenizerFileError(f"{config_path}: cannot read transformers_version/model_type ({e})") from e
    if key is not None and key <= version_key("4.57.2"):
        if model_type is not None and model_type not in _MISTRAL_MODEL_TYPES:
            return False
    elif key is not None and key >= version_key("5.0.0"):
        return False
    return True


# --- file readers ------------------------------------------------------------------------------------------
def _read_json(path: Path) -> object:
    if not path.is_file():
        raise TokenizerFileError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFileError(f"{path}: not valid UTF-8 JSON ({e})") from e


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerFileError(f"{path}: expected a non-empty JSON object mapping token -> id")
    bad = next((k for k, v in vocab.items() if type(v) is not int or v < 0), None)
    if bad is not None:
        raise TokenizerFileError(f"{path}: id of token {bad!r} is not a non-negative integer")
    if len(set(vocab.values())) != len(vocab):
        raise TokenizerFileError(f"{path}: two tokens share an id")
    return vocab


def _read_merges(path: Path, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Parse merges.txt the way the Qwen2 tokenizer does (skip a leading '#version:' line and blank lines)."""
    if not path.is_file():
        raise TokenizerFileError(f"{path}: file not found")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path}: not valid UTF-8 ({e})") from e
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if (lineno == 1 and line.startswith("#version:")) or not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerFileError(f"{path}:{lineno}: expected two space-separated tokens, got {raw!r}")
        a, b = parts
        for tok in (a, b, a + b):
            if tok not in vocab:
                raise TokenizerFileError(f"{path}:{lineno}: {tok!r} is not in vocab.json")
        if (a, b) not in seen:  # a repeated merge keeps its first rank, as the Qwen2 tokenizer's dict does
            seen.add((a, b))
            merges.append((a, b))
    if not merges:
        raise TokenizerFileError(f"{path}: no merges")
    return merges


def _read_added_tokens(path: Path) -> list[tuple[int, AddedToken]]:
    config = _read_json(path)
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    if not isinstance(decoder, dict):
        raise TokenizerFileError(f"{path}: expected an 'added_tokens_decoder' object")
    added = []
    try:
        for index, spec in decoder.items():
            flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
            # absent flags keep the library defaults, as transformers' AddedToken(**entry) does
            token = AddedToken(spec["content"], **{k: bool(spec[k]) for k in flags if k in spec})
            added.append((int(index), token))
    except (KeyError, TypeError, ValueError) as e:
        raise TokenizerFileError(f"{path}: malformed added_tokens_decoder entry ({e!r})") from e
    return sorted(added, key=lambda item: item[0])


class TextTokenizer:
    """Text → ids for the talker; same ids as upstream ``Qwen3TTSProcessor`` / ``Qwen2TokenizerFast``."""

    def __init__(self, tokenizer: Tokenizer, pretokenizer_regex_name: str, folder: Path):
        self._tok = tokenizer
        self.pretokenizer_regex_name = pretokenizer_regex_name  # "qwen2" or "mistral"
        self.folder = folder

    @classmethod
    def from_dir(cls, path: str | Path, fix_mistral_regex: bool = True) -> TextTokenizer:
        """Load ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` (and consult ``config.json``).

        ``fix_mistral_regex=True`` is what upstream's inference wrapper passes; keep it to match upstream.
        """
        folder = Path(path)
        vocab = _read_vocab(folder / "vocab.json")
        merges = _read_merges(folder / "merges.txt", vocab)
        added = _read_added_tokens(folder / "tokenizer_config.json")

        bpe = models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.NFC()
        use_mistral = mistral_regex_in_force(folder, len(vocab), fix_mistral_regex)
        regex = MISTRAL_REGEX if use_mistral else QWEN2_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                # bytes → GPT-2 printable characters; the regex above already did the splitting
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.encode_special_tokens = False  # added tokens in the text are matched, not split into bytes

        # Added tokens take the next free ids in order, so they land at their ids only if the block is contiguous
        # from the end of vocab.json; transformers adds them the same way (one add_tokens call, sorted by id).
        if added:
            tok.add_tokens([t for _, t in added])
        for index, token in added:
            got = tok.token_to_id(token.content)
            if got != index:
                raise TokenizerFileError(
                    f"{folder / 'tokenizer_config.json'}: added token {token.content!r} declared at id {index} "
                    f"but lands at {got} (vocab.json has {len(vocab)} entries)"
                )
        return cls(tok, "mistral" if use_mistral else "qwen2", folder)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added (upstream ``processor(text=text).input_ids[0]``)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (upstream ``processor.decode``; ``clean_up_tokenization_spaces`` is off for Qwen2)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary or added token string, or None if unknown."""
        return self._tok.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        """Token string of an id (byte-level form for vocabulary tokens), or None if unknown."""
        return self._tok.id_to_token(index)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (same name as transformers' attribute)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids in use, added tokens included (the embedding table may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"TextTokenizer({str(self.folder)!r}, vocab_size={self.vocab_size}, regex={self.pretokenizer_regex_name})"


def nfc(text: str) -> str:
    """The normalisation applied before tokenising: ``decode(encode(x)) == nfc(x)`` for text without added tokens."""
    return unicodedata.normalize("NFC", text)
