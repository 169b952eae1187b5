"""Bad inputs meet ONE error surface: a table of user mistakes for every command and the Python API.

Contract checked by every row:

* command-line tools (``umim`` and ``umim-eval``, called in-process): exit code 2 and exactly one
  stderr line starting with ``error: `` that names the bad input (a path, an option or a value), no
  traceback. Usage errors of argparse/jsonargparse (``SystemExit(2)``) count as exit code 2; for
  them the code and the option's name anywhere in stderr are checked.
* Python API: an exception that is an instance of :class:`umim.errors.UserError` (a ValueError)
  whose message names the bad input.
* nothing lost: files that existed at paths a row points an output at are hashed before and after
  (relative path + bytes) and must be unchanged.
* refused before model work (rows marked ``before_work``): loading a model raises
  :class:`ModelWorkStarted`, so a runner that checks its settings only after loading its LM fails.

Rows use placeholders: ``<model>`` (tiny GPT-2 folder with its tokenizer), ``<llama>``, ``<corpus>``
(folder of .txt paragraphs), ``<run>`` (valid ``merger/`` + ``rules/``), ``<rules>``, ``<merger>``,
``<records>`` / ``<problems>`` (.jsonl for the summarization / math runners), and ``<tmp>`` (the
row's own empty folder, also the working directory while it runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# before anything imports huggingface_hub (tiny_families imports lightning): it reads these once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from conftest import TEXT_B, make_tiny_tokenizer
from tiny_families import build_all

from umim.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ================================================================================================
# fixtures: tiny real models, a corpus, a valid run folder, artifacts of another tokenizer / width
# ================================================================================================
@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    from transformers import AutoTokenizer

    from umim.cli import main as umim_main
    from umim.fingerprint import tokenizer_fingerprint
    from umim.merging.merger import MergeModule, MergerConfig
    from umim.rules.store import MergeRules

    root = tmp_path_factory.mktemp("badinput")
    assets = build_all(root / "assets")
    model, corpus = assets["gpt2"], assets["corpus"]
    rc = umim_main(["mine", "--tokenizer", str(model), "--data", str(corpus), "--min-count", "2",
                    "--out", str(root / "rules")])
    assert rc == 0, "the valid `umim mine` of the fixture failed"
    tok = AutoTokenizer.from_pretrained(model)
    fp = tokenizer_fingerprint(tok)
    torch.manual_seed(0)
    MergeModule(MergerConfig(hidden_size=32, tokenizer=fp)).save_pretrained(root / "merger")
    shutil.copytree(root / "merger", root / "run" / "merger")
    shutil.copytree(root / "rules", root / "run" / "rules")

    other_fp = tokenizer_fingerprint(make_tiny_tokenizer(TEXT_B, name="tiny-b"))
    MergeRules(ngrams={2: np.array([[3, 4]])}, counts={2: np.array([7])}, tokenizer=other_fp).save(
        root / "rules-other-tok")
    MergeModule(MergerConfig(hidden_size=32, tokenizer=other_fp)).save_pretrained(root / "merger-other-tok")
    MergeModule(MergerConfig(hidden_size=64, tokenizer=fp)).save_pretrained(root / "merger-d64")

    texts = [p.read_text().strip() for p in sorted(corpus.glob("*.txt"))]
    with open(root / "records.jsonl", "w") as f:
        for t in texts[:4]:
            f.write(json.dumps({"article": t, "highlights": t[:60]}) + "\n")
    with open(root / "problems.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n")
    return {"root": str(root), "model": str(model), "llama": str(assets["llama-tied"]), "corpus": str(corpus),
            "rules": str(root / "rules"), "merger": str(root / "merger"), "run": str(root / "run"),
            "rules_other_tok": str(root / "rules-other-tok"), "merger_other_tok": str(root / "merger-other-tok"),
            "merger_d64": str(root / "merger-d64"), "records": str(root / "records.jsonl"),
            "problems": str(root / "problems.jsonl")}


@pytest.fixture(scope="module")
def api(env):
    """Loaded objects for the Python API rows."""
    from transformers import AutoTokenizer

    from umim.fingerprint import tokenizer_fingerprint
    from umim.inference.generation import MergedLM
    from umim.lm import LMSpec

    tok = AutoTokenizer.from_pretrained(env["model"])
    merged = MergedLM.load(LMSpec(env["model"]), run_dir=env["run"], device="cpu")
    plain = MergedLM(merged.lm, merged.tokenizer)
    return {"tok": tok, "fp": tokenizer_fingerprint(tok), "merged": merged, "plain": plain}


# ================================================================================================
# the harness
# ================================================================================================
@dataclass
class Ctx:
    """What a row's setup and call see: the shared paths, the row's own folder, extra placeholders."""

    env: dict
    tmp: Path
    api: dict | None = None
    extra: dict = field(default_factory=dict)

    def fmt(self, s: str) -> str:
        values = {**self.env, "tmp": str(self.tmp), **self.extra}
        return re.sub(r"<(\w+)>", lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), s)

    def p(self, s: str) -> Path:
        return Path(self.fmt(s))


@dataclass
class Case:
    """One row: a bad input and how it must be refused."""

    id: str
    call: list[str] | Callable[[Ctx], object]
    """argv (with placeholders) of a command, or ``f(ctx)`` for the Python API."""
    frag: str | tuple[str, ...]
    """The error message must contain one of these (after placeholder expansion)."""
    setup: Callable[[Ctx], dict | None] | None = None
    keep: tuple[str, ...] = ()
    """Paths whose existing files must be unchanged afterwards."""
    before_work: bool = False
    """Refused before any model is loaded."""
    hint: tuple[str, ...] = ()
    """If given, the message must also contain one of these."""
    absent: tuple[str, ...] = ()
    """Texts that must not appear in the message (a misleading diagnosis)."""
    note: str = ""


class ModelWorkStarted(Exception):
    """Raised by the patched model loaders in ``before_work`` rows."""


def _no_model_work(monkeypatch):
    import transformers

    import umim.inference.generation
    import umim.lm

    def refuse(*a, **k):
        raise ModelWorkStarted("a model was loaded before the bad input was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(umim.lm, "load_lm", refuse)
    monkeypatch.setattr(umim.inference.generation, "load_lm", refuse, raising=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return {".": _sha(path)}
    if path.is_dir():
        return {str(f.relative_to(path)): _sha(f) for f in sorted(path.rglob("*")) if f.is_file()}
    return {}


def changed(path: Path, before: dict[str, str]) -> list[str]:
    bad = []
    for rel, h in before.items():
        f = path if rel == "." else path / rel
        if not f.is_file():
            bad.append(f"{f} (deleted)")
        elif _sha(f) != h:
            bad.append(f"{f} (modified)")
    return bad


def describe(e: BaseException) -> str:
    """``Type: message @ file:line`` (the innermost frame outside this file), then the traceback's last 3 lines."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != __file__]
    where = (f" @ {os.path.relpath(frames[-1].filename, ROOT)}:{frames[-1].lineno} in {frames[-1].name}"
             if frames else "")
    msg = " ".join(str(e).split())[:400]
    tail = "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip().splitlines()[-3:]
    return f"{type(e).__name__}: {msg}{where}\n  traceback tail:\n    " + "\n    ".join(tail)


