"""Hash-based n-gram counting over shards (a corpus larger than memory) and per-stage filter reporting."""

from __future__ import annotations

import gc
import weakref
from collections import Counter

import numpy as np
import pytest

from umim.fingerprint import tokenizer_fingerprint
from umim.rules.corpus import load_documents, tokenize_documents, tokenized_shards
from umim.rules.mining import (
    apply_filters,
    count_ngrams,
    count_ngrams_sharded,
    mine_rules,
    mine_rules_sharded,
)
from umim.rules.store import MergeRules


def _fp(vocab: int) -> dict:
    return {"name": "synthetic", "vocab_size": int(vocab), "vocab_sha256": "0" * 64}


def _split_into_shards(ids: np.ndarray, offsets: np.ndarray, doc_cuts: list[int]):
    """In-memory shards of whole documents: shard s holds documents doc_cuts[s]..doc_cuts[s+1]-1."""
    parts = []
    for a, b in zip(doc_cuts[:-1], doc_cuts[1:]):
        off = offsets[a : b + 1] - offsets[a]
        parts.append((ids[offsets[a] : offsets[b]].copy(), off))
    return [lambda p=p: p for p in parts]


def _reference(ids, offsets, n, min_count):
    c: Counter = Counter()
    for a, b in zip(offsets[:-1], offsets[1:]):
        d = ids[a:b].tolist()
        c.update(zip(*(d[k:] for k in range(n))))
    return {g: k for g, k in c.items() if k >= min_count}


def _as_dict(grams, counts):
    return {tuple(int(t) for t in g): int(c) for g, c in zip(grams, counts)}


def _same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for n in a:
        np.testing.assert_array_equal(a[n][0], b[n][0])
        np.testing.assert_array_equal(a[n][1], b[n][1])


