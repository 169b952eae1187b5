"""benchmarks/bench_decode.py's TTFT-only cases on a tiny Llama with a merger and rules: each case is
verified against references before it is timed (a wrong first token stops it), the figures are
consistent (TR of the prompts, goal, ratio spread), and the CLI prints and writes them."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from conftest import benchmark_script, make_tiny_llama_run

from umim.fingerprint import tokenizer_fingerprint
from umim.inference.generation import MergedLM
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.store import MergeRules

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def bench():
    with benchmark_script("bench_decode") as mod:
        yield mod


@pytest.fixture(scope="module")
def run(tmp_path_factory, bench):
    """A run folder (``lm``, ``merger``, ``rules``): the rules hold n-grams of the benchmark's own
    held-out prompts, so its prompts merge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = make_tiny_llama_run(tmp_path_factory.mktemp("ttft"))
    tok = AutoTokenizer.from_pretrained(root / "lm")
    ids = bench._prompts(tok, 64, 2)
    grams = {n: {tuple(s[i : i + n]) for s in ids for i in range(0, len(s) - n + 1, 2 * n + 1)} for n in (2, 3)}
    fp = tokenizer_fingerprint(tok)
    MergeRules(ngrams={n: np.array(sorted(g)) for n, g in grams.items()},
               counts={n: np.ones(len(g), dtype=np.int64) for n, g in grams.items()}, tokenizer=fp).save(root / "rules")
    torch.manual_seed(1)
    merger = MergeModule(MergerConfig(hidden_size=32, tokenizer=fp))
    torch.nn.init.normal_(merger.v_proj.weight, std=0.3)  # a non-trivial merger, not the mean
    merger.save_pretrained(root / "merger")
    lm = AutoModelForCausalLM.from_pretrained(root / "lm")
    return root, MergedLM(lm, tok, MergeModule.from_pretrained(root / "merger"), MergeRules.load(root / "rules", tok))


@pytest.mark.parametrize("w, batch", [(40, 1), (32, 3)])
def test_ttft_case_is_verified_and_consistent(bench, run, w, batch):
    m = run[1]
    r = bench.ttft_case(m, w, batch, repeat=3)
    prompts = bench._prompts(m.tokenizer, w, batch)
    tr = 1 - sum(len(m.rules.segment(p)) for p in prompts) / (w * batch)
    assert 0.1 < tr < 0.9  # the prompts merge
    assert (r["prompt_tokens"], r["batch"], r["rounds"]) == (w, batch, 3)
    assert r["tr_prompt"] == pytest.approx(tr) and r["ttft_goal"] == pytest.approx(0.9 / (1 - tr))
    lo, med, hi = r["ttft_ratio"]
    assert 0 < lo <= med <= hi and r["ttft_unmerged_s"] > 0 and r["ttft_merged_s"] > 0
    # the merged reference is a plain forward over the merged sequence: the cached, padded prefill agrees
    hf_first, merged_first = bench.reference_first_tokens(m, prompts)
    assert merged_first == bench.cold(m).prefill(prompts, "dynamic")[0].argmax(-1).tolist()
    assert len(hf_first) == batch


def test_ttft_refuses_a_first_token_that_differs_from_its_reference(bench, run):
    m = run[1]
    prompts = bench._prompts(m.tokenizer, 24, 2)
    hf_first, merged_first = bench.reference_first_tokens(m, prompts)
    other = [(t + 1) % len(m.tokenizer) for t in merged_first]
    with pytest.raises(SystemExit, match="differs from its reference"):
        bench.ttft(m, prompts, hf_first, other, 1)
    with pytest.raises(SystemExit, match="differs from its reference"):
        bench.ttft(m, prompts, [(t + 1) % len(m.tokenizer) for t in hf_first], merged_first, 1)


def test_cli_ttft_only_prints_and_writes_json(bench, run, tmp_path, capsys, monkeypatch):
    root = run[0]
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--model", str(root / "lm"), "--run-dir", str(root),
                                      "--cases", "", "--ttft-cases", "24x1,16x2", "--repeat", "2",
                                      "--threads", "2", "--json", str(out)])
    try:
        bench.main()
    finally:
        torch.set_num_threads(1)  # the module's one_thread setting
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["TTFT", "case"] and [ln.split()[0] for ln in lines[1:]] == ["24x1", "16x2"]
    data = json.loads(out.read_text())
    assert data["cases"] == [] and [(r["prompt_tokens"], r["batch"]) for r in data["ttft_cases"]] == [(24, 1), (16, 2)]
    assert data["threads"] == 2


def test_cli_refuses_no_threads(bench, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--threads", "0"])
    with pytest.raises(SystemExit, match="--threads 0: give a positive number of threads"):
        bench.main()


BAD = [("--ttft-cases", "512x8", t) for t in ("512", "512x0", "512+8x1", "ax2")] + [
    ("--cases", "128+64x8", t) for t in ("128x64x1", "128+64", "128+-1x2")]


@pytest.mark.parametrize("option, example, text", BAD)
def test_bad_case_is_one_line(bench, option, example, text):
    with pytest.raises(SystemExit, match=rf"{option} '{re.escape(text)}': give positive numbers in the form "
                                         rf"{re.escape(example)}$"):
        bench.parse_cases(f"{text},", option, example)


def test_case_lists_parse_and_may_be_empty(bench):
    assert bench.parse_cases("", "--cases", "128+64x8") == []
    assert bench.parse_cases("128+64x1, 256+8x4", "--cases", "128+64x8") == [("128+64x1", [128, 64, 1]),
                                                                           ("256+8x4", [256, 8, 4])]