def _frags(case: Case, ctx: Ctx) -> list[str]:
    f = case.frag if isinstance(case.frag, tuple) else (case.frag,)
    return [ctx.fmt(x) for x in f]


def _prepare(case: Case, ctx: Ctx, monkeypatch):
    monkeypatch.chdir(ctx.tmp)
    if case.setup is not None:
        ctx.extra.update(case.setup(ctx) or {})
    if case.before_work:
        _no_model_work(monkeypatch)
    return {k: (ctx.p(k), snapshot(ctx.p(k))) for k in case.keep}


def _check_kept(kept) -> None:
    lost = [c for path, before in kept.values() for c in changed(path, before)]
    assert not lost, "files that existed before were changed: " + ", ".join(lost)


def _check_message(case: Case, ctx: Ctx, msg: str, where: str) -> None:
    frags = _frags(case, ctx)
    assert any(f in msg for f in frags), f"{where} does not name the bad input (one of {frags!r}): {msg!r}"
    if case.hint:
        hints = [ctx.fmt(h) for h in case.hint]
        assert any(h in msg for h in hints), f"{where} lacks the hint (one of {hints!r}): {msg!r}"
    for a in case.absent:
        assert a not in msg, f"{where} holds the misleading text {a!r}: {msg!r}"
    if os.environ.get("UMIM_BADINPUT_LOG"):  # a file to list how each row was refused (for review)
        with open(os.environ["UMIM_BADINPUT_LOG"], "a") as f:
            f.write(f"{case.id}\t{' | '.join(msg.strip().splitlines()[-2:])}\n")


def check_cli(main, case: Case, ctx: Ctx, capfd, monkeypatch) -> None:
    kept = _prepare(case, ctx, monkeypatch)
    argv = [ctx.fmt(a) for a in case.call]
    capfd.readouterr()
    via_exit, exc = False, None
    try:
        code = main(argv)
    except SystemExit as e:
        via_exit = True
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - reported below
        code, exc = None, e
    err = capfd.readouterr().err
    try:
        if exc is not None:
            pytest.fail(f"expected exit 2 + one `error:` line; raised {describe(exc)}",
                        pytrace=False)
        last = next((ln for ln in reversed(err.splitlines()) if ln.strip()), "")
        assert code == 2, f"expected exit code 2, got {code!r}; stderr last line: {last!r}"
        assert "Traceback" not in err, f"stderr holds a traceback; last line: {last!r}"
        if via_exit:  # argparse / jsonargparse usage error
            _check_message(case, ctx, err, "the usage error")
        else:
            lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
            assert len(lines) == 1, f"expected exactly one `error: ` line on stderr, got {len(lines)}: {lines!r}"
            _check_message(case, ctx, lines[0], "the error line")
    finally:
        _check_kept(kept)


def check_api(case: Case, ctx: Ctx, monkeypatch) -> None:
    kept = _prepare(case, ctx, monkeypatch)
    try:
        try:
            case.call(ctx)
        except UserError as e:
            _check_message(case, ctx, str(e), f"the {type(e).__name__} message")
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"expected a UserError; raised {describe(e)}", pytrace=False)
        else:
            pytest.fail("expected a UserError; the call was accepted (no exception)", pytrace=False)
    finally:
        _check_kept(kept)


def ids(table):
    return [c.id for c in table]


# ================================================================================================
# setup helpers
# ================================================================================================
def files(spec: dict[str, str | bytes]):
    """Setup writing ``{relative path under <tmp>: text or bytes}``."""

    def setup(ctx: Ctx):
        for rel, data in spec.items():
            p = ctx.tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith("/"):
                p.mkdir(parents=True, exist_ok=True)
            elif isinstance(data, bytes):
                p.write_bytes(data)
            else:
                p.write_text(data)

    return setup


def copy_of(key: str, rel: str):
    """Setup copying the shared folder ``env[key]`` to ``<tmp>/rel``."""

    def setup(ctx: Ctx):
        dst = ctx.tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(ctx.env[key], dst)

    return setup


def run_like(rel: str):
    """A ``runs/default``-like training output: merger/, checkpoints/, metrics.json."""

    def setup(ctx: Ctx):
        copy_of("merger", f"{rel}/merger")(ctx)
        (ctx.tmp / rel / "checkpoints").mkdir(parents=True)
        (ctx.tmp / rel / "checkpoints" / "last.ckpt").write_bytes(os.urandom(256))
        (ctx.tmp / rel / "metrics.json").write_text('{"trained": {"tr": 0.2}}\n')

    return setup


def readonly_out(rel: str = "ro"):
    """``<out>``: a read-only folder (chmod 0o555); as root (which ignores permissions) a path under
    an existing file instead."""

    def setup(ctx: Ctx):
        if IS_ROOT:
            (ctx.tmp / "plain.txt").write_text("not a folder\n")
            return {"out": str(ctx.tmp / "plain.txt" / rel), "out_keep": str(ctx.tmp / "plain.txt")}
        d = ctx.tmp / rel
        d.mkdir()
        (d / "earlier.json").write_text("{}\n")
        os.chmod(d, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        ctx.extra["_restore"] = str(d)
        return {"out": str(d), "out_keep": str(d)}

    return setup


def valid_run(ctx: Ctx):
    copy_of("merger", "run/merger")(ctx)
    copy_of("rules", "run/rules")(ctx)


def _edit_json(path: Path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_tensors(path: Path, fn):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))


def _flip_tail(path: Path, xor: int, start: int, stop: int):
    b = bytearray(path.read_bytes())
    for i in range(len(b) - start, len(b) - stop):
        b[i] ^= xor
    path.write_bytes(bytes(b))


def _truncate(path: Path):
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