@pytest.mark.parametrize("min_count", [1, 3, 6])
def test_sharded_counts_equal_counting_the_concatenation(min_count):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 6, size=int(rng.integers(0, 50))).tolist() for _ in range(40)]
    ids = np.array([t for d in docs for t in d], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    whole = count_ngrams(ids, offsets, (2, 3, 4), min_count, progress=False)
    # shards of uneven size, one of them empty; an n-gram is frequent only over all shards together
    shards = _split_into_shards(ids, offsets, [0, 3, 3, 17, 30, 40])
    _same(count_ngrams_sharded(shards, (2, 3, 4), min_count, progress=False), whole)
    for n in (2, 3, 4):
        assert _as_dict(*whole[n]) == _reference(ids, offsets, n, min_count)


def test_int128_keys_for_many_distinct_frequent_tokens():
    """(U + 1)^4 >= 2^63 for U > 55,108 frequent tokens: 4-grams need 128-bit keys; counts stay exact."""
    rng = np.random.default_rng(1)
    V = 128_256
    ids = rng.integers(0, V, size=240_000)
    ids[rng.integers(0, len(ids) - 4, size=50)[:, None] + np.arange(4)] = [V - 1, 70_000, 65_536, 3]
    cuts = np.sort(rng.choice(np.arange(1, len(ids)), size=500, replace=False))
    offsets = np.concatenate([[0], cuts, [len(ids)]]).astype(np.int64)
    assert len(np.unique(ids)) > 55_108
    out = count_ngrams(ids, offsets, (2, 3, 4), min_count=1, progress=False)
    for n in (2, 3, 4):
        assert _as_dict(*out[n]) == _reference(ids, offsets, n, 1)
    sharded = count_ngrams_sharded(_split_into_shards(ids, offsets, [0, 200, 501]), (4,), 2, progress=False)
    assert _as_dict(*sharded[4]) == _reference(ids, offsets, 4, 2)
    assert (V - 1, 70_000, 65_536, 3) in _as_dict(*sharded[4])


def test_shards_are_read_one_at_a_time():
    """Bounded memory: a shard's arrays are freed before the next shard is loaded, and each counting
    pass (unigrams, then n = 2, 3, 4) reads every shard exactly once, in order."""
    rng = np.random.default_rng(2)
    shards, alive, log = [], [], []

    def loader(s, ids, off):
        def load():
            gc.collect()
            assert all(r() is None for r in alive), "an earlier shard is still held while loading another"
            log.append(s)
            arr = ids.copy()  # a fresh array per read, as a file read gives
            alive.append(weakref.ref(arr))
            return arr, off
        return load

    for s in range(4):
        lens = rng.integers(1, 30, size=10)
        shards.append(loader(s, rng.integers(0, 5, size=int(lens.sum())), np.concatenate([[0], np.cumsum(lens)])))
    rules = mine_rules_sharded(shards, _fp(5), min_count=4, progress=False)
    assert len(rules) > 0
    # 4 counting passes, plus none for filtering
    assert log == [0, 1, 2, 3] * 4


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_sharded_local_dataset_mines_the_same_rules_as_in_memory(tmp_path, tiny_tokenizer, layout,
                                                                   monkeypatch):
    import datasets

    from umim.rules import corpus as corpus_module

    docs = load_documents("pydoc", "train")[:600]
    rows = [{"text": d} for d in docs] + [{"text": "  "}]  # a blank row is no document
    spec = f"hf:{tmp_path / 'd'}"
    if layout == "save_to_disk":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "d"),
                                                                                        num_shards={"train": 3})
    else:
        (tmp_path / "d" / "data").mkdir(parents=True)
        for s in range(3):
            part = tmp_path / "d" / "data" / f"train-{s:05d}-of-00003.parquet"
            datasets.Dataset.from_list(rows[s::3]).to_parquet(str(part))
    monkeypatch.setattr(corpus_module, "ROWS_PER_SHARD", 150)  # several shards even when the arrow cache is one file
    shards, num_docs = tokenized_shards(spec, "train", tiny_tokenizer, tmp_path / "tokens", progress=False)
    ref_docs = load_documents(spec, "train")
    assert len(shards) >= 3 and num_docs == len(ref_docs)
    ids, offsets = tokenize_documents(ref_docs, tiny_tokenizer, progress=False)
    assert sum(s()[0].size for s in shards) == ids.size
    fp = tokenizer_fingerprint(tiny_tokenizer)
    whole = mine_rules(ids, offsets, fp, min_count=5, progress=False)
    sharded = mine_rules_sharded(shards, fp, min_count=5, progress=False)
    assert whole.tokens_scanned == sharded.tokens_scanned == ids.size
    assert len(whole) > 50
    for n in (2, 3, 4):
        np.testing.assert_array_equal(whole.ngrams[n], sharded.ngrams[n])
        np.testing.assert_array_equal(whole.counts[n], sharded.counts[n])
    assert whole.marginal_by_filter == sharded.marginal_by_filter
    # the unfiltered counts agree too (the filters could hide a counting difference)
    _same(count_ngrams(ids, offsets, (2, 3, 4), 2, progress=False),
          count_ngrams_sharded(shards, (2, 3, 4), 2, progress=False))


def test_max_tokens_keeps_whole_documents_across_shards(tmp_path, tiny_tokenizer, monkeypatch):
    import datasets

    from umim.rules import corpus as corpus_module

    docs = load_documents("pydoc", "train")[:90]
    datasets.Dataset.from_list([{"text": d} for d in docs]).save_to_disk(str(tmp_path / "d"), num_shards=3)
    ids, offsets = tokenize_documents(load_documents(f"hf:{tmp_path / 'd'}", "train"), tiny_tokenizer,
                                      progress=False)
    budget = int(offsets[40]) + 1  # documents 0..39 fit, the 41st does not
    monkeypatch.setattr(corpus_module, "ROWS_PER_SHARD", 20)
    shards, num_docs = tokenized_shards(f"hf:{tmp_path / 'd'}", "train", tiny_tokenizer, tmp_path / "t",
                                        max_tokens=budget, progress=False)
    assert len(shards) == 3  # the budget ends in the third of five shards
    got = np.concatenate([s()[0] for s in shards])
    assert num_docs == 40 and np.array_equal(got, ids[: offsets[40]])


# -- what each filter stage changed --------------------------------------------------------------------


