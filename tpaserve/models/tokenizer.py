"""Tokenizers: one `Tokenizer` interface over sentencepiece and Hugging Face `tokenizers`.

Formats, looked for in this order in a directory (then in its `tokenizer/` subdirectory):
  tokenizer.json                (Hugging Face `tokenizers`)
  tokenizer.model               (sentencepiece)
  vocab.json + merges.txt       (GPT-2 byte-level BPE, assembled with `tokenizers`)
A path to one of those files selects it directly. `tokenizer_config.json` and
`chat_template.jinja` next to the tokenizer file supply eos/bos names and the chat template.

Invariants:
  * the ids a Tokenizer produces or accepts are exactly range(vocab_size); decode rejects
    others with a ValueError (the engine must not sample ids past vocab_size - a model's
    embedding is often padded beyond it);
  * eos/bos come from the tokenizer itself first (sentencepiece ids; tokenizer_config.json
    names; well-known special tokens such as GPT-2's <|endoftext|>), then from the model's
    config.json keys eos_token_id / bos_token_id; both are in all_special_ids;
  * encode adds only what the tokenizer is configured to add: sentencepiece prepends BOS when
    it has one, tokenizer.json runs its own post-processor, GPT-2 BPE adds nothing.
Errors at this edge: TokenizerNotFoundError (nothing found; says where it looked and how to
pass one) and TokenizerLoadError (a file exists but cannot be read); both are ValueErrors.
"""
from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tokenizers as hf

from tpaserve.exceptions import TokenizerLoadError, TokenizerNotFoundError
from tpaserve.models.chat_template import ChatTemplate

TOKENIZER_CONFIG = "tokenizer_config.json"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # byte-fallback pieces: "<0xE6>"
# Tried when tokenizer_config.json names no eos/bos. GPT-2 uses <|endoftext|> for both.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")

class TokenizerFormat(Enum):
    HF_JSON = ("tokenizer.json",)
    SENTENCEPIECE = ("tokenizer.model",)
    GPT2_BPE = ("vocab.json", "merges.txt")


def find_tokenizer(path: str | os.PathLike) -> tuple[TokenizerFormat, tuple[Path, ...]]:
    """The format and file(s) of the tokenizer at `path` (a directory or a tokenizer file)."""
    p = Path(path)
    if p.is_file():
        return _classify_file(p)
    if not p.exists():
        raise TokenizerNotFoundError(str(path), [str(p)], "the path does not exist")
    searched: list[str] = []
    for d in (p, p / "tokenizer"):
        for fmt in TokenizerFormat:
            files = tuple(d / name for name in fmt.value)
            searched.append(" + ".join(map(str, files)))
            if all(f.is_file() for f in files):
                return fmt, files
    raise TokenizerNotFoundError(str(path), searched)


def _classify_file(p: Path) -> tuple[TokenizerFormat, tuple[Path, ...]]:
    if p.suffix == ".model":
        return TokenizerFormat.SENTENCEPIECE, (p,)
    if p.name in TokenizerFormat.GPT2_BPE.value:
        files = (p.with_name("vocab.json"), p.with_name("merges.txt"))
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise TokenizerNotFoundError(
                str(p), [" + ".join(map(str, files))],
                "GPT-2 BPE needs vocab.json and merges.txt side by side; missing " +
                ", ".join(missing))
        return TokenizerFormat.GPT2_BPE, files
    if p.suffix == ".json":
        return TokenizerFormat.HF_JSON, (p,)
    raise TokenizerNotFoundError(
        str(p), [str(p)], "not a tokenizer file name (expected tokenizer.json or another "
        "*.json, a sentencepiece *.model, vocab.json or merges.txt)")