def _nan_merger(d: Path):
    from umim.merging.merger import MergeModule

    m = MergeModule.from_pretrained(d)
    with torch.no_grad():
        m.k_proj.weight.fill_(float("nan"))
    m.save_pretrained(d)


def _bitflip_finite(d: Path):
    """Flip one low mantissa bit of a k_proj weight: finite, plausible, but not what was saved."""
    from safetensors import safe_open

    f = d / "merger.safetensors"
    raw = f.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    start = 8 + header_len + header["k_proj.weight"]["data_offsets"][0]
    b = bytearray(raw)
    b[start + 4 * 37] ^= 0x01
    f.write_bytes(bytes(b))
    with safe_open(str(f), "pt") as g:  # still a loadable file with finite weights
        assert torch.isfinite(g.get_tensor("k_proj.weight")).all()


def _replace_with(key: str, what: str):
    def mut(d: Path, ctx: Ctx):
        shutil.rmtree(d)
        shutil.copytree(ctx.env[key], d)

    mut.needs_ctx = True
    return mut


MERGER_BAD: list[tuple[str, Callable]] = [
    ("nan-weights", _nan_merger),
    ("flipped-bytes", lambda d: _flip_tail(d / "merger.safetensors", 0xFF, 64, 8)),
    ("bitflip-finite", _bitflip_finite),
    ("hidden-size-string", lambda d: _edit_json(d / "config.json", hidden_size="576")),
    ("num-heads-0", lambda d: _edit_json(d / "config.json", num_heads=0)),
    ("version-99", lambda d: _edit_json(d / "config.json", version=99)),
    ("format-other", lambda d: _edit_json(d / "config.json", format="other")),
    ("tokenizer-null", lambda d: _edit_json(d / "config.json", tokenizer=None)),
    ("unknown-config-key", lambda d: _edit_json(d / "config.json", hidden_sise=32)),
    ("config-missing", lambda d: (d / "config.json").unlink()),
    ("config-not-json", lambda d: (d / "config.json").write_text("{hidden_size: 32,")),
    ("weights-truncated", lambda d: _truncate(d / "merger.safetensors")),
    ("weights-empty", lambda d: (d / "merger.safetensors").write_bytes(b"")),
    ("weights-missing", lambda d: (d / "merger.safetensors").unlink()),
    ("weights-missing-tensor", lambda d: _edit_tensors(d / "merger.safetensors", lambda t: t.pop("o_proj.weight"))),
    ("hidden-size-64", _replace_with("merger_d64", "merger")),
    ("other-tokenizer", _replace_with("merger_other_tok", "merger")),
]
"""Damaged or mismatched merger folders: (id, mutate(merger folder))."""


def _rules_counts_shorter(t):
    t["counts_2"] = t["counts_2"][:-1].copy()


def _rules_float(t):
    t["ngrams_2"] = t["ngrams_2"].astype(np.float64)


def _rules_id(value):
    def fn(t):
        t["ngrams_2"] = t["ngrams_2"].copy()
        t["ngrams_2"][0, 0] = value

    return fn


def _rules_five(t):
    t["ngrams_5"] = np.array([[3, 4, 5, 6, 7]], dtype=np.int64)
    t["counts_5"] = np.array([9], dtype=np.int64)


RULES_BAD: list[tuple[str, Callable]] = [
    ("version-string", lambda d: _edit_json(d / "rules.json", version="1")),
    ("tokenizer-string", lambda d: _edit_json(d / "rules.json", tokenizer="gpt2")),
    ("tokenizer-null", lambda d: _edit_json(d / "rules.json", tokenizer=None)),
    ("format-other", lambda d: _edit_json(d / "rules.json", format="other")),
    ("json-not-json", lambda d: (d / "rules.json").write_text('{"format": "umim-merge-rules", ')),
    ("extra-tensor", lambda d: _edit_tensors(d / "rules.safetensors", lambda t: t.update(extra=np.zeros(3)))),
    ("counts-shorter", lambda d: _edit_tensors(d / "rules.safetensors", _rules_counts_shorter)),
    ("float-ngram-ids", lambda d: _edit_tensors(d / "rules.safetensors", _rules_float)),
    ("ngram-id-beyond-vocab", lambda d: _edit_tensors(d / "rules.safetensors", _rules_id(10**6))),
    ("ngram-id-negative", lambda d: _edit_tensors(d / "rules.safetensors", _rules_id(-3))),
    ("five-grams", lambda d: _edit_tensors(d / "rules.safetensors", _rules_five)),
    ("safetensors-missing", lambda d: (d / "rules.safetensors").unlink()),
    ("safetensors-truncated", lambda d: _truncate(d / "rules.safetensors")),
    ("other-tokenizer", _replace_with("rules_other_tok", "rules")),
]
"""Damaged or mismatched rules folders: (id, mutate(rules folder))."""


def damaged(kind: str, mut):
    """Setup: a valid run folder at <tmp>/run whose ``kind`` (merger or rules) is then mutated."""

    def setup(ctx: Ctx):
        valid_run(ctx)
        d = ctx.tmp / "run" / kind
        mut(d, ctx) if getattr(mut, "needs_ctx", False) else mut(d)

    return setup


# ================================================================================================
# umim mine
# ================================================================================================
MINE = ["mine", "--tokenizer", "<model>", "--data", "<corpus>", "--min-count", "2"]
OUT = ["--out", "<tmp>/rules-out"]
GOOD_TXT = {"c/good.txt": "the value of the attribute is the value of the name\n\nthe value of the name\n"}

