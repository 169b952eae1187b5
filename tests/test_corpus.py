"""Corpus loading, splits, tokenization cache (never stale), and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest

from umim.fingerprint import tokenizer_fingerprint
from umim.rules.corpus import (
    CorpusError,
    load_documents,
    tokenize_documents,
    tokenized_corpus,
)
from umim.training.datamodule import pack_blocks


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


# -- hf: corpora from local folders in the hub layouts -----------------------------------------------
ROWS = {s: [{"text": f" = {s} heading {i} = "} if i % 5 == 0 else {"text": ""} if i % 5 == 1 else
            {"text": f"{s} paragraph number {i} about the quick brown fox"} for i in range(60)]
        for s in ("train", "validation", "test")}


def _expected(split: str) -> list[str]:
    return [r["text"] for r in ROWS[split] if r["text"].strip()]


def test_hf_parquet_and_jsonl_hub_layouts(tmp_path):
    import datasets

    for fmt in ("parquet", "json"):
        root = tmp_path / fmt / "data"
        root.mkdir(parents=True)
        for split, rows in ROWS.items():
            ds = datasets.Dataset.from_list(rows)
            if fmt == "parquet":
                ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
            else:
                ds.to_json(str(root / f"{split}.jsonl"))
        for split in ROWS:
            # headings are documents of their own, blank rows are dropped
            assert load_documents(f"hf:{tmp_path / fmt}", split) == _expected(split)


def test_hf_save_to_disk_folder(tmp_path):
    import datasets

    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in ROWS.items()}).save_to_disk(str(tmp_path / "d"))
    assert load_documents(f"hf:{tmp_path / 'd'}", "validation") == _expected("validation")
    datasets.Dataset.from_list(ROWS["train"]).save_to_disk(str(tmp_path / "single"))  # a Dataset: train only
    assert load_documents(f"hf:{tmp_path / 'single'}", "test") == _expected("train")[19::20]


def test_hf_train_only_dataset_gets_a_deterministic_carve_out(tmp_path):
    import datasets

    root = tmp_path / "t" / "data"
    root.mkdir(parents=True)
    datasets.Dataset.from_list(ROWS["train"]).to_parquet(str(root / "train-00000-of-00001.parquet"))
    spec = f"hf:{tmp_path / 't'}"
    splits = {s: load_documents(spec, s) for s in ("train", "validation", "test")}
    docs = _expected("train")
    assert splits["validation"] == docs[18::20] and splits["test"] == docs[19::20]
    assert sorted(splits["train"] + splits["validation"] + splits["test"]) == sorted(docs)
    assert splits == {s: load_documents(spec, s) for s in splits}  # deterministic
    with pytest.raises(CorpusError, match="no column 'body'"):
        load_documents(spec, "train", text_field="body")
