"""Shared fixtures: tiny real tokenizers trained in-process (no network, no downloaded files)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEXT_A = [
    "the quick brown fox jumps over the lazy dog",
    "the lazy dog sleeps while the quick brown fox runs",
    "a fox and a dog are friends in the story of the forest",
    "once upon a time in the forest there was a quick fox",
]

TEXT_B = [
    "language models predict the next token of a sequence",
    "merging frequent token spans reduces the sequence length",
    "a small merge module pools span embeddings into one vector",
    "distillation aligns the student with the teacher distribution",
]


def make_tiny_tokenizer(lines, vocab_size: int = 200, name: str = "tiny-bpe"):
    """Train a tiny byte-less BPE on ``lines`` and wrap it as a ``PreTrainedTokenizerFast``.

    Different training texts give different vocabularies (and so different fingerprints).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]"], show_progress=False)
    tok.train_from_iterator(list(lines), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.name_or_path = name
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A tiny real tokenizer trained on ``TEXT_A``."""
    return make_tiny_tokenizer(TEXT_A, name="tiny-a")


@pytest.fixture(scope="session")
def other_tiny_tokenizer():
    """A tiny real tokenizer trained on ``TEXT_B`` (different vocabulary from ``tiny_tokenizer``)."""
    return make_tiny_tokenizer(TEXT_B, name="tiny-b")


@pytest.fixture(scope="session")
def tiny_tokenizer_factory():
    """The builder itself, for tests that need a tokenizer trained on their own text."""
    return make_tiny_tokenizer