MINE_CASES = [
    # -- output path: refused, nothing changed
    Case("out-unrelated-folder", [*MINE, "--out", "<tmp>/notes"], "<tmp>/notes",
         files({"notes/todo.txt": "keep me\n", "notes/data/x.bin": b"\x00\x01\x02"}), keep=("<tmp>/notes",)),
    Case("out-is-file", [*MINE, "--out", "<tmp>/notes.txt"], "<tmp>/notes.txt",
         files({"notes.txt": "keep me\n"}), keep=("<tmp>/notes.txt",)),
    Case("out-is-merger-folder", [*MINE, "--out", "<tmp>/m"], "<tmp>/m", copy_of("merger", "m"), keep=("<tmp>/m",)),
    Case("out-is-run-folder", [*MINE, "--out", "<tmp>/runs/default"], "<tmp>/runs/default",
         run_like("runs/default"), keep=("<tmp>/runs/default",)),
    Case("out-under-a-file", [*MINE, "--out", "<tmp>/notes.txt/rules"], "<tmp>/notes.txt",
         files({"notes.txt": "keep me\n"}), keep=("<tmp>/notes.txt",)),
    Case("out-empty-string", [*MINE, "--out", ""], ("--out", "''", '""'),
         files({"sentinel.txt": "keep me\n"}), keep=("<tmp>",)),
    # -- corpus
    Case("corpus-missing", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/no-such-corpus", *OUT],
         "<tmp>/no-such-corpus"),
    Case("corpus-folder-without-text-files", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/c", *OUT], "<tmp>/c",
         files({"c/table.csv": "a,b\n1,2\n", "c/blob.bin": b"\x00\x01"})),
    Case("corpus-empty-folder", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/c", *OUT], "<tmp>/c",
         files({"c/": ""})),
    Case("corpus-binary-txt-in-folder", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/c", *OUT], "blob.txt",
         files({**GOOD_TXT, "c/blob.txt": b"PK\x03\x04\x00\x00\x00\x08\x00" + bytes(range(256)) * 4})),
    Case("corpus-latin1-txt", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/c", *OUT], "latin.txt",
         files({**GOOD_TXT, "c/latin.txt": "caf\u00e9 na\u00efve r\u00e9sum\u00e9 of the value\n".encode("latin-1")})),
    Case("corpus-binary-file-given", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/blob.txt", *OUT], "blob.txt",
         files({"blob.txt": b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4})),
    Case("corpus-blank-txt", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/c", *OUT], "<tmp>/c",
         files({"c/blank.txt": "\n\n   \n\t\n"})),
    Case("jsonl-line-not-json", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/docs.jsonl", *OUT], "docs.jsonl:2",
         files({"docs.jsonl": '{"text": "the value of the name"}\nthe value of the name\n'})),
    Case("jsonl-line-without-text", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/docs.jsonl", *OUT],
         "docs.jsonl:3",
         files({"docs.jsonl": '{"text": "the value"}\n{"text": "of the name"}\n{"body": "the value"}\n'})),
    Case("jsonl-numeric-text", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/docs.jsonl", *OUT], "docs.jsonl:2",
         files({"docs.jsonl": '{"text": "the value of the name"}\n{"text": 5}\n'})),
    Case("jsonl-null-text", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/docs.jsonl", *OUT], "docs.jsonl:1",
         files({"docs.jsonl": '{"text": null}\n{"text": "the value of the name"}\n'})),
    Case("jsonl-latin1", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/docs.jsonl", *OUT], "docs.jsonl",
         files({"docs.jsonl": '{"text": "caf\u00e9 of the value"}\n'.encode("latin-1")})),
    Case("data-glob-matches-nothing", ["mine", "--tokenizer", "<model>", "--data", "<tmp>/*.txt", *OUT],
         "<tmp>/*.txt"),
    Case("data-hf-local-missing", ["mine", "--tokenizer", "<model>", "--data", "hf:<tmp>/no-such-dataset", *OUT],
         "<tmp>/no-such-dataset"),
    Case("split-unknown", [*MINE, "--split", "dev", *OUT], "dev"),
    # -- settings
    Case("max-tokens-negative", [*MINE, "--max-tokens", "-5", *OUT], ("max-tokens", "max_tokens")),
    Case("max-n-9", [*MINE, "--max-n", "9", *OUT], ("max-n", "max_n")),
    Case("min-n-1", [*MINE, "--min-n", "1", *OUT], ("min-n", "min_n")),
    Case("min-n-above-max-n", [*MINE, "--min-n", "4", "--max-n", "3", *OUT], ("min-n", "min_n")),
    Case("min-count-0", ["mine", "--tokenizer", "<model>", "--data", "<corpus>", "--min-count", "0", *OUT],
         ("min-count", "min_count")),
    Case("min-count-negative", ["mine", "--tokenizer", "<model>", "--data", "<corpus>", "--min-count", "-3", *OUT],
         ("min-count", "min_count")),
    Case("filters-unknown", [*MINE, "--filters", "x", *OUT], "--filters"),
    Case("model-prob-above-1", [*MINE, "--model-prob", "1.5", *OUT], ("model-prob", "1.5")),
    # -- tokenizer
    Case("tokenizer-folder-missing", ["mine", "--tokenizer", "<tmp>/no-such-model", "--data", "<corpus>", *OUT],
         "<tmp>/no-such-model", hint=("not found", "does not exist", "no such"),
         absent=("Repo id must be in the form",)),
    Case("tokenizer-folder-empty", ["mine", "--tokenizer", "<tmp>/empty-model", "--data", "<corpus>", *OUT],
         "<tmp>/empty-model", files({"empty-model/": ""})),
    Case("tokenizer-hub-id-offline", ["mine", "--tokenizer", "nobody-xyz/no-such-model", "--data", "<corpus>", *OUT],
         "nobody-xyz/no-such-model"),
    Case("gguf-file-missing", [*MINE, "--gguf-file", "missing.gguf", *OUT], "missing.gguf"),
]


@pytest.mark.parametrize("case", MINE_CASES, ids=ids(MINE_CASES))
def test_umim_mine(case, env, tmp_path, capfd, monkeypatch):
    from umim.cli import main

    check_cli(main, case, Ctx(env, tmp_path), capfd, monkeypatch)


# ================================================================================================
# umim generate
# ================================================================================================
GEN_ARGS = ["--prompt", "the value of the", "--max-new-tokens", "3", "--device", "cpu"]
GEN = ["generate", "--model", "<model>", "--run-dir", "<run>", *GEN_ARGS]
GEN_TMP = ["generate", "--model", "<model>", "--run-dir", "<tmp>/run", *GEN_ARGS]