def _rules_without(ids, offsets, filters, skip):
    r = mine_rules(ids, offsets, _fp(6), min_count=3, filters=[f for f in filters if f != skip], progress=False)
    return {n: {tuple(g) for g in r.ngrams[n].tolist()} for n in r.ngrams}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_marginal_removals_are_what_the_final_set_would_hold_without_the_stage(seed):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 6, size=int(rng.integers(2, 60))).tolist() for _ in range(40)]
    ids = np.array([t for d in docs for t in d], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    rules = mine_rules(ids, offsets, _fp(6), min_count=3, progress=False)
    final = {n: {tuple(g) for g in rules.ngrams[n].tolist()} for n in rules.ngrams}
    for stage in ("intra", "inter"):
        without = _rules_without(ids, offsets, ("intra", "inter"), stage)
        assert rules.marginal_by_filter[stage] == {n: len(without[n] - final[n]) for n in final}
    # inter removes every sub-n-gram of a longer kept rule, which covers intra's prefix/suffix removals
    assert rules.marginal_by_filter["intra"] == {2: 0, 3: 0, 4: 0}
    assert sum(rules.removed_by_filter["intra"].values()) > 0  # intra did remove rows, which inter would have
    # alone, a stage's marginal removals are its removals
    alone = mine_rules(ids, offsets, _fp(6), min_count=3, filters=("intra",), progress=False)
    assert alone.marginal_by_filter == alone.removed_by_filter


def test_apply_filters_without_stages_changes_nothing():
    g = {2: np.array([[1, 2], [2, 3]]), 3: np.array([[1, 2, 3]])}
    c = {2: np.array([5, 5]), 3: np.array([5])}
    kept, counts, removed, marginal = apply_filters(g, c, [])
    assert removed == marginal == {} and all(np.array_equal(kept[n], g[n]) for n in g)


def test_marginal_by_filter_round_trips_and_older_files_load(tmp_path):
    import json

    ids = np.array([1, 2, 3] * 5 + [1, 2] * 3, dtype=np.int64)
    offsets = np.array([0] + [3 * (i + 1) for i in range(5)] + [15 + 2 * (i + 1) for i in range(3)])
    rules = mine_rules(ids, offsets, _fp(4), min_count=2, max_n=3, progress=False)
    rules.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "rules.json").read_text())
    assert meta["marginal_by_filter"] == {s: {str(n): k for n, k in d.items()}
                                          for s, d in rules.marginal_by_filter.items()}
    assert MergeRules.load(tmp_path / "r").marginal_by_filter == rules.marginal_by_filter
    del meta["marginal_by_filter"]  # a file written before the field existed
    (tmp_path / "r" / "rules.json").write_text(json.dumps(meta))
    old = MergeRules.load(tmp_path / "r")
    assert old.marginal_by_filter == {} and old.removed_by_filter == rules.removed_by_filter


def test_umim_mine_reports_what_each_stage_changed(tmp_path, tiny_tokenizer, capsys):
    import datasets

    from umim.cli import main

    docs = load_documents("pydoc", "train")[:200]
    datasets.Dataset.from_list([{"text": d} for d in docs]).save_to_disk(str(tmp_path / "d"), num_shards=2)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    assert main(["mine", "--tokenizer", str(tmp_path / "tok"), "--data", f"hf:{tmp_path / 'd'}", "--min-count", "4",
                 "--out", str(tmp_path / "rules")]) == 0
    out = capsys.readouterr().out
    rules = MergeRules.load(tmp_path / "rules")
    assert "2 shard(s)" in out
    for n, k in rules.num_rules().items():
        m = rules.marginal_by_filter
        assert f"  {n}-grams: {k:,} (-{m['intra'][n]:,} by intra, -{m['inter'][n]:,} by inter)" in out
    assert set(rules.marginal_by_filter["intra"].values()) == {0}


def test_carve_out_indexes_documents_across_shards(tmp_path, monkeypatch):
    """A train-only dataset read in shards gives the same train/validation/test documents as read whole."""
    import datasets

    from umim.rules import corpus as corpus_module
    from umim.rules.corpus import document_shards

    docs = [f"document {i} about topic {i % 7}" for i in range(130)]
    datasets.Dataset.from_list([{"text": d} for d in docs]).save_to_disk(str(tmp_path / "d"), num_shards=3)
    spec = f"hf:{tmp_path / 'd'}"
    monkeypatch.setattr(corpus_module, "ROWS_PER_SHARD", 17)  # shard edges fall inside the 20-document cycle
    parts = {s: list(document_shards(spec, s)) for s in ("train", "validation", "test")}
    assert len(parts["train"]) == 8
    assert sum(parts["validation"], []) == docs[18::20] and sum(parts["test"], []) == docs[19::20]
    assert sum(parts["train"], []) == [d for i, d in enumerate(docs) if i % 20 < 18]
