"""Mergers, rules and runs on the Hugging Face hub, tested offline: a real hub cache layout in tmp
(``HF_HUB_CACHE``) with ``HF_HUB_OFFLINE=1``, and ``HfApi`` uploads replaced by commits into that
cache, so a push is loaded back through the same ``snapshot_download`` a real download ends in."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXT_A

from umim import hub
from umim.errors import UserError
from umim.fingerprint import TokenizerMismatchError, tokenizer_fingerprint
from umim.hub import HubError, HubRepoMissing, push_run, resolve_run
from umim.merging.merger import CONFIG_NAME, WEIGHTS_NAME, MergeModule, MergerConfig
from umim.module_io import ModuleFileMissing
from umim.rules.mining import mine_rules
from umim.rules.store import MergeRules, RulesFileError

D, H = 16, 4


# -- a hub cache laid out as huggingface_hub writes it ------------------------------------------------


def repo_dir(cache: Path, repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=repo_id, repo_type="model")


def commit_to_cache(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
    """Commit ``files`` (repo path -> bytes) on branch ``revision`` of ``repo_id`` in hub cache
    ``cache``: ``blobs/<sha256>`` hold the bytes, ``snapshots/<commit>/<path>`` link to them,
    ``refs/<revision>`` names the commit. Files of the branch's previous commit stay, as an upload
    only adds to a repo. Returns the commit hash."""
    root = repo_dir(cache, repo_id)
    ref = root / "refs" / revision
    parent = ref.read_text() if ref.exists() else ""
    tree = {}
    if parent:
        old = root / "snapshots" / parent
        tree = {p.relative_to(old).as_posix(): p.resolve() for p in old.rglob("*") if p.is_file()}
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        tree[path] = blob
    commit = hashlib.sha1((parent + "".join(f"{p}:{b.name}" for p, b in sorted(tree.items()))).encode()).hexdigest()
    snap = root / "snapshots" / commit
    for path, blob in tree.items():
        link = snap / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return commit


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in tmp and offline mode (huggingface_hub reads both at import, so its
    constants are set too)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def fake_hub(hub_cache, monkeypatch):
    """``HfApi`` whose create_repo / create_branch / upload_folder commit into ``hub_cache``; the calls
    are recorded as ``(name, kwargs)``."""
    from huggingface_hub import CommitInfo, HfApi, RepoUrl
    from huggingface_hub.utils import filter_repo_objects

    calls: list[tuple[str, dict]] = []
    repos: set[str] = set()

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        repos.add(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, *, branch, **kw):
        calls.append(("create_branch", {"repo_id": repo_id, "branch": branch, **kw}))
        main, ref = repo_dir(hub_cache, repo_id) / "refs" / "main", repo_dir(hub_cache, repo_id) / "refs" / branch
        if main.exists() and not ref.exists():  # a new branch starts at main
            shutil.copy(main, ref)

    def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None, allow_patterns=None, **kw):
        calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, "revision": revision,
                                        "commit_message": commit_message, "allow_patterns": allow_patterns, **kw}))
        assert repo_id in repos, "upload before create_repo"
        files = folder_files(Path(folder_path))
        kept = set(filter_repo_objects(list(files), allow_patterns=allow_patterns))
        commit = commit_to_cache(hub_cache, repo_id, {p: b for p, b in files.items() if p in kept}, revision or "main")
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}",
                          commit_message=commit_message, commit_description="", oid=commit)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


# -- tiny objects ---------------------------------------------------------------------------------------


def make_merger(fp: dict, seed: int) -> MergeModule:
    m = MergeModule(MergerConfig(hidden_size=D, num_heads=H, lm_name="tiny-lm", tokenizer=fp))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():  # not the mean-pooling init: a load must bring these exact values
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def assert_same_merger(a: MergeModule, b: MergeModule) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def make_rules(tokenizer, min_count: int = 3) -> MergeRules:
    ids_per_line = [tokenizer(line)["input_ids"] for line in TEXT_A * 3]
    ids = np.array([t for line in ids_per_line for t in line])
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids_per_line])])
    return mine_rules(ids, offsets, tokenizer_fingerprint(tokenizer), min_count=min_count, filters=(), progress=False)


def make_rules_stub() -> MergeRules:
    fp = {"name": "synthetic", "vocab_size": 50, "vocab_sha256": "ab" * 32}
    return MergeRules(ngrams={2: np.array([[1, 2]])}, counts={2: np.array([9])}, tokenizer=fp)


def assert_same_rules(a: MergeRules, b: MergeRules) -> None:
    assert len(a) > 0 and a.metadata() == b.metadata()
    for n in a.ngrams:
        np.testing.assert_array_equal(a.ngrams[n], b.ngrams[n])
        np.testing.assert_array_equal(a.counts[n], b.counts[n])


@pytest.fixture
def fp(tiny_tokenizer):
    return tokenizer_fingerprint(tiny_tokenizer)


def saved_run(root: Path, fp: dict, tokenizer, seed: int = 1) -> Path:
    """A ``umim fit``-like output: merger/, rules/ and a checkpoint that stays local."""
    make_merger(fp, seed).save_pretrained(root / "merger")
    make_rules(tokenizer).save(root / "rules")
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 64)
    return root


def assert_one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, UserError), msg
    for p in parts:
        assert p in msg, msg
    return msg


# -- loading from the hub cache ----------------------------------------------------------------------


def test_cache_layout_is_the_one_huggingface_hub_reads(hub_cache, tmp_path, fp):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    make_merger(fp, 0).save_pretrained(tmp_path / "m")
    commit = commit_to_cache(hub_cache, "org/merger", folder_files(tmp_path / "m"))
    (repo,) = scan_cache_dir(hub_cache).repos
    assert repo.repo_id == "org/merger" and repo.repo_type == "model"
    (rev,) = repo.revisions
    assert rev.commit_hash == commit and rev.refs == frozenset({"main"})
    assert sorted(f.file_name for f in rev.files) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    cached = try_to_load_from_cache("org/merger", WEIGHTS_NAME, cache_dir=hub_cache)
    assert Path(cached).read_bytes() == (tmp_path / "m" / WEIGHTS_NAME).read_bytes()


def test_merger_from_hub_cache_equals_the_saved_one(hub_cache, tmp_path, fp):
    m = make_merger(fp, 3)
    m.save_pretrained(tmp_path / "m")
    commit = commit_to_cache(hub_cache, "org/merger", folder_files(tmp_path / "m"))
    loaded = MergeModule.from_pretrained("org/merger", hidden_size=D, tokenizer_fp=fp)
    assert_same_merger(m, loaded)
    x = torch.randn(5, 4, D)
    assert torch.equal(m(x), loaded(x))
    # the checks of a local load hold for a hub load too
    with pytest.raises(UserError, match="hidden size"):
        MergeModule.from_pretrained("org/merger", hidden_size=2 * D)
    # a commit hash is a revision
    assert_same_merger(m, MergeModule.from_pretrained("org/merger", revision=commit))


def test_rules_from_hub_cache_equal_the_saved_ones(hub_cache, tmp_path, tiny_tokenizer, other_tiny_tokenizer):
    rules = make_rules(tiny_tokenizer)
    rules.save(tmp_path / "r")
    commit_to_cache(hub_cache, "org/rules", folder_files(tmp_path / "r"))
    assert_same_rules(rules, MergeRules.from_pretrained("org/rules", tokenizer=tiny_tokenizer))
    assert_same_rules(rules, MergeRules.load("org/rules", tokenizer=tiny_tokenizer))  # the old entry point too
    with pytest.raises(TokenizerMismatchError):
        MergeRules.from_pretrained("org/rules", tokenizer=other_tiny_tokenizer)


def test_revision_and_subfolder_pick_the_saved_version(hub_cache, tmp_path, fp, tiny_tokenizer):
    v1, v2 = make_merger(fp, 1), make_merger(fp, 2)
    v1.save_pretrained(tmp_path / "v1")
    v2.save_pretrained(tmp_path / "v2")
    rules = make_rules(tiny_tokenizer)
    rules.save(tmp_path / "r")
    main = commit_to_cache(hub_cache, "org/run", {**folder_files(tmp_path / "v1", "merger/"),
                                                  **folder_files(tmp_path / "r", "rules/")})
    shutil.copy(repo_dir(hub_cache, "org/run") / "refs" / "main", repo_dir(hub_cache, "org/run") / "refs" / "dev")
    commit_to_cache(hub_cache, "org/run", folder_files(tmp_path / "v2", "merger/"), revision="dev")

    assert_same_merger(v1, MergeModule.from_pretrained("org/run", subfolder="merger"))
    assert_same_merger(v2, MergeModule.from_pretrained("org/run", subfolder="merger", revision="dev"))
    assert_same_merger(v1, MergeModule.from_pretrained("org/run", subfolder="merger", revision=main))
    assert_same_rules(rules, MergeRules.from_pretrained("org/run", tiny_tokenizer, subfolder="rules", revision="dev"))
    with pytest.raises(HubError) as e:  # the repo root holds no merger
        MergeModule.from_pretrained("org/run")
    assert_one_line(e, "org/run", "merger", CONFIG_NAME)


def test_run_folder_from_hub_cache(hub_cache, tmp_path, fp, tiny_tokenizer):
    run = saved_run(tmp_path / "run", fp, tiny_tokenizer)
    commit_to_cache(hub_cache, "org/run", folder_files(run))
    folder = resolve_run("org/run")
    assert folder.is_relative_to(hub_cache.resolve())
    assert_same_merger(MergeModule.from_pretrained(run / "merger"), MergeModule.from_pretrained(folder / "merger"))
    assert_same_rules(MergeRules.load(run / "rules"), MergeRules.load(folder / "rules", tokenizer=tiny_tokenizer))
    # a local run folder is itself, and a missing local one is left to the loader (today's errors)
    assert resolve_run(run) == run == resolve_run(str(run))
    assert resolve_run(tmp_path / "no-run") == tmp_path / "no-run"
    assert resolve_run("runs/default/x") == Path("runs/default/x")
    with pytest.raises(HubRepoMissing) as e:
        resolve_run("org/no-run")
    assert_one_line(e, "org/no-run", "umim fit")
    commit_to_cache(hub_cache, "org/half-run", folder_files(run / "merger", "merger/"))
    with pytest.raises(HubError) as e:
        resolve_run("org/half-run")
    assert_one_line(e, "org/half-run", "rules")


def test_missing_repo_offline_is_a_one_line_error(hub_cache, tmp_path, fp, tiny_tokenizer):
    for load in (lambda: MergeModule.from_pretrained("org/missing"),
                 lambda: MergeRules.from_pretrained("org/missing", tokenizer=tiny_tokenizer),
                 lambda: MergeRules.load("org/missing")):
        with pytest.raises(HubRepoMissing) as e:
            load()
        assert isinstance(e.value, FileNotFoundError)
        assert_one_line(e, "org/missing", "HF_HUB_OFFLINE", "hub cache")
    make_merger(fp, 0).save_pretrained(tmp_path / "m")
    commit_to_cache(hub_cache, "org/merger", folder_files(tmp_path / "m"))
    with pytest.raises(HubRepoMissing) as e:  # the repo is cached, that revision is not
        MergeModule.from_pretrained("org/merger", revision="v9")
    assert_one_line(e, "org/merger", "v9")
    with pytest.raises(HubError) as e:  # a merger repo holds no rules
        MergeRules.from_pretrained("org/merger")
    assert_one_line(e, "org/merger", "rules.json")


def test_local_folders_work_as_before(hub_cache, tmp_path, monkeypatch, fp):
    monkeypatch.chdir(tmp_path)
    # missing folders keep today's errors, whether or not they could be a repo id
    for path in (tmp_path / "nothing", "nothing", "./org/name", "a/b/c"):
        with pytest.raises(ModuleFileMissing, match="is not a saved UMIM merger"):
            MergeModule.from_pretrained(path)
        with pytest.raises(RulesFileError, match="not a merge-rules directory"):
            MergeRules.load(path)
    # a local folder wins over a hub repo of the same name
    m = make_merger(fp, 4)
    m.save_pretrained(tmp_path / "org" / "merger")
    assert_same_merger(m, MergeModule.from_pretrained("org/merger"))
    assert_same_merger(m, MergeModule.from_pretrained("org", subfolder="merger"))
    assert not any(hub_cache.iterdir())
    with pytest.raises(HubError) as e:
        MergeModule.from_pretrained("org/merger", revision="main")
    assert_one_line(e, "org/merger", "revision")


# -- pushing --------------------------------------------------------------------------------------------


def test_merger_push_round_trip(fake_hub, hub_cache, fp):
    v1, v2 = make_merger(fp, 5), make_merger(fp, 6)
    info = v1.push_to_hub("org/pushed", private=True, commit_message="first merger")
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"]
    assert fake_hub[0][1] == {"repo_id": "org/pushed", "private": True, "exist_ok": True}
    up = fake_hub[1][1]
    assert up["commit_message"] == "first merger" and up["revision"] is None
    assert not Path(up["folder_path"]).exists()  # the temporary save is gone
    assert info.oid == (repo_dir(hub_cache, "org/pushed") / "refs" / "main").read_text()
    assert_same_merger(v1, MergeModule.from_pretrained("org/pushed", hidden_size=D, tokenizer_fp=fp))

    fake_hub.clear()
    v2.push_to_hub("org/pushed", revision="dev")
    assert [c[0] for c in fake_hub] == ["create_repo", "create_branch", "upload_folder"]
    assert fake_hub[1][1]["branch"] == "dev" and fake_hub[2][1]["revision"] == "dev"
    assert fake_hub[2][1]["commit_message"]  # a default message
    assert_same_merger(v2, MergeModule.from_pretrained("org/pushed", revision="dev"))
    assert_same_merger(v1, MergeModule.from_pretrained("org/pushed"))


def test_rules_push_round_trip(fake_hub, tiny_tokenizer):
    rules = make_rules(tiny_tokenizer)
    rules.push_to_hub("org/pushed-rules", commit_message="rules")
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"]
    assert_same_rules(rules, MergeRules.from_pretrained("org/pushed-rules", tokenizer=tiny_tokenizer))
    # a second push replaces the files on the same branch
    fewer = make_rules(tiny_tokenizer, min_count=6)
    assert len(fewer) < len(rules)
    fewer.push_to_hub("org/pushed-rules")
    assert_same_rules(fewer, MergeRules.load("org/pushed-rules"))


def test_run_push_round_trip(fake_hub, hub_cache, tmp_path, fp, tiny_tokenizer):
    run = saved_run(tmp_path / "run", fp, tiny_tokenizer, seed=7)
    push_run(run, "org/pushed-run", private=False)
    snap = resolve_run("org/pushed-run")
    assert sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()) == sorted(
        ["merger/" + CONFIG_NAME, "merger/" + WEIGHTS_NAME, "rules/rules.json", "rules/rules.safetensors"])
    assert_same_merger(MergeModule.from_pretrained(run / "merger"), MergeModule.from_pretrained(snap / "merger"))
    assert_same_rules(MergeRules.load(run / "rules"),
                      MergeRules.from_pretrained("org/pushed-run", tiny_tokenizer, subfolder="rules"))
    shutil.rmtree(run / "rules")
    with pytest.raises(HubError) as e:
        push_run(run, "org/pushed-run")
    assert_one_line(e, str(run / "rules"), "umim fit")


def test_push_refuses_a_bad_repo_id_before_saving(fake_hub, fp, tmp_path):
    for bad in ("not a repo id", str(tmp_path / "folder"), "name"):
        with pytest.raises(HubError) as e:
            make_merger(fp, 0).push_to_hub(bad)
        assert_one_line(e, repr(bad), "org/name")
    with pytest.raises(HubError):
        make_rules_stub().push_to_hub("a/b/c")
    assert fake_hub == [] and not (tmp_path / "folder").exists()


def test_push_offline_is_a_one_line_error(hub_cache, fp):
    # the real HfApi: offline mode stops it before the network
    with pytest.raises(HubError) as e:
        make_merger(fp, 0).push_to_hub("org/offline")
    assert_one_line(e, "org/offline", "HF_HUB_OFFLINE")


def test_is_repo_id():
    assert hub.is_repo_id("org/name") and hub.is_repo_id("runs/default") and hub.is_repo_id("Org/model-v1.5")
    for name in ("name", "/abs/path", "./org/name", "../org/name", "~/org", "a/b/c", "org/na me", "org//x", "",
                 Path("org/name")):
        assert not hub.is_repo_id(name), name


def test_model_args_read_a_hub_run_and_keep_local_names_local(hub_cache, tmp_path, fp, tiny_tokenizer,
                                                              monkeypatch):
    """``run_dir="org/name"`` resolves to the cached snapshot's merger/ and rules/; merger and rules
    given explicitly never look at run_dir; a missing ``runs/x`` under an existing ``runs/`` is a
    local folder (the loader names it), not a hub query."""
    from umim.hub import is_local
    from umim.inference.loading import ModelArgs

    commit_to_cache(hub_cache, "org/run", folder_files(saved_run(tmp_path / "run", fp, tiny_tokenizer)))
    merger, rules = ModelArgs(run_dir="org/run").merging_paths()
    assert Path(merger).parent == Path(rules).parent == resolve_run("org/run")
    assert ModelArgs(run_dir="org/no-run", merger="m", rules="r").merging_paths() == ("m", "r")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert is_local("runs/missing") and not is_local("org/missing")
    assert ModelArgs(run_dir="runs/missing").merging_paths() == ("runs/missing/merger", "runs/missing/rules")