GENERATE_CASES = [
    Case("run-dir-missing", ["generate", "--model", "<model>", "--run-dir", "<tmp>/no-run", *GEN_ARGS],
         "<tmp>/no-run", hint=("umim fit", "--merge none")),
    Case("default-run-dir-missing", ["generate", "--model", "<model>", *GEN_ARGS], "runs/default",
         hint=("umim fit",)),
    Case("merger-missing-in-run-dir", GEN_TMP, "<tmp>/run/merger", copy_of("rules", "run/rules"),
         hint=("umim fit", "--merge none")),
    Case("rules-missing-in-run-dir", GEN_TMP, "<tmp>/run/rules", copy_of("merger", "run/merger"),
         hint=("umim fit", "--merge none")),
    Case("merger-flag-missing", [*GEN, "--merger", "<tmp>/no-merger"], "<tmp>/no-merger"),
    Case("rules-flag-missing", [*GEN, "--rules", "<tmp>/no-rules"], "<tmp>/no-rules"),
    Case("max-new-tokens-negative", [*GEN, "--max-new-tokens", "-5"], ("max-new-tokens", "max_new_tokens")),
    Case("max-new-tokens-0", [*GEN, "--max-new-tokens", "0"], ("max-new-tokens", "max_new_tokens"),
         note="debatable: generating nothing"),
    Case("top-p-1.5", [*GEN, "--top-p", "1.5"], ("top-p", "top_p")),
    Case("top-p-0", [*GEN, "--do-sample", "--top-p", "0"], ("top-p", "top_p")),
    Case("top-p-negative", [*GEN, "--do-sample", "--top-p", "-0.5"], ("top-p", "top_p")),
    Case("temperature-0-sampling", [*GEN, "--do-sample", "--temperature", "0"], "temperature"),
    Case("temperature-negative", [*GEN, "--temperature", "-1"], "temperature"),
    Case("top-k-negative", [*GEN, "--top-k", "-1"], ("top-k", "top_k")),
    Case("stop-empty-string", [*GEN, "--stop", ""], ("--stop", "stop string", "stop_strings")),
    Case("model-folder-missing", ["generate", "--model", "<tmp>/no-model", "--merge", "none", *GEN_ARGS],
         "<tmp>/no-model", absent=("Repo id must be in the form",)),
    Case("model-folder-empty", ["generate", "--model", "<tmp>/empty-model", "--merge", "none", *GEN_ARGS],
         "<tmp>/empty-model", files({"empty-model/": ""})),
    Case("prompt-empty", ["generate", "--model", "<model>", "--run-dir", "<run>", "--prompt", "", "--device", "cpu"],
         ("--prompt", "prompt")),
    Case("device-unknown", [*GEN, "--device", "nonsense"], "nonsense"),
]
GENERATE_CASES += [Case(f"merger-{name}", GEN_TMP, "<tmp>/run/merger", damaged("merger", mut))
                   for name, mut in MERGER_BAD]
GENERATE_CASES += [Case(f"rules-{name}", GEN_TMP, "<tmp>/run/rules", damaged("rules", mut)) for name, mut in RULES_BAD]


@pytest.mark.parametrize("case", GENERATE_CASES, ids=ids(GENERATE_CASES))
def test_umim_generate(case, env, tmp_path, capfd, monkeypatch):
    from umim.cli import main

    check_cli(main, case, Ctx(env, tmp_path), capfd, monkeypatch)


# ================================================================================================
# umim fit / validate (LightningCLI; in-process, each refused at setup)
# ================================================================================================
def _fit(command: str = "fit", root: str = "<tmp>/fit") -> list[str]:
    return [command, "--config", str(ROOT / "conf" / "gpt2xl.yaml"), "--model.lm.name_or_path", "<model>",
            "--data.corpus", "<corpus>", "--data.block_size", "64", "--data.batch_size", "2",
            "--data.num_workers", "0", "--data.max_eval_blocks", "4", "--model.loss_chunk_size", "64",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true", "--trainer.max_steps", "2", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", root]


FIT_CASES = [
    Case("corpus-missing", [*_fit(), "--data.corpus", "<tmp>/no-such-corpus"], "<tmp>/no-such-corpus"),
    Case("block-size-beyond-context", [*_fit(), "--data.block_size", "100000"], "block_size"),
    Case("root-dir-under-a-file", _fit(root="<tmp>/notes.txt/run"), "<tmp>/notes.txt",
         files({"notes.txt": "keep me\n"}), keep=("<tmp>/notes.txt",)),
    Case("merger-dir-unrelated", _fit(root="<tmp>/run"), "<tmp>/run/merger",
         files({"run/merger/notes.txt": "keep me\n", "run/merger/plot.png": b"\x89PNG\r\n"}),
         keep=("<tmp>/run/merger",)),
    Case("lm-folder-missing", [*_fit(), "--model.lm.name_or_path", "<tmp>/no-model"], "<tmp>/no-model"),
    Case("validate-ckpt-missing", [*_fit("validate"), "--ckpt_path", "<tmp>/no.ckpt"], "<tmp>/no.ckpt"),
]


@pytest.mark.parametrize("case", FIT_CASES, ids=ids(FIT_CASES))
def test_umim_fit(case, env, tmp_path, capfd, monkeypatch):
    from umim.cli import main

    check_cli(main, case, Ctx(env, tmp_path), capfd, monkeypatch)


# ================================================================================================
# umim-eval runners
# ================================================================================================
RUNNER_BASE = {
    "ppl": ["ppl", "--lm", "<model>", "--run_dir", "<run>", "--datasets", '{"x": "<corpus>"}', "--split", "train",
            "--max_tokens", "300", "--window", "32", "--batch_size", "2", "--device", "cpu"],
    "compare": ["compare", "--lm", "<model>", "--run_dir", "<run>", "--data", "<corpus>", "--split", "train",
                "--n_samples", "2", "--context_tokens", "16", "--target_tokens", "8", "--methods", "[select_context]",
                "--device", "cpu"],
    "qa": ["qa", "--lm", "<model>", "--run_dir", "<run>", "--tasks", "[]", "--local_tasks", '["<corpus>"]',
           "--local_examples", "4", "--limit", "2", "--methods", "[base]", "--batch_size", "2", "--device", "cpu"],
    "summarize": ["summarize", "--lm", "<model>", "--run_dir", "<run>", "--data", "<records>", "--n_samples", "2",
                  "--max_article_tokens", "16", "--max_new_tokens", "2", "--methods", "[base]",
                  "--bertscore_model", "null", "--device", "cpu"],
    "math": ["math", "--lm", "<model>", "--run_dir", "<run>", "--datasets", '{"t": {"data": "<problems>"}}',
             "--n", "1", "--k", "1", "--max_new_tokens", "2", "--methods", "[base]", "--match", "fixed",
             "--ratio", "0.0", "--batch_size", "1", "--chat_template", "false", "--dtype", "float32",
             "--device", "cpu"],
    "gen-quality": ["gen-quality", "--lm", "<model>", "--run_dir", "<run>", "--data", "<corpus>", "--split", "train",
                    "--n_samples", "2", "--prompt_tokens", "8", "--ref_tokens", "8", "--new_tokens", "2",
                    "--decodings", "[greedy]", "--runs", "1", "--batch_size", "2", "--device", "cpu"],
}


