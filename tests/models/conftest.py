"""Tiny tokenizers of every supported format, trained locally (no downloads), once per session.

  spm_tokenizer_dir   tokenizer.model: sentencepiece BPE, byte_fallback, identity
                      normalization (Llama-style), <unk>=0 <s>=1 </s>=2
  bpe_tokenizer_dir   tokenizer.json (byte-level BPE) + tokenizer_config.json with a ChatML
                      chat template and eos_token "<|endoftext|>"
  gpt2_tokenizer_dir  vocab.json + merges.txt of the same BPE (GPT-2 layout, no config)
Special tokens of the BPE: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2.
The corpus has accents and CJK but no emoji and no "ö", so those go through byte tokens.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS_WORDS = ("naïve café hello world the quick brown fox jumps over lazy dog 日本 語 "
                "本日 Über straße über é à ç tensor product attention serving engine "
                "cache tokens, numbers 123 456. Ünï").split()
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(3, 12)))
            for _ in range(lines)]


def train_spm(directory: Path, **options: object) -> Path:
    """A tiny sentencepiece model at directory/tokenizer.model; `options` override."""
    directory.mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = dict(
        model_type="bpe", vocab_size=320, byte_fallback=True, hard_vocab_limit=False,
        character_coverage=1.0, num_threads=1,
        # Llama-style: keep text as is (no NFKC, no whitespace squeezing) so it round-trips.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True)
    settings.update(options)
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus()), model_prefix=str(directory / "tokenizer"),
            logstream=quiet, **settings)
    return directory / "tokenizer.model"


def train_byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=BPE_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok


@pytest.fixture(scope="session")
def byte_level_bpe() -> Tokenizer:
    return train_byte_level_bpe()


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("spm_tokenizer")
    train_spm(directory)
    return directory


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory,
                      byte_level_bpe: Tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("bpe_tokenizer")
    byte_level_bpe.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}))
    return directory


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory,
                       byte_level_bpe: Tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("gpt2_tokenizer")
    byte_level_bpe.model.save(str(directory))  # writes vocab.json and merges.txt
    return directory
