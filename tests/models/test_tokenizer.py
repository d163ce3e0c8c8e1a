"""Tokenizer loading, round trips, streaming detokenization and chat templates, on the tiny
locally trained tokenizers of conftest.py (CPU only, no downloads)."""
from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from tpaserve.models.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplateError
from tpaserve.models.detokenizer import CONTEXT_TOKENS, IncrementalDetokenizer
from tpaserve.models.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerLoadError,
    TokenizerNotFoundError,
    load_tokenizer,
)

from .conftest import train_spm

UNICODE_TEXT = "naïve café 日本語 😀 Ünïcödé"
TEXTS = [UNICODE_TEXT, "hello world", "  two  spaces\nand a newline 😀😀",
         "Über straße über ö"]
FORMATS = ["spm", "bpe", "gpt2"]


@pytest.fixture(scope="module")
def tokenizers(spm_tokenizer_dir: Path, bpe_tokenizer_dir: Path,
               gpt2_tokenizer_dir: Path) -> dict[str, Tokenizer]:
    return {"spm": load_tokenizer(spm_tokenizer_dir), "bpe": load_tokenizer(bpe_tokenizer_dir),
            "gpt2": load_tokenizer(gpt2_tokenizer_dir)}


@pytest.fixture(params=FORMATS)
def tok(request: pytest.FixtureRequest, tokenizers: dict[str, Tokenizer]) -> Tokenizer:
    return tokenizers[request.param]


# --- discovery -----------------------------------------------------------------------------

def test_discovery_from_dir_and_file(spm_tokenizer_dir: Path, bpe_tokenizer_dir: Path,
                                     gpt2_tokenizer_dir: Path) -> None:
    assert isinstance(load_tokenizer(spm_tokenizer_dir), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(spm_tokenizer_dir / "tokenizer.model"),
                      SentencePieceTokenizer)
    for path in (bpe_tokenizer_dir, bpe_tokenizer_dir / "tokenizer.json", gpt2_tokenizer_dir,
                 gpt2_tokenizer_dir / "vocab.json", gpt2_tokenizer_dir / "merges.txt"):
        tok = load_tokenizer(path)
        assert isinstance(tok, HFTokenizer), path
        assert tok.name_or_path == str(path)


def test_discovery_in_tokenizer_subdir(tmp_path: Path, spm_tokenizer_dir: Path) -> None:
    shutil.copytree(spm_tokenizer_dir, tmp_path / "tokenizer")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