def R(runner: str, *extra: str, out: str = "<tmp>/out") -> list[str]:
    return [*RUNNER_BASE[runner], *extra, "--out_dir", out]


def _common_runner_cases(r: str) -> list[Case]:
    return [
        Case(f"{r}-out-dir-is-a-file", R(r, out="<tmp>/out.json"), "<tmp>/out.json",
             files({"out.json": '{"earlier": "result"}\n'}), keep=("<tmp>/out.json",), before_work=True),
        Case(f"{r}-out-dir-read-only", R(r, out="<out>"), "<out_keep>", readonly_out(), keep=("<out_keep>",),
             before_work=True, note="as root: a path under an existing file"),
        Case(f"{r}-unknown-config-key", [*RUNNER_BASE[r], "--config", "<tmp>/c.yaml", "--out_dir", "<tmp>/out"],
             "windwo", files({"c.yaml": "windwo: 64\n"})),
        Case(f"{r}-config-missing", [*RUNNER_BASE[r], "--config", "<tmp>/no-such.yaml", "--out_dir", "<tmp>/out"],
             "<tmp>/no-such.yaml"),
        Case(f"{r}-config-broken-yaml", [*RUNNER_BASE[r], "--config", "<tmp>/broken.yaml", "--out_dir", "<tmp>/out"],
             ("<tmp>/broken.yaml", "broken.yaml"), files({"broken.yaml": "lm: [unclosed\n  out_dir: : :\n"})),
    ]


RUNNER_CASES: list[Case] = [c for r in RUNNER_BASE for c in _common_runner_cases(r)]
RUNNER_CASES += [
    # -- ppl
    Case("ppl-dataset-path-missing", [*R("ppl"), "--datasets", '{"x": "<tmp>/no-such-corpus"}'],
         "<tmp>/no-such-corpus"),
    Case("ppl-datasets-empty", [*R("ppl"), "--datasets", "{}"], "datasets"),
    Case("ppl-window-0", [*R("ppl"), "--window", "0"], "window"),
    Case("ppl-batch-size-0", [*R("ppl"), "--batch_size", "0"], "batch_size"),
    Case("ppl-max-tokens-negative", [*R("ppl"), "--max_tokens", "-5"], "max_tokens"),
    Case("ppl-run-dir-missing", [*R("ppl"), "--run_dir", "<tmp>/no-run"], "<tmp>/no-run"),
    Case("ppl-no-merger-given", [*R("ppl"), "--run_dir", "null"], ("run_dir", "merger")),
    Case("ppl-lm-folder-missing", [*R("ppl"), "--lm", "<tmp>/no-model"], "<tmp>/no-model"),
    Case("ppl-dtype-unknown", [*R("ppl"), "--dtype", "float8"], "float8"),
    Case("ppl-split-unknown", [*R("ppl"), "--split", "dev"], "dev"),
    # -- compare
    Case("compare-unknown-method", [*R("compare"), "--methods", "[select_context, nosuch]"], "nosuch",
         before_work=True),
    Case("compare-ktoken-without-path", [*R("compare"), "--methods", "[ktoken]"], "ktoken", before_work=True),
    Case("compare-ktoken-path-missing", [*R("compare"), "--methods", "[ktoken]", "--method_options",
                                         '{"ktoken": {"path": "<tmp>/runs/ktoken/ktoken"}}'],
         "<tmp>/runs/ktoken", before_work=True),
    Case("compare-n-samples-0", [*R("compare"), "--n_samples", "0"], "n_samples"),
    Case("compare-n-samples-negative", [*R("compare"), "--n_samples", "-2"], "n_samples"),
    Case("compare-n-samples-beyond-data", [*R("compare"), "--n_samples", "100000"], "n_samples"),
    Case("compare-context-tokens-0", [*R("compare"), "--context_tokens", "0"], "context_tokens"),
    Case("compare-target-above-1", [*R("compare"), "--targets", "[1.5]"], ("targets", "1.5")),
    Case("compare-method-option-unknown", [*R("compare"), "--method_options", '{"select_context": {"bogus": 1}}'],
         "bogus"),
    # -- qa
    Case("qa-local-task-corpus-missing", [*R("qa"), "--local_tasks", '["<tmp>/no-such-corpus"]'],
         "<tmp>/no-such-corpus"),
    Case("qa-unknown-method", [*R("qa"), "--methods", "[base, nosuch]"], "nosuch"),
    Case("qa-local-examples-0", [*R("qa"), "--local_examples", "0"], "local_examples"),
    # -- summarize
    Case("summarize-data-missing", [*R("summarize"), "--data", "<tmp>/no-such.jsonl"], "<tmp>/no-such.jsonl"),
    Case("summarize-reference-field-missing", [*R("summarize"), "--reference_field", "summary_nosuch"],
         "summary_nosuch"),
    Case("summarize-data-not-json", [*R("summarize"), "--data", "<tmp>/bad.jsonl"], "bad.jsonl",
         files({"bad.jsonl": '{"article": "a", "highlights": "b"}\nnot json\n'})),
    Case("summarize-n-samples-0", [*R("summarize"), "--n_samples", "0"], "n_samples"),
    Case("summarize-n-samples-negative", [*R("summarize"), "--n_samples", "-1"], "n_samples"),
    Case("summarize-match-unknown", [*R("summarize"), "--match", "bogus"], ("match", "bogus")),
    Case("summarize-fixed-ratio-above-1", [*R("summarize"), "--match", "fixed", "--ratio", "1.5"],
         ("ratio", "1.5")),
    Case("summarize-unknown-method", [*R("summarize"), "--methods", "[base, nosuch]"], "nosuch"),
    Case("summarize-template-without-article", [*R("summarize"), "--prompt_template", "Summary:"],
         "prompt_template"),
    # -- math
    Case("math-data-missing", [*R("math"), "--datasets", '{"t": {"data": "<tmp>/no-such.jsonl"}}'],
         "<tmp>/no-such.jsonl"),
    Case("math-k-above-n", [*R("math"), "--k", "4"], ("k=", "k ")),
    Case("math-n-0", [*R("math"), "--n", "0", "--k", "0"], ("n=0", "n must")),
    Case("math-max-new-tokens-beyond-context", [*R("math"), "--max_new_tokens", "100000"], "max_new_tokens"),
    Case("math-template-without-problem", [*R("math"), "--prompt_template", "Solve it."], "prompt_template"),
    Case("math-unknown-method", [*R("math"), "--methods", "[base, nosuch]"], "nosuch"),
    Case("math-question-field-missing", [*R("math"), "--datasets",
                                         '{"t": {"data": "<problems>", "question_field": "q_nosuch"}}'], "q_nosuch"),
    # -- gen-quality
    Case("gen-quality-n-samples-0", [*R("gen-quality"), "--n_samples", "0"], "n_samples"),
    Case("gen-quality-n-samples-negative", [*R("gen-quality"), "--n_samples", "-3"], "n_samples"),
    Case("gen-quality-unknown-decoding", [*R("gen-quality"), "--decodings", "[greedy, beam]"], "beam"),
    Case("gen-quality-merge-mode-none", [*R("gen-quality"), "--merge_mode", "none"], "merge_mode"),
    Case("gen-quality-data-missing", [*R("gen-quality"), "--data", "<tmp>/no-such-corpus"], "<tmp>/no-such-corpus"),
    Case("gen-quality-prompt-tokens-0", [*R("gen-quality"), "--prompt_tokens", "0"], "prompt_tokens"),
    # -- lm-eval pass-through
    Case("lm-eval-unknown-model-arg", ["lm-eval", "--model", "umim", "--model_args",
                                       "pretrained=<model>,run_dir=<run>,bogus_key=1",
                                       "--tasks", "piqa", "--device", "cpu", "--limit", "1"], "bogus_key"),
]


