"""Math grading and the AIME/AMC runner: the unbiased pass@k equals the brute-force mean over all
k-subsets, boxed answers are found in hard cases, equivalent answers match and different ones do
not, and a tiny end-to-end run on a tiny Llama gives Table 6's structure at UMIM's TR."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm

from umim.fingerprint import tokenizer_fingerprint
from umim.inference.generation import MergedLM
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.store import MergeRules
from umim_eval.cli import save_results
from umim_eval.tasks.math_reasoning import (
    MathConfig,
    MathDataset,
    answers_match,
    extract_boxed,
    math_table,
    normalize_answer,
    pass_at_k,
    run_math,
)


def test_pass_at_k_equals_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(correct, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    # the product form stays exact where binomials would overflow a float
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    assert 0 < pass_at_k(5000, 1, 3) < 1 and math.isfinite(pass_at_k(5000, 1, 3))
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is $\boxed{42}$.", "42"),
    (r"first \boxed{1} then, correcting, \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
    (r"\boxed{\left\{ 1, 2 \right\}} done", r"\left\{ 1, 2 \right\}"),
    (r"nested \boxed{a_{i_{j}} + \sqrt{b^{2}}} end", r"a_{i_{j}} + \sqrt{b^{2}}"),
    (r"\fbox{7}", "7"),
    (r"$\boxed 5$", "5"),
    (r"\boxed{12} and a broken tail \boxed{3", "12"),  # the last box never closes: fall back to the earlier one
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not count
    ("no box here, the answer is 12", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("a, b", [
    (r"\frac{1}{2}", "1/2"), (r"\dfrac{1}{2}", "0.5"), (r"\tfrac12", r"\frac{1}{2}"), ("$ 42 $", "42"),
    ("042", "42"), ("7.0", "7"), ("1,000", "1000"), (r"\text{ 5 }", "5"), (r"\left( 1, 2 \right)", "(1,2)"),
    ("-0.50", r"-\frac{1}{2}"), (r"\boxed{3}", "3"), (r"90^\circ", "90"), (r"\frac{a+b}{2}", "(a+b)/2"),
    ("3.", "3"),
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"), ("x^2+2x+1", "(x+1)^2"), (r"2\sqrt{3}", r"\sqrt{12}"),  # math-verify
])
def test_equivalent_answers_match(a, b):
    assert answers_match(a, b) and answers_match(b, a)


@pytest.mark.parametrize("a, b", [("1/2", "2"), ("12", "21"), ("1,2", "12"), ("(1,2)", "(2,1)"), ("0.5", "5"),
                                  (None, "3"), ("", "")])
def test_different_answers_do_not_match(a, b):
    assert not answers_match(a, b)


def test_normalize_answer_is_canonical():
    assert normalize_answer(r"\dfrac{3}{4}") == "3/4"
    assert normalize_answer("0007.500") == "7.5" and normalize_answer("-0") == "0"
    assert normalize_answer(None) is None


# -- the runner ---------------------------------------------------------------------------------------


def _pydoc_lines(lo: int, hi: int) -> list[str]:
    from pydoc_data.topics import topics

    return [ln.strip() for k in sorted(topics)[lo:hi] for ln in topics[k].splitlines() if len(ln.split()) > 6]


@pytest.fixture(scope="module")
def setup(tiny_tokenizer_factory, tmp_path_factory):
    tok = tiny_tokenizer_factory(_pydoc_lines(0, 30), vocab_size=300)
    tok.add_special_tokens({"eos_token": "[PAD]"})
    lines = _pydoc_lines(12, 20)
    problems = [" ".join(lines[2 * i : 2 * i + 2]) for i in range(3)]
    path = tmp_path_factory.mktemp("math") / "problems.jsonl"
    with open(path, "w") as f:
        for i, p in enumerate(problems):
            f.write(json.dumps({"problem": p, "answer": str(i + 1)}) + "\n")
    lm = make_tiny_lm("llama", len(tok))
    fp = tokenizer_fingerprint(tok)
    torch.manual_seed(1)
    merger = MergeModule(MergerConfig(hidden_size=lm.config.hidden_size, tokenizer=fp))
    seqs = [tok(p, add_special_tokens=False)["input_ids"] for p in problems]
    grams = {n: sorted({tuple(s[i : i + n]) for s in seqs for i in range(0, len(s) - n + 1, 3 * n)}) for n in (2, 3, 4)}
    rules = MergeRules(ngrams={n: np.array(g) for n, g in grams.items()},
                       counts={n: np.ones(len(g), dtype=np.int64) for n, g in grams.items()}, tokenizer=fp)
    return MergedLM(lm, tok, merger, rules), path


def _cfg(path, **kw) -> MathConfig:
    base = dict(datasets={"aime2024": MathDataset(str(path)), "amc2023": MathDataset(str(path))}, k=2, n=3,
                max_new_tokens=6, batch_size=2, out_dir=None, temperature=1.0, top_p=1.0)
    return MathConfig(**{**base, **kw})


def test_math_end_to_end(setup, tmp_path):
    m, path = setup
    cfg = _cfg(path, methods=["base", "umim", "select_context", "streaming_llm"], out_dir=str(tmp_path))
    res = run_math(cfg, progress=False, merged_lm=m)
    save_results("math", res, cfg.out_dir)  # runners return results; the command writes them
    for ds in ("aime2024", "amc2023"):
        rows = res["results"][ds]
        assert list(rows) == cfg.methods
        for name, r in rows.items():
            assert r["n_problems"] == 3 and r["solved"] == f"{r['n_solved']}/3"
            assert 0 <= r["pass@1"] <= r["pass@2"] <= 1
        for p in res["problems"][ds]:
            assert len(p["umim"]["correct"]) == cfg.n
            for name in ("select_context", "streaming_llm"):
                assert abs(p[name]["tr"] - p["umim"]["tr"]) <= 0.02, (name, p[name]["tr"], p["umim"]["tr"])
        assert min(p["umim"]["tr"] for p in res["problems"][ds]) > 0.05
    table = math_table(res)
    assert table.splitlines()[0] == "| Methods | AIME 2024 Accuracy | TR (%) | AMC 2023 Accuracy | TR (%) |"
    assert table.splitlines()[2].startswith("| Base LM | 0/3 | – |")  # a random tiny LM never boxes an answer
    assert (tmp_path / "math.md").read_text() == table


def test_math_ratio_zero_methods_equal_base(setup):
    """Sampled with the same seeds: compressors at ratio 0 give base's answers token for token."""
    m, path = setup
    cfg = _cfg(path, methods=["base", "select_context", "streaming_llm"], match="fixed", ratio=0.0, batch_size=1,
               keep_texts=True, datasets={"aime2024": MathDataset(str(path))})
    res = run_math(cfg, progress=False, merged_lm=m)
    seqs = [[t for p in res["problems"]["aime2024"] for t in p[name]["texts"]] for name in cfg.methods]
    assert len(seqs[0]) == 3 * cfg.n and seqs[0] == seqs[1] == seqs[2]
    assert len(set(seqs[0])) > 1  # sampled, not all the same text


def test_math_bad_config(setup):
    m, path = setup
    with pytest.raises(ValueError, match="k <= n"):
        run_math(_cfg(path, k=4, n=3), progress=False, merged_lm=m)
    with pytest.raises(ValueError, match="context"):
        run_math(_cfg(path, methods=["base"], match="fixed", ratio=0.0, max_new_tokens=500), progress=False,
                 merged_lm=m)
    with pytest.raises(ValueError, match="problem"):
        run_math(_cfg(path, prompt_template="no field"), progress=False, merged_lm=m)