def _read_tokenizer_config(directory: Path) -> dict[str, Any]:
    file = directory / TOKENIZER_CONFIG
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerLoadError(f"cannot read {file}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_name(entry: Any) -> str | None:
    """tokenizer_config.json writes special tokens as "text" or {"content": "text", ...}."""
    if isinstance(entry, Mapping):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _config_id(config: Mapping[str, Any] | None, key: str) -> int | None:
    value = (config or {}).get(key)
    if isinstance(value, list):  # some configs list several eos ids; the first is canonical
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Tokenizer(ABC):
    """Text <-> ids for one model. Subclasses wrap one library; see the module invariants."""

    def __init__(self, name_or_path: str, vocab_size: int, eos_token_id: int | None,
                 bos_token_id: int | None, special_ids: frozenset[int], chat: ChatTemplate):
        self.name_or_path = name_or_path
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.all_special_ids = special_ids | {i for i in (eos_token_id, bos_token_id)
                                              if i is not None}
        self._chat = chat

    @property
    def chat_template(self) -> str:
        return self._chat.source

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Decode ids already range-checked (and stripped of specials when skipping)."""

    @abstractmethod
    def _token_text(self, id: int) -> str:
        """The vocabulary entry of `id` as the library stores it (piece / token string)."""

    @abstractmethod
    def token_bytes(self, id: int) -> bytes:
        """The raw bytes `id` contributes to text (special tokens: their text)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:8]} are outside the tokenizer's vocabulary "
                             f"[0, {self.vocab_size}) of {self.name_or_path}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        return self._decode(list(ids), skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Printable token strings; a token that is not whole UTF-8 shows as "bytes:\\xNN..."
        (the form OpenAI's logprobs use)."""
        out = []
        for i in ids:
            raw = self.token_bytes(i)
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("bytes:" + "".join(f"\\x{b:02x}" for b in raw))
        return out

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_kwargs) -> str:
        """`template_kwargs`: more template variables (vLLM's chat_template_kwargs)."""
        def text(i: int | None) -> str:
            return "" if i is None else self._token_text(i)
        return self._chat.render(messages, add_generation_prompt,
                                 bos_token=text(self.bos_token_id),
                                 eos_token=text(self.eos_token_id), **template_kwargs)

    def _check_id(self, id: int) -> None:
        if not 0 <= id < self.vocab_size:
            raise ValueError(f"token id {id} is outside [0, {self.vocab_size}) "
                             f"of {self.name_or_path}")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`. Control and unknown pieces are the special tokens."""

    def __init__(self, file: Path, name_or_path: str, config: Mapping[str, Any] | None,
                 chat: ChatTemplate):
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(file))
        except (OSError, RuntimeError) as e:
            raise TokenizerLoadError(f"cannot load sentencepiece model {file}: {e}") from e
        sp = self._sp
        n = sp.get_piece_size()
        self._pieces_special = frozenset(
            i for i in range(n) if sp.is_control(i) or sp.is_unknown(i))
        self._add_bos = sp.bos_id() >= 0
        eos = sp.eos_id() if sp.eos_id() >= 0 else _config_id(config, "eos_token_id")
        bos = sp.bos_id() if sp.bos_id() >= 0 else _config_id(config, "bos_token_id")
        super().__init__(name_or_path, n, eos, bos, self._pieces_special, chat)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._sp.encode(text)
        if add_special_tokens and self._add_bos:
            ids.insert(0, self._sp.bos_id())
        return ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self._sp.decode(ids)
        # sentencepiece decodes control pieces to "": decode the runs between them and show
        # each special piece as its text.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._pieces_special:
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def _token_text(self, id: int) -> str:
        return self._sp.id_to_piece(id)

    def token_bytes(self, id: int) -> bytes:
        self._check_id(id)
        piece = self._sp.id_to_piece(id)
        if self._sp.is_byte(id):
            return bytes([int(piece[3:5], 16)])
        if id in self._pieces_special:
            return piece.encode()
        return piece.replace("\u2581", " ").encode()  # "▁" marks a space


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table: printable Latin-1 bytes stand
    for themselves, the other 68 bytes map, in byte order, to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + k): b for k, b in enumerate(others)})
    return table


_BYTE_LEVEL_CHARS = _byte_level_alphabet()


def _decoder_types(tok: hf.Tokenizer) -> set[str]:
    """Types of the decoder and, for a Sequence, of its parts."""
    if tok.decoder is None:
        return set()
    spec = json.loads(tok.decoder.__getstate__())
    parts = spec.get("decoders") or [spec]
    return {d.get("type") for d in parts}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (from tokenizer.json or GPT-2 vocab+merges)."""

    def __init__(self, tok: hf.Tokenizer, name_or_path: str, tokenizer_config: Mapping[str, Any],
                 config: Mapping[str, Any] | None, chat: ChatTemplate):
        # A tokenizer.json may carry truncation/padding settings from training; serving must
        # never shorten or pad a prompt behind the engine's back.
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        added = tok.get_added_tokens_decoder()  # id -> AddedToken
        self._added = {i: t.content for i, t in added.items()}
        self._byte_level = "ByteLevel" in _decoder_types(tok)
        special = frozenset(i for i, t in added.items() if t.special)
        eos = self._find_id(tokenizer_config.get("eos_token"), _EOS_NAMES)
        bos = self._find_id(tokenizer_config.get("bos_token"), _BOS_NAMES)
        super().__init__(
            name_or_path, tok.get_vocab_size(with_added_tokens=True),
            eos if eos is not None else _config_id(config, "eos_token_id"),
            bos if bos is not None else _config_id(config, "bos_token_id"),
            special, chat)

    def _find_id(self, configured: Any, well_known: tuple[str, ...]) -> int | None:
        name = _token_name(configured)
        for candidate in ((name,) if name is not None else well_known):
            i = self._tok.token_to_id(candidate)
            if i is not None:
                return i
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _token_text(self, id: int) -> str:
        return self._tok.id_to_token(id) or ""

    def token_bytes(self, id: int) -> bytes:
        self._check_id(id)
        if id in self._added:
            return self._added[id].encode()
        token = self._tok.id_to_token(id)
        if token is None:  # a hole in a sparse vocabulary
            return b""
        if self._byte_level and all(c in _BYTE_LEVEL_CHARS for c in token):
            return bytes(_BYTE_LEVEL_CHARS[c] for c in token)
        if m := _BYTE_PIECE.fullmatch(token):
            return bytes([int(m[1], 16)])
        # Metaspace-style vocabularies mark spaces with "▁". (WordPiece "##" continuations
        # are returned as stored; no T6 tokenizer uses WordPiece.)
        return token.replace("\u2581", " ").encode()


def _load_hf(fmt: TokenizerFormat, files: tuple[Path, ...],
             tokenizer_config: Mapping[str, Any]) -> hf.Tokenizer:
    try:
        if fmt is TokenizerFormat.HF_JSON:
            return hf.Tokenizer.from_file(str(files[0]))
        tok = hf.Tokenizer(hf.models.BPE.from_file(str(files[0]), str(files[1])))
    except Exception as e:  # tokenizers raises bare Exception on a malformed file
        raise TokenizerLoadError(
            f"cannot load {fmt.name} tokenizer from {' + '.join(map(str, files))}: {e}") from e
    # GPT-2's setup: byte-level pre-tokenizer without a prefix space, byte-level decoder, and
    # its named special tokens matched as whole tokens in text.
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    names = {_token_name(tokenizer_config.get(k))
             for k in ("eos_token", "bos_token", "unk_token", "pad_token")}
    names |= {"<|endoftext|>"}
    tok.add_special_tokens([hf.AddedToken(n, special=True) for n in sorted(names - {None})
                            if tok.token_to_id(n) is not None])
    return tok


def load_tokenizer(path: str | os.PathLike,
                   config: Mapping[str, Any] | None = None) -> Tokenizer:
    """The tokenizer at `path` (checkpoint dir, tokenizer dir or tokenizer file). `config` is
    the model's config.json dict: its eos_token_id / bos_token_id fill in what the tokenizer
    lacks."""
    fmt, files = find_tokenizer(path)
    directory = files[0].parent
    tokenizer_config = _read_tokenizer_config(directory)
    chat = ChatTemplate.find(directory, tokenizer_config)
    if fmt is TokenizerFormat.SENTENCEPIECE:
        return SentencePieceTokenizer(files[0], str(path), config, chat)
    return HFTokenizer(_load_hf(fmt, files, tokenizer_config), str(path), tokenizer_config,
                       config, chat)