@pytest.mark.parametrize("case", RUNNER_CASES, ids=ids(RUNNER_CASES))
def test_umim_eval(case, env, tmp_path, capfd, monkeypatch):
    from umim_eval.cli import main

    ctx = Ctx(env, tmp_path)
    try:
        check_cli(main, case, ctx, capfd, monkeypatch)
    finally:
        if "_restore" in ctx.extra:
            os.chmod(ctx.extra["_restore"], 0o755)


# ================================================================================================
# the lm-eval model ``umim`` (UMIMLM constructor)
# ================================================================================================
def umimlm(**kw):
    def call(ctx: Ctx):
        from umim_eval.harness.lm_eval_model import UMIMLM

        args = {"pretrained": ctx.env["model"], "device": "cpu", "batch_size": 1}
        args.update({k: ctx.fmt(v) if isinstance(v, str) else v for k, v in kw.items()})
        return UMIMLM(**args)

    return call


LM_EVAL_CASES = [
    Case("ratio-negative", umimlm(run_dir="<run>", compressor="select_context", ratio=-0.1), ("ratio", "-0.1")),
    Case("ratio-above-1", umimlm(run_dir="<run>", compressor="select_context", ratio=1.5), ("ratio", "1.5")),
    Case("ratio-not-a-number", umimlm(run_dir="<run>", compressor="select_context", ratio="lots"), ("ratio", "lots")),
    Case("ratio-without-compressor", umimlm(ratio=0.1), "ratio"),
    Case("compressor-without-ratio-or-rules", umimlm(compressor="select_context"), "ratio"),
    Case("unknown-model-arg", umimlm(run_dir="<run>", bogus_key=1), "bogus_key"),
    Case("misspelt-run-dir", umimlm(rundir="<run>"), "rundir"),
    Case("merge-unknown", umimlm(run_dir="<run>", merge="sideways"), "sideways"),
    Case("compressor-unknown", umimlm(compressor="nope", ratio=0.1), "nope"),
    Case("run-dir-missing", umimlm(run_dir="<tmp>/no-run"), "<tmp>/no-run"),
    Case("merge-prompt-without-rules", umimlm(merger="<merger>", merge="prompt"), "rules"),
    Case("pretrained-missing", umimlm(pretrained="<tmp>/no-model"), "<tmp>/no-model",
         absent=("Repo id must be in the form",)),
    Case("run-dir-merger-other-width", umimlm(merger="<merger_d64>", rules="<rules>"), "<merger_d64>"),
]


@pytest.mark.parametrize("case", LM_EVAL_CASES, ids=ids(LM_EVAL_CASES))
def test_lm_eval_model(case, env, tmp_path, monkeypatch):
    check_api(case, Ctx(env, tmp_path), monkeypatch)


# ================================================================================================
# Python API
# ================================================================================================
def gen(prompts, mode="none", sampling=None, which="merged"):
    def call(ctx: Ctx):
        return ctx.api[which].generate(prompts, mode, sampling)

    return call


def sampling(**kw):
    def call(ctx: Ctx):
        from umim.inference.generation import SamplingConfig

        return SamplingConfig(**kw)

    return call


def documents(spec: str, split: str = "train"):
    def call(ctx: Ctx):
        from umim.rules.corpus import load_documents

        return load_documents(ctx.fmt(spec), split)

    return call


def load_rules(path: str = "<tmp>/run/rules"):
    def call(ctx: Ctx):
        from umim.rules.store import MergeRules

        return MergeRules.load(ctx.fmt(path), tokenizer=ctx.api["tok"])

    return call


def load_merger(path: str = "<tmp>/run/merger"):
    def call(ctx: Ctx):
        from umim.merging.merger import MergeModule

        return MergeModule.from_pretrained(ctx.fmt(path), hidden_size=32, tokenizer_fp=ctx.api["fp"])

    return call


def _merger_module(hidden_size, num_heads):
    def call(ctx: Ctx):
        from umim.merging.merger import MergeModule, MergerConfig

        return MergeModule(MergerConfig(hidden_size=hidden_size, num_heads=num_heads))

    return call


def _mergedlm_with_d64(ctx: Ctx):
    from umim.inference.generation import MergedLM
    from umim.merging.merger import MergeModule

    m = ctx.api["merged"]
    return MergedLM(m.lm, m.tokenizer, MergeModule.from_pretrained(ctx.env["merger_d64"]), m.rules)


def _mergedlm_load(lm: str, run_dir: str | None = None):
    def call(ctx: Ctx):
        from umim.inference.generation import MergedLM

        return MergedLM.load(ctx.fmt(lm), run_dir=ctx.fmt(run_dir) if run_dir else None, device="cpu")

    return call


def _load_lm_dtype(ctx: Ctx):
    from umim.lm import LMSpec, load_lm

    return load_lm(LMSpec(ctx.env["model"], dtype="float8"))


def _save_rules(dst: str):
    def call(ctx: Ctx):
        from umim.rules.store import MergeRules

        MergeRules.load(ctx.env["rules"]).save(ctx.fmt(dst))

    return call


