"""On-disk format of merge rules: round trip, corruption handling, atomic save, tokenizer checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TEXT_A, make_tiny_tokenizer

from umim.fingerprint import TokenizerMismatchError, tokenizer_fingerprint
from umim.rules.mining import mine_rules
from umim.rules.store import FORMAT, VERSION, MergeRules, RulesFileError


def fp(vocab_size: int = 50) -> dict:
    return {"name": "synthetic", "vocab_size": vocab_size, "vocab_sha256": "ab" * 32}


def sample_rules(offset: int = 0) -> MergeRules:
    return MergeRules(
        ngrams={
            2: np.array([[1, 2], [3, 4], [5 + offset, 6]]),
            3: np.array([[7, 8, 9]]),
            4: np.array([[10, 11, 12, 13], [1, 1, 1, 1]]),
        },
        counts={2: np.array([30, 20, 10]), 3: np.array([8]), 4: np.array([6, 5])},
        tokenizer=fp(),
        min_count=5,
        n_range=(2, 4),
        filters=["intra", "inter"],
        corpus="unit-test corpus",
        tokens_scanned=12345,
        removed_by_filter={"intra": {2: 3, 3: 1, 4: 0}, "inter": {4: 0, 3: 2, 2: 7}},
    )


def assert_same_rules(a: MergeRules, b: MergeRules) -> None:
    assert sorted(a.ngrams) == sorted(b.ngrams)
    for n in a.ngrams:
        np.testing.assert_array_equal(a.ngrams[n], b.ngrams[n])
        np.testing.assert_array_equal(a.counts[n], b.counts[n])
        assert b.ngrams[n].dtype == np.int64 and b.counts[n].dtype == np.int64
    assert a.metadata() == b.metadata()
    assert a.removed_by_filter == b.removed_by_filter
    assert a.n_range == b.n_range and isinstance(b.n_range, tuple)


# -- round trip --------------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    rules = sample_rules()
    out = rules.save(tmp_path / "rules")
    assert out == tmp_path / "rules"
    assert sorted(p.name for p in out.iterdir()) == ["rules.json", "rules.safetensors"]
    loaded = MergeRules.load(out)
    assert_same_rules(rules, loaded)
    assert loaded.min_count == 5 and loaded.corpus == "unit-test corpus" and loaded.tokens_scanned == 12345
    assert loaded.filters == ["intra", "inter"]
    assert loaded.removed_by_filter == {"intra": {2: 3, 3: 1, 4: 0}, "inter": {4: 0, 3: 2, 2: 7}}
    assert loaded.tokenizer == fp()
    assert loaded.num_rules() == {2: 3, 3: 1, 4: 2}
    assert len(loaded) == 6
    # the matcher of the loaded rules segments like the original
    ids = [1, 2, 7, 8, 9, 10, 11, 12, 13, 3, 4, 0]
    assert loaded.segment(ids) == rules.segment(ids) == [(0, 2), (2, 3), (5, 4), (9, 2), (11, 1)]


def test_metadata_on_disk(tmp_path):
    sample_rules().save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "rules.json").read_text())
    assert meta["format"] == FORMAT and meta["version"] == VERSION
    assert meta["num_rules"] == {"2": 3, "3": 1, "4": 2}
    assert meta["tokenizer"] == fp()
    assert meta["n_range"] == [2, 4]


def test_load_accepts_rules_json_path(tmp_path):
    rules = sample_rules()
    rules.save(tmp_path / "r")
    assert_same_rules(rules, MergeRules.load(tmp_path / "r" / "rules.json"))
    assert_same_rules(rules, MergeRules.load(str(tmp_path / "r")))


def test_round_trip_of_mined_rules_with_empty_levels(tmp_path):
    docs = [[1, 2, 3]] * 5 + [[1, 2]] * 3
    ids = np.array([t for d in docs for t in d])
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    rules = mine_rules(ids, offsets, fp(4), min_count=2, corpus="tiny", progress=False)
    assert rules.num_rules() == {2: 0, 3: 1, 4: 0}
    rules.save(tmp_path / "m")
    loaded = MergeRules.load(tmp_path / "m")
    assert_same_rules(rules, loaded)
    assert loaded.ngrams[2].shape == (0, 2) and loaded.ngrams[4].shape == (0, 4)


# -- corrupted / missing / wrong version -----------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "rules"
    sample_rules().save(path)
    return path


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00\x9c garbage", b"{not json", b"", b"\x00" * 64])
def test_corrupted_json(saved, garbage):
    (saved / "rules.json").write_bytes(garbage)
    with pytest.raises(RulesFileError, match="corrupted"):
        MergeRules.load(saved)


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"rules"', '{"format": "something-else", "version": 1}', "{}"])
def test_json_of_another_format(saved, content):
    (saved / "rules.json").write_text(content)
    with pytest.raises(RulesFileError, match="not a UMIM merge-rules file"):
        MergeRules.load(saved)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_wrong_version(saved, version):
    meta = json.loads((saved / "rules.json").read_text())
    meta["version"] = version
    (saved / "rules.json").write_text(json.dumps(meta))
    with pytest.raises(RulesFileError, match="version"):
        MergeRules.load(saved)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0])
def test_truncated_safetensors(saved, keep):
    f = saved / "rules.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(RulesFileError, match="corrupted"):
        MergeRules.load(saved)


def test_garbage_safetensors(saved):
    (saved / "rules.safetensors").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(RulesFileError, match="corrupted"):
        MergeRules.load(saved)


@pytest.mark.parametrize("missing", ["rules.json", "rules.safetensors"])
def test_missing_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(RulesFileError, match="not a merge-rules directory"):
        MergeRules.load(saved)


def test_missing_directory(tmp_path):
    with pytest.raises(RulesFileError, match="not a merge-rules directory"):
        MergeRules.load(tmp_path / "does-not-exist")


def test_inconsistent_arrays(saved):
    from safetensors.numpy import save_file

    save_file(
        {"ngrams_2": np.zeros((3, 3), dtype=np.int64), "counts_2": np.zeros(3, dtype=np.int64)},
        str(saved / "rules.safetensors"),
    )
    with pytest.raises(RulesFileError, match="inconsistent"):
        MergeRules.load(saved)
    save_file({"ngrams_2": np.zeros((3, 2), dtype=np.int64)}, str(saved / "rules.safetensors"))
    with pytest.raises(RulesFileError, match="inconsistent"):
        MergeRules.load(saved)


def test_counts_length_mismatch_in_constructor():
    with pytest.raises(RulesFileError, match="counts"):
        MergeRules(ngrams={2: np.array([[1, 2], [3, 4]])}, counts={2: np.array([5])}, tokenizer=fp())


# -- atomic save -------------------------------------------------------------------------------------


def test_save_over_existing_dir_replaces_it(tmp_path):
    path = tmp_path / "rules"
    first, second = sample_rules(), sample_rules(offset=10)
    first.save(path)
    (path / "stale.txt").write_text("left over")
    second.save(path)
    assert sorted(p.name for p in path.iterdir()) == ["rules.json", "rules.safetensors"]
    loaded = MergeRules.load(path)
    assert_same_rules(second, loaded)
    assert loaded.ngrams[2][2].tolist() == [15, 6]
    # no temporary directories left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["rules"]


def test_failed_tensor_write_keeps_previous_rules(tmp_path, monkeypatch):
    import safetensors.numpy

    path = tmp_path / "rules"
    old = sample_rules()
    old.save(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def boom(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:  # write half a file, then die
            f.write(b"\x10\x00")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        sample_rules(offset=10).save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert_same_rules(old, MergeRules.load(path))
    assert [p.name for p in tmp_path.iterdir()] == ["rules"]


def test_failed_metadata_write_keeps_previous_rules(tmp_path, monkeypatch):
    path = tmp_path / "rules"
    old = sample_rules()
    old.save(path)

    def boom(self):
        raise RuntimeError("metadata exploded")

    monkeypatch.setattr(MergeRules, "metadata", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        sample_rules(offset=10).save(path)
    monkeypatch.undo()
    assert_same_rules(old, MergeRules.load(path))
    assert [p.name for p in tmp_path.iterdir()] == ["rules"]


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("nope")))
    with pytest.raises(OSError):
        sample_rules().save(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


# -- tokenizer fingerprint ---------------------------------------------------------------------------


def test_fingerprints_of_tiny_tokenizers(tiny_tokenizer, other_tiny_tokenizer):
    a, b = tokenizer_fingerprint(tiny_tokenizer), tokenizer_fingerprint(other_tiny_tokenizer)
    assert a["vocab_sha256"] != b["vocab_sha256"]
    assert a["vocab_size"] == max(tiny_tokenizer.get_vocab().values()) + 1
    assert a["name"] == "tiny-a"
    # deterministic: the same training text gives the same fingerprint (names do not matter)
    again = tokenizer_fingerprint(make_tiny_tokenizer(TEXT_A, name="renamed"))
    assert (again["vocab_size"], again["vocab_sha256"]) == (a["vocab_size"], a["vocab_sha256"])


def mined_with(tokenizer) -> MergeRules:
    ids_per_line = [tokenizer(line)["input_ids"] for line in TEXT_A * 3]
    ids = np.array([t for line in ids_per_line for t in line])
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids_per_line])])
    return mine_rules(ids, offsets, tokenizer_fingerprint(tokenizer), min_count=3, filters=(), progress=False)


def test_rules_refuse_another_tokenizer(tmp_path, tiny_tokenizer, other_tiny_tokenizer):
    rules = mined_with(tiny_tokenizer)
    assert len(rules) > 0
    rules.save(tmp_path / "r")
    loaded = MergeRules.load(tmp_path / "r", tokenizer=tiny_tokenizer)
    assert_same_rules(rules, loaded)
    loaded.check_tokenizer(tiny_tokenizer)
    with pytest.raises(TokenizerMismatchError, match="tiny-a") as info:
        MergeRules.load(tmp_path / "r", tokenizer=other_tiny_tokenizer)
    assert "tiny-b" in str(info.value)
    with pytest.raises(TokenizerMismatchError):
        loaded.check_tokenizer(other_tiny_tokenizer)
    # a freshly built identical tokenizer is accepted
    MergeRules.load(tmp_path / "r", tokenizer=make_tiny_tokenizer(TEXT_A, name="rebuilt"))


def test_tokenizer_mismatch_is_a_value_error():
    assert issubclass(TokenizerMismatchError, ValueError)
    assert issubclass(RulesFileError, ValueError)