def test_tokenizer_json_preferred_over_other_formats(tmp_path: Path, spm_tokenizer_dir: Path,
                                                     bpe_tokenizer_dir: Path) -> None:
    shutil.copy(spm_tokenizer_dir / "tokenizer.model", tmp_path)
    shutil.copy(bpe_tokenizer_dir / "tokenizer.json", tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_not_found_lists_every_place_and_how_to_pass_one(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TokenizerNotFoundError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    for d in (tmp_path, tmp_path / "tokenizer"):
        for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
            assert str(d / name) in message
    assert "--tokenizer PATH" in message and "GPT-2" in message
    assert len(info.value.searched) == 6
    assert isinstance(info.value, ValueError)


def test_not_found_for_missing_path_and_half_gpt2_pair(tmp_path: Path,
                                                       gpt2_tokenizer_dir: Path) -> None:
    with pytest.raises(TokenizerNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    shutil.copy(gpt2_tokenizer_dir / "vocab.json", tmp_path)
    with pytest.raises(TokenizerNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path / "vocab.json")


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"])
def test_corrupt_file_names_the_file(tmp_path: Path, bpe_tokenizer_dir: Path, name: str) -> None:
    if name == "tokenizer_config.json":
        shutil.copy(bpe_tokenizer_dir / "tokenizer.json", tmp_path)
    (tmp_path / name).write_bytes(b"\x00not a tokenizer{")
    with pytest.raises(TokenizerLoadError, match=str(tmp_path / name)):
        load_tokenizer(tmp_path)


# --- encode / decode -------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_sentencepiece_byte_fallback_and_bos(tokenizers: dict[str, Tokenizer]) -> None:
    tok = tokenizers["spm"]
    ids = tok.encode(UNICODE_TEXT)
    assert ids[0] == tok.bos_token_id == 1
    assert tok.encode(UNICODE_TEXT, add_special_tokens=False) == ids[1:]
    emoji = "😀".encode()
    assert [tok.token_bytes(i) for i in tok.encode("😀", add_special_tokens=False)[-4:]] == \
        [emoji[k:k + 1] for k in range(4)]
    # token_bytes concatenate to the text, with sentencepiece's dummy-prefix space in front.
    assert b"".join(tok.token_bytes(i) for i in ids[1:]) == (" " + UNICODE_TEXT).encode()


@pytest.mark.parametrize("fmt", ["bpe", "gpt2"])
def test_byte_level_token_bytes(tokenizers: dict[str, Tokenizer], fmt: str) -> None:
    tok = tokenizers[fmt]
    ids = tok.encode(UNICODE_TEXT)
    assert b"".join(tok.token_bytes(i) for i in ids) == UNICODE_TEXT.encode()
    assert tok.encode("a<|endoftext|>")[-1] == 0  # a special token is matched whole in text


def test_convert_ids_to_tokens_printable(tok: Tokenizer) -> None:
    ids = tok.encode(UNICODE_TEXT)
    tokens = tok.convert_ids_to_tokens(ids)
    assert len(tokens) == len(ids)
    assert all(isinstance(t, str) and "\ufffd" not in t for t in tokens)
    assert any(t.startswith("bytes:\\x") for t in tokens)  # the emoji's lone bytes


def test_special_tokens_skipped_or_shown(tok: Tokenizer) -> None:
    ids = tok.encode("hello") + [tok.eos_token_id]
    assert tok.decode(ids) == "hello"
    eos_text = "</s>" if isinstance(tok, SentencePieceTokenizer) else "<|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=False).endswith(eos_text)
    assert tok.eos_token_id in tok.all_special_ids


def test_decode_rejects_ids_outside_vocab(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=str(tok.vocab_size)):
        tok.decode([1, tok.vocab_size])


# --- eos / bos -------------------------------------------------------------------------------

def test_eos_bos_detection(tokenizers: dict[str, Tokenizer]) -> None:
    assert (tokenizers["spm"].eos_token_id, tokenizers["spm"].bos_token_id) == (2, 1)
    assert tokenizers["bpe"].eos_token_id == 0       # tokenizer_config.json eos_token
    # GPT-2 layout, no config: <|endoftext|> is both, as in GPT-2; nothing is prepended.
    assert (tokenizers["gpt2"].eos_token_id, tokenizers["gpt2"].bos_token_id) == (0, 0)
    assert tokenizers["gpt2"].encode("hi")[0] != 0


def test_eos_from_tokenizer_config_name(tmp_path: Path, bpe_tokenizer_dir: Path) -> None:
    shutil.copy(bpe_tokenizer_dir / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "bos_token": "<|im_start|>"}))
    tok = load_tokenizer(tmp_path, config={"eos_token_id": 7})
    assert (tok.eos_token_id, tok.bos_token_id) == (2, 1)


def test_eos_bos_fall_back_to_model_config(tmp_path: Path) -> None:
    train_spm(tmp_path, bos_id=-1, eos_id=-1)
    tok = load_tokenizer(tmp_path, config={"eos_token_id": 5, "bos_token_id": 6})
    assert (tok.eos_token_id, tok.bos_token_id) == (5, 6)
    assert {5, 6} <= tok.all_special_ids
    assert tok.encode("hello")[0] != 6  # BOS is prepended only if the tokenizer has one
    assert load_tokenizer(tmp_path).eos_token_id is None


# --- streaming detokenization -----------------------------------------------------------------

def stream(tok: Tokenizer, ids: list[int], chunks: list[int], prompt: Sequence[int] = (),
           skip_special_tokens: bool = True) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens)
    deltas, at = [], 0
    for size in chunks:
        deltas.append(detok.step(ids[at:at + size]))
        at += size
        assert detok.text == "".join(deltas)
    assert at == len(ids)
    deltas.append(detok.finish())
    return detok, deltas


def random_chunks(rng: random.Random, n: int) -> list[int]:
    chunks = []
    while sum(chunks) < n:
        chunks.append(min(rng.randint(1, 4), n - sum(chunks)))
    return chunks


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunking", ["single", "random"])
def test_streaming_equals_full_decode(tok: Tokenizer, text: str, chunking: str) -> None:
    ids = tok.encode(text)
    rng = random.Random(len(text))
    chunks = [1] * len(ids) if chunking == "single" else random_chunks(rng, len(ids))
    detok, deltas = stream(tok, ids, chunks)
    assert detok.text == "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)  # no half characters on the way