def _save_merger(dst: str):
    def call(ctx: Ctx):
        from umim.merging.merger import MergeModule

        MergeModule.from_pretrained(ctx.env["merger"]).save_pretrained(ctx.fmt(dst))

    return call


def _write_results(ctx: Ctx):
    from umim_eval.results import write_results

    write_results({"rows": {}}, ctx.fmt("<tmp>/out.json"), "ppl", "| table |\n")


def _make_method(ctx: Ctx):
    from umim_eval.methods.registry import make_method

    return make_method("nope", 0.1)


API_CASES = [
    # -- MergedLM.generate
    Case("generate-bytes-prompt", gen(b"the value of the", "dynamic"), "bytes"),
    Case("generate-bytes-in-batch", gen([b"the value", b"of the"]), "bytes"),
    Case("generate-token-id-beyond-vocab", gen([5, 10**6]), "1000000"),
    Case("generate-token-id-negative", gen([5, -1]), "-1"),
    Case("generate-float-token-ids", gen([1.5, 2.0]), ("1.5", "float")),
    Case("generate-empty-string", gen(""), ("empty", "prompt")),
    Case("generate-empty-list", gen([]), ("empty", "prompt")),
    Case("generate-empty-row-in-batch", gen([[3, 4], []]), ("empty", "prompt")),
    Case("generate-unknown-mode", gen("the value", "sideways"), "sideways"),
    Case("generate-merging-without-merger", gen("the value", "prompt", which="plain"), ("merger", "rules")),
    Case("generate-prompt-beyond-context", gen([5] * 300), "context"),
    Case("generate-sampling-as-dict", gen("the value", "none", {"top_p": 2.0}), ("sampling", "SamplingConfig")),
    # -- SamplingConfig
    Case("sampling-top-p-1.5", sampling(top_p=1.5), "top_p"),
    Case("sampling-top-p-0", sampling(do_sample=True, top_p=0.0), "top_p"),
    Case("sampling-top-p-negative", sampling(top_p=-0.1), "top_p"),
    Case("sampling-temperature-0-sampling", sampling(do_sample=True, temperature=0.0), "temperature"),
    Case("sampling-temperature-negative", sampling(temperature=-1.0), "temperature"),
    Case("sampling-top-k-negative", sampling(top_k=-1), "top_k"),
    Case("sampling-max-new-tokens-negative", sampling(max_new_tokens=-5), "max_new_tokens"),
    Case("sampling-stop-empty-string", sampling(stop_strings=[""]), "stop"),
    Case("sampling-stop-strings-a-string", sampling(stop_strings="###"), "stop_strings"),
    # -- load_documents
    Case("documents-path-missing", documents("no/such/path"), "no/such/path"),
    Case("documents-unknown-split", documents("<corpus>", "dev"), "dev"),
    Case("documents-latin1-file", documents("<tmp>/c"), "latin.txt",
         files({**GOOD_TXT, "c/latin.txt": "caf\u00e9 na\u00efve of the value\n".encode("latin-1")})),
    Case("documents-binary-file", documents("<tmp>/c"), "blob.txt",
         files({**GOOD_TXT, "c/blob.txt": b"\x00\x01\x02\x03" * 64})),
    Case("documents-jsonl-numeric-text", documents("<tmp>/d.jsonl"), "d.jsonl:1",
         files({"d.jsonl": '{"text": 5}\n{"text": "the value"}\n'})),
    Case("documents-jsonl-null-text", documents("<tmp>/d.jsonl"), "d.jsonl:2",
         files({"d.jsonl": '{"text": "the value"}\n{"text": null}\n'})),
    Case("documents-blank-file", documents("<tmp>/blank.txt"), "blank.txt", files({"blank.txt": "\n \n"})),
    Case("documents-hf-local-missing", documents("hf:<tmp>/no-such-dataset"), "<tmp>/no-such-dataset"),
    # -- merger / MergedLM construction and loading
    Case("merger-hidden-not-divisible", _merger_module(30, 4), ("num_heads", "hidden_size")),
    Case("merger-num-heads-0", _merger_module(32, 0), "num_heads"),
    Case("mergedlm-merger-other-width", _mergedlm_with_d64, ("hidden size", "hidden_size")),
    Case("mergedlm-load-model-missing", _mergedlm_load("<tmp>/no-model"), "<tmp>/no-model"),
    Case("mergedlm-load-run-dir-missing", _mergedlm_load("<model>", "<tmp>/no-run"), "<tmp>/no-run"),
    Case("load-lm-dtype-unknown", _load_lm_dtype, "float8"),
    Case("rules-load-missing", load_rules("<tmp>/no-rules"), "<tmp>/no-rules"),
    Case("merger-load-missing", load_merger("<tmp>/no-merger"), "<tmp>/no-merger"),
    # -- saving onto what is not ours: refused, nothing changed
    Case("rules-save-onto-unrelated-folder", _save_rules("<tmp>/notes"), "<tmp>/notes",
         files({"notes/todo.txt": "keep me\n"}), keep=("<tmp>/notes",)),
    Case("rules-save-under-a-file", _save_rules("<tmp>/notes.txt/rules"), "<tmp>/notes.txt",
         files({"notes.txt": "keep me\n"}), keep=("<tmp>/notes.txt",)),
    Case("merger-save-onto-rules-folder", _save_merger("<tmp>/r"), "<tmp>/r", copy_of("rules", "r"),
         keep=("<tmp>/r",)),
    Case("write-results-out-dir-is-a-file", _write_results, "<tmp>/out.json",
         files({"out.json": "{}\n"}), keep=("<tmp>/out.json",)),
    Case("make-method-unknown", _make_method, "nope"),
]
API_CASES += [Case(f"merger-load-{name}", load_merger(), "<tmp>/run/merger", damaged("merger", mut))
              for name, mut in MERGER_BAD]
API_CASES += [Case(f"rules-load-{name}", load_rules(), "<tmp>/run/rules", damaged("rules", mut))
              for name, mut in RULES_BAD]


@pytest.mark.parametrize("case", API_CASES, ids=ids(API_CASES))
def test_python_api(case, env, api, tmp_path, monkeypatch):
    check_api(case, Ctx(env, tmp_path, api), monkeypatch)


def test_table_size():
    """The suite covers at least 110 bad inputs, each id unique."""
    tables = [MINE_CASES, GENERATE_CASES, FIT_CASES, RUNNER_CASES, LM_EVAL_CASES, API_CASES]
    n = sum(map(len, tables))
    assert n >= 110
    for t in tables:
        assert len(set(ids(t))) == len(t)
