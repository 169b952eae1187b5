"""The README's Python API runs as written: its first code block, with the embedded model and the
default run replaced by a tiny saved model and run (no training, no download)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import make_tiny_lm

from umim.fingerprint import tokenizer_fingerprint
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.corpus import load_documents, tokenize_documents
from umim.rules.mining import mine_rules

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def test_readme_python_api_runs(tiny_tokenizer_factory, tmp_path, capsys):
    docs = load_documents("pydoc", "train")[:800]
    tok = tiny_tokenizer_factory(docs, vocab_size=300, name="tiny-readme")
    lm = make_tiny_lm("llama", len(tok), context=256)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    ids, offsets = tokenize_documents(docs, tok, progress=False)
    mine_rules(ids, offsets, tokenizer_fingerprint(tok), min_count=10).save(tmp_path / "run" / "rules")
    torch.manual_seed(0)
    MergeModule(MergerConfig(hidden_size=32, tokenizer=tokenizer_fingerprint(tok))).save_pretrained(
        tmp_path / "run" / "merger")

    first = python_blocks("Python API")[0]
    assert len([ln for ln in first.splitlines() if ln.strip() and not ln.startswith("#")]) <= 3
    code = first.replace('"embedded"', repr(str(tmp_path / "lm"))).replace('"runs/default"',
                                                                            repr(str(tmp_path / "run")))
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # the generated text was printed