def test_streaming_continues_a_prompt(tok: Tokenizer) -> None:
    """Output after a prompt is what it adds to the prompt's text: sentencepiece's
    leading space of the first output piece is kept."""
    text = "hello world naïve café 😀 über"
    ids = tok.encode(text, add_special_tokens=False)
    for k in range(1, len(ids)):
        head = tok.decode(ids[:k])
        if "\ufffd" in head:
            continue  # the prompt would end inside a character
        detok, deltas = stream(tok, ids[k:], [1] * (len(ids) - k), prompt=ids[:k])
        assert head + detok.text == text, k
        assert all("\ufffd" not in d for d in deltas)
    prompt, ids = tok.encode("hello"), tok.encode("hello world")
    assert ids[:len(prompt)] == prompt
    detok, _ = stream(tok, ids[len(prompt):], [1] * (len(ids) - len(prompt)), prompt=prompt)
    assert detok.text == " world"


def test_streaming_skips_or_shows_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("café 😀") + [tok.eos_token_id]
    for skip in (True, False):
        detok, _ = stream(tok, ids, [1] * len(ids), skip_special_tokens=skip)
        assert detok.text == tok.decode(ids, skip_special_tokens=skip)


def test_streaming_invalid_bytes_is_emitted_not_held(tokenizers: dict[str, Tokenizer]) -> None:
    """Lone continuation bytes can never become a character: they are emitted as U+FFFD as
    they come, and finish() matches the full decode."""
    tok = tokenizers["spm"]
    lone = tok.encode("😀", add_special_tokens=False)[-1]  # the emoji's last byte, 0x80
    assert tok.token_bytes(lone) == b"\x80"
    ids = tok.encode("a", add_special_tokens=False) + [lone] * 20 + tok.encode("b")[1:]
    detok = IncrementalDetokenizer(tok)
    for n, i in enumerate(ids):
        detok.step([i])
        assert len(detok._ids) - detok._prefix <= 2, n  # nothing piles up
    detok.finish()
    assert detok.text == tok.decode(ids)


def test_streaming_window_stays_short(tokenizers: dict[str, Tokenizer],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Amortised O(new tokens): every decode sees a short window, however long the output."""
    tok = tokenizers["bpe"]
    ids = tok.encode(" ".join([UNICODE_TEXT] * 30))
    sizes: list[int] = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda i, s=True: sizes.append(len(i)) or decode(i, s))
    detok, _ = stream(tok, ids, [1] * len(ids), prompt=ids[:50])
    assert detok.text == decode(ids)
    assert max(sizes) <= CONTEXT_TOKENS + 4  # a 4-byte emoji is the longest hold


# --- chat templates ---------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be terse."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                         {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}]


def test_default_chat_template(tokenizers: dict[str, Tokenizer]) -> None:
    tok = tokenizers["spm"]
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.apply_chat_template(MESSAGES) == (
        "System: Be terse.\nUser: Hi there\nAssistant: Hello.\nUser: Bye\nAssistant:")
    assert tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=False) == (
        "System: Be terse.\nUser: Hi there")
    assert tok.apply_chat_template([{"role": "developer", "content": "x"},
                                    {"role": "tool", "content": None}]) == (
        "Developer: x\nTool: \nAssistant:")


def test_chat_template_from_tokenizer_config(tokenizers: dict[str, Tokenizer]) -> None:
    tok = tokenizers["bpe"]
    assert "<|im_start|>" in tok.chat_template
    assert tok.apply_chat_template(MESSAGES[:2]) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_chat_template_variables_and_raise_exception(tmp_path: Path,
                                                     bpe_tokenizer_dir: Path) -> None:
    shutil.copy(bpe_tokenizer_dir / "tokenizer.json", tmp_path)
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                "{% endif %}{{ bos_token }}|{{ messages | tojson }}|{{ eos_token }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == (
        '<|im_start|>|[{"role": "user", "content": "é"}]|<|im_end|>')
    with pytest.raises(ChatTemplateError, match="user first"):
        tok.apply_chat_template(MESSAGES)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "wizard", "content": "x"}], "'wizard'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "'image_url'"),
    ([{"role": "user", "content": 3}], "content must be"),
    (["hello"], "must be an object"),
])
def test_chat_template_rejects_bad_messages(tokenizers: dict[str, Tokenizer],
                                            messages: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tokenizers["spm"].apply_chat_template(messages)


def test_chat_template_syntax_error_names_the_file(tmp_path: Path,
                                                   bpe_tokenizer_dir: Path) -> None:
    shutil.copy(bpe_tokenizer_dir / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
