"""Outputs never destroy what UMIM did not write: rules and merger saves refuse foreign folders,
replace their own whole, leave nothing half-written, and the CLIs say so in one line (exit 2)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from umim.cli import main
from umim.merging.merger import MergeModule, MergerConfig, is_merger_dir
from umim.rules.store import MergeRules, is_rules_dir
from umim.safe_io import OutputError, write_text_atomic


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _rules() -> MergeRules:
    return MergeRules(ngrams={2: np.array([[1, 2]])}, counts={2: np.array([7])}, tokenizer=None)


def _foreign(tmp_path: Path) -> Path:
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("my thesis")
    (d / "sub" / "data.bin").write_bytes(os.urandom(64))
    return d


@pytest.mark.parametrize("save", ["rules", "merger"])
def test_a_foreign_folder_is_refused_and_untouched(tmp_path, save):
    d = _foreign(tmp_path)
    before = tree_hash(d)
    with pytest.raises(OutputError, match="refusing to replace"):
        if save == "rules":
            _rules().save(d)
        else:
            MergeModule(MergerConfig(hidden_size=8, num_heads=2)).save_pretrained(d)
    assert tree_hash(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left behind


def test_own_folders_are_replaced_whole(tmp_path):
    _rules().save(tmp_path / "r")
    other = MergeRules(ngrams={3: np.array([[4, 5, 6]])}, counts={3: np.array([9])}, tokenizer=None)
    other.save(tmp_path / "r")
    assert is_rules_dir(tmp_path / "r") and list(MergeRules.load(tmp_path / "r").ngrams) == [3]
    m = MergeModule(MergerConfig(hidden_size=8, num_heads=2))
    m.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        m.query.add_(1.0)
    m.save_pretrained(tmp_path / "m")
    assert is_merger_dir(tmp_path / "m")
    assert torch.equal(MergeModule.from_pretrained(tmp_path / "m").query, m.query)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "r"]
    (tmp_path / "empty").mkdir()
    _rules().save(tmp_path / "empty")  # an empty folder is fine
    with pytest.raises(OutputError, match="is a file"):
        _rules().save(tmp_path / "r" / "rules.json")


def test_saves_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _rules().save(tmp_path / "r")
        write_text_atomic(tmp_path / "t.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "r").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "t.json").stat().st_mode & 0o777 == 0o644


def test_umim_mine_refuses_a_foreign_out_folder(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join("the quick brown fox jumps over the lazy dog" for _ in range(40)))
    d = _foreign(tmp_path)
    before = tree_hash(d)
    tok = tmp_path / "tok"
    from tests.conftest import make_tiny_tokenizer

    make_tiny_tokenizer(["the quick brown fox jumps over the lazy dog"]).save_pretrained(tok)
    assert main(["mine", "--tokenizer", str(tok), "--data", str(corpus), "--min-count", "2", "--out", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(d) in err[0] and "refusing to replace" in err[0]
    assert tree_hash(d) == before


def _save_many(args):
    path, seed = args
    for i in range(10):
        rules = MergeRules(ngrams={2: np.array([[seed, i]])}, counts={2: np.array([seed * 100 + i])}, tokenizer=None)
        rules.save(path)
    return True


def test_concurrent_saves_to_one_folder_never_fail_or_mix(tmp_path):
    """Saves race: each is swapped in whole (the last writer wins), none fails, nothing is left aside."""
    from concurrent.futures import ProcessPoolExecutor

    target = tmp_path / "rules"
    with ProcessPoolExecutor(4) as pool:
        assert all(pool.map(_save_many, [(target, s) for s in range(1, 9)]))
    rules = MergeRules.load(target)
    (a, b), = rules.ngrams[2].tolist()
    assert rules.counts[2].tolist() == [a * 100 + b]  # one save's n-gram with that same save's count
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rules"]


def test_a_foreign_rules_json_or_ktoken_folder_is_not_taken_for_ours(tmp_path):
    from umim.ktoken.encoder import KTokenConfig, KTokenEncoder

    d = tmp_path / "project"
    d.mkdir()
    (d / "rules.json").write_text('{"format": "my-linter-rules"}')
    (d / "config.json").write_text('{"model_type": "llama"}')
    before = tree_hash(d)
    with pytest.raises(OutputError):
        _rules().save(d)
    with pytest.raises(OutputError):
        KTokenEncoder(KTokenConfig(hidden_size=8, k=2)).save_pretrained(d)
    assert tree_hash(d) == before


def test_a_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    import umim.safe_io as safe_io

    _rules().save(tmp_path / "r")
    before = tree_hash(tmp_path / "r")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder's move into place
            raise PermissionError(13, "denied")
        return real(src, dst)

    monkeypatch.setattr(safe_io.os, "replace", flaky)
    with pytest.raises(PermissionError):
        MergeRules(ngrams={3: np.array([[4, 5, 6]])}, counts={3: np.array([9])}, tokenizer=None).save(tmp_path / "r")
    monkeypatch.undo()
    assert tree_hash(tmp_path / "r") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
