"""Shared fixtures: tiny real tokenizers trained in-process (no network, no downloaded files)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



@contextmanager
def benchmark_script(name: str) -> Iterator:
    """``benchmarks/<name>.py`` imported as module ``name`` while the block runs (registered in
    ``sys.modules``: the scripts' dataclasses resolve their annotations through it)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)


def pydoc_paragraphs(lo: int, hi: int) -> list[str]:
    """Real English text: the paragraphs of over 40 words of Python's help topics ``lo:hi`` (sorted)."""
    from pydoc_data.topics import topics

    return [p.strip() for k in sorted(topics)[lo:hi] for p in topics[k].split("\n\n") if len(p.split()) > 40]


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they spin-wait (up to
    100x slower). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def make_tiny_lm(arch: str, vocab: int, context: int = 128, eager: bool = False):
    """A seeded tiny real causal LM built from a config: ``"llama"`` (GQA, tied) or ``"gpt2"``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=True, initializer_range=0.2))
    else:
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=context,
                                        initializer_range=0.2, bos_token_id=0, eos_token_id=0))
    if eager:
        lm.set_attn_implementation("eager")  # attention weights are returned only by eager attention
    return lm.eval()


def make_tiny_llama_run(root: Path) -> Path:
    """``root/lm``: a seeded tiny Llama + a BPE tokenizer trained on Python's documentation, saved as a
    Hugging Face folder; ``root/corpus``: those 60 documents as local text files. Returns ``root``."""
    from pydoc_data.topics import topics

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [topics[k] for k in sorted(topics)[:60]]
    tok = make_tiny_tokenizer([line for t in texts for line in t.splitlines() if line.strip()], vocab_size=300)
    tok.add_special_tokens({"eos_token": "[PAD]"})
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        initializer_range=0.1,  # peaked next-token distributions, so merging visibly changes them
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, t in enumerate(texts):
        (corpus / f"{i:03d}.txt").write_text(t)
    return root
