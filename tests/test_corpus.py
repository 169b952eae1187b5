"""Corpus loading, splits, tokenization cache (never stale), and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest

from umim.corpus import (
    CorpusError,
    load_documents,
    tokenize_documents,
    tokenized_corpus,
)
from umim.datamodule import pack_blocks
from umim.fingerprint import tokenizer_fingerprint


def test_local_splits_are_disjoint_and_complete(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"paragraph {i} text" for i in range(40)))
    splits = {s: load_documents(str(tmp_path), s) for s in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [36, 2, 2]
    assert set(splits["train"]).isdisjoint(splits["test"]) and set(splits["validation"]).isdisjoint(splits["test"])


def test_builtin_corpora_have_text():
    assert len(load_documents("pydoc", "test")) > 50
    assert len(load_documents("fortunes", "test")) > 50


def test_token_cache_follows_file_edits(tmp_path, tiny_tokenizer):
    corpus, cache = tmp_path / "c", tmp_path / "cache"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox\n\nthe lazy dog")
    fp = tokenizer_fingerprint(tiny_tokenizer)
    ids1, off1 = tokenized_corpus(str(corpus), "train", tiny_tokenizer, fp, cache, progress=False)
    again, _ = tokenized_corpus(str(corpus), "train", tiny_tokenizer, fp, cache, progress=False)
    assert np.array_equal(ids1, again) and len(list(cache.glob("*.npz"))) == 1
    (corpus / "a.txt").write_text("a fox and a dog\n\nthe lazy dog")
    ids2, _ = tokenized_corpus(str(corpus), "train", tiny_tokenizer, fp, cache, progress=False)
    ref, _ = tokenize_documents(load_documents(str(corpus), "train"), tiny_tokenizer, progress=False)
    assert np.array_equal(ids2, ref) and not np.array_equal(ids1, ids2)
    for f in cache.glob("*.npz"):  # a corrupted cache entry is rebuilt, not trusted
        f.write_bytes(b"garbage")
    ids3, _ = tokenized_corpus(str(corpus), "train", tiny_tokenizer, fp, cache, progress=False)
    assert np.array_equal(ids3, ref)


def test_bad_corpora_raise_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="no .txt"):
        load_documents(str(tmp_path / "missing"), "train")
    (tmp_path / "empty.txt").write_text("   \n\n  ")
    with pytest.raises(CorpusError, match="holds no text"):
        load_documents(str(tmp_path / "empty.txt"), "train")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        load_documents(str(tmp_path / "bad.jsonl"), "train")
    with pytest.raises(CorpusError, match="unknown split"):
        load_documents("pydoc", "dev")


def test_pack_blocks_inserts_separators_and_drops_the_tail():
    ids = np.arange(10, dtype=np.int32)
    blocks = pack_blocks(ids, np.array([0, 4, 10]), block_size=4, sep=99)
    assert blocks.tolist() == [[0, 1, 2, 3], [99, 4, 5, 6]]
    assert pack_blocks(ids, np.array([0, 10]), 20, sep=None).shape == (0, 20)
