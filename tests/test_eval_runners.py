"""The ``umim-eval`` runners on a real tiny Llama with a tokenizer, merger and rules built from
Python's own docs: every conf/eval YAML parses against its runner (unknown keys refused), the PPL
table's base row is the plain perplexity, the comparison is exact where a method removes nothing
and matched where it does, QA runs through lm-eval with UMIM and with a compressor, the runner
writes JSON + markdown, and the result notebooks execute headless on those results."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm

from umim.fingerprint import tokenizer_fingerprint
from umim.inference.generation import MergedLM
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.corpus import load_documents, tokenize_documents
from umim.rules.mining import mine_rules

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
EVAL_CONFS = sorted((ROOT / "conf" / "eval").rglob("*.yaml"))


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_factory, tmp_path_factory):
    """A MergedLM (tiny Llama, 400-token BPE on pydoc, rules mined from pydoc train) and its saved
    folders ``lm`` (model + tokenizer) and ``run`` (merger/ + rules/)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("runners")
    docs = load_documents("pydoc", "train")
    tok = tiny_tokenizer_factory(docs[:3000], vocab_size=400, name="tiny-pydoc")
    tok.add_special_tokens({"eos_token": "[PAD]"})
    lm = make_tiny_lm("llama", len(tok), context=256)
    lm.config.eos_token_id = lm.config.pad_token_id = tok.eos_token_id
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    tok = AutoTokenizer.from_pretrained(root / "lm")  # what lm-eval's HFLM loads
    fp = tokenizer_fingerprint(tok)
    ids, offsets = tokenize_documents(docs[:3000], tok, progress=False)
    rules = mine_rules(ids, offsets, fp, min_count=20)
    torch.manual_seed(1)
    merger = MergeModule(MergerConfig(hidden_size=32, tokenizer=fp))
    torch.nn.init.normal_(merger.v_proj.weight, std=0.3)
    merger.save_pretrained(root / "run" / "merger")
    rules.save(root / "run" / "rules")
    return {"m": MergedLM(lm, tok, merger, rules), "lm": str(root / "lm"), "run": str(root / "run"), "root": root}


# -- configs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", EVAL_CONFS, ids=[str(p.relative_to(ROOT / "conf")) for p in EVAL_CONFS])
def test_eval_config_parses(path):
    from umim_eval.cli import RUNNERS, parse_runner_config

    command = re.sub(r"^table[\d_]+_", "", path.stem).replace("_", "-")
    assert command in RUNNERS, f"{path.name}: name it after a runner ({sorted(RUNNERS)})"
    cfg = parse_runner_config(command, ["--config", str(path)])
    assert cfg.out_dir


def test_every_runner_has_paper_and_embedded_config():
    names = {p.relative_to(ROOT / "conf" / "eval").as_posix() for p in EVAL_CONFS}
    for stem in ("table2_ppl", "table4_qa", "table5_summarize", "table6_math", "table10_11_gen_quality", "compare",
                 "recall"):
        assert f"{stem}.yaml" in names and f"embedded/{stem}.yaml" in names


def test_unknown_config_key_is_refused(tmp_path):
    from umim_eval.cli import parse_runner_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("lm: embedded\nwindwo: 64\n")
    with pytest.raises(SystemExit):
        parse_runner_config("ppl", ["--config", str(bad)])


def test_methods_registry_matches_baselines():
    from umim_eval.methods import BASELINES
    from umim_eval.methods.registry import METHODS, method_class

    for name, cls in BASELINES.items():
        assert method_class(name) is cls
    assert set(BASELINES) <= set(METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        method_class("nope")


# -- ppl ---------------------------------------------------------------------------------------------
def test_ppl_base_row_is_plain_perplexity(tiny):
    from umim_eval.scoring.perplexity import perplexity
    from umim_eval.tasks.ppl import PPLConfig, ppl_table, run_ppl

    m = tiny["m"]
    cfg = PPLConfig(datasets={"pydoc": "pydoc"}, max_tokens=2000, window=128, batch_size=4)
    r = run_ppl(cfg, progress=False, merged_lm=m)
    ids, _ = tokenize_documents(load_documents("pydoc", "test"), m.tokenizer, progress=False)
    plain = perplexity(m.lm, None, None, ids[:2000], window=128, progress=False)
    assert r["rows"]["base"]["pydoc"]["ppl"] == pytest.approx(plain["ppl"], rel=1e-9)
    assert r["rows"]["base"]["pydoc"]["tr"] == 0.0
    assert 0.05 < r["rows"]["umim"]["pydoc"]["tr"] < 0.9
    assert r["rows"]["umim"]["pydoc"]["tokens_scored"] == r["rows"]["base"]["pydoc"]["tokens_scored"]
    table = ppl_table(r)
    assert table.splitlines()[0].startswith("| Methods | pydoc PPL | pydoc TR (%) | PPL Avg. |")
    assert len(table.splitlines()) == 4


# -- compare -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compare_result(tiny):
    from umim_eval.tasks.compare import CompareConfig, run_compare

    cfg = CompareConfig(data="pydoc", n_samples=4, context_tokens=48, target_tokens=16,
                        methods=["umim", "select_context", "streaming_llm"], targets=["umim", 0.0, 0.25])
    return run_compare(cfg, progress=False, merged_lm=tiny["m"])


def test_compare_matches_tr_and_is_exact_at_zero(compare_result):
    rows = {(str(r["target"]), r["method"]): r for r in compare_result["rows"]}
    base = compare_result["base"]
    assert ("0.0", "umim") not in rows  # fixed rules have no TR knob
    for name in ("select_context", "streaming_llm"):
        assert rows[("0.0", name)]["achieved_tr"] == 0.0
        assert rows[("0.0", name)]["ppl"] == pytest.approx(base["ppl"], rel=1e-6)
        for level in ("umim", "0.25"):
            r = rows[(level, name)]
            assert r["max_tr_gap"] <= 0.02 + 1e-9, (level, name, r)
            assert r["ppl"] != pytest.approx(base["ppl"], rel=1e-6)
    u = rows[("umim", "umim")]
    assert u["achieved_tr"] == pytest.approx(u["target_tr"]) and u["achieved_tr"] > 0.05


def test_compare_table_and_files(compare_result, tmp_path):
    from umim_eval.results import write_results
    from umim_eval.tasks.compare import compare_table

    table = compare_table(compare_result)
    assert table.startswith("4 examples, 64 target tokens scored\n\n")
    assert table.count("\n") == 2 + 2 + 1 + len(compare_result["rows"])
    paths = write_results(compare_result, tmp_path / "compare", "compare", table)
    assert json.loads(paths["json"].read_text())["base"]["ppl"] == compare_result["base"]["ppl"]
    assert paths["md"].read_text() == table


def test_compare_refuses_a_short_split(tiny):
    from umim_eval.tasks.compare import load_examples

    with pytest.raises(ValueError, match="windows"):
        load_examples("pydoc", "test", tiny["m"].tokenizer, 10**6, 48, 16)


def test_results_write_is_atomic(tmp_path):
    from umim_eval.results import write_results

    write_results({"a": 1}, tmp_path, "r", "| t |\n")
    with pytest.raises(TypeError):
        write_results({"a": object()}, tmp_path, "r")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}  # the earlier result survives
    assert not list(tmp_path.glob(".*tmp"))


def test_interrupted_compare_keeps_its_pieces_and_resumes(tiny, compare_result, tmp_path, monkeypatch):
    """A run that fails half-way keeps every scored example in its journal; the rerun scores only the
    rest and gives the uninterrupted result."""
    import umim_eval.tasks.compare as compare
    from umim_eval.results import Journal

    cfg = compare.CompareConfig(data="pydoc", n_samples=4, context_tokens=48, target_tokens=16,
                                methods=["umim", "select_context", "streaming_llm"], targets=["umim", 0.0, 0.25])
    real, calls, cut = compare._score, [], [True]

    def failing(*args):
        calls.append(args)
        if len(calls) == 9 and cut and cut.pop():
            raise RuntimeError("power cut")
        return real(*args)

    monkeypatch.setattr(compare, "_score", failing)
    with pytest.raises(RuntimeError, match="power cut"):
        compare.run_compare(cfg, progress=False, merged_lm=tiny["m"], journal=Journal(tmp_path, "compare", vars(cfg)))
    journal = Journal(tmp_path, "compare", vars(cfg))
    assert journal.resumed == 8
    calls.clear()
    resumed = compare.run_compare(cfg, progress=False, merged_lm=tiny["m"], journal=journal)
    total = 4 + 4 * (1 + 2 * 3)  # base, then umim at its own TR and two methods at three targets
    assert len(calls) == total - 8
    assert resumed["rows"] == compare_result["rows"] and resumed["base"] == compare_result["base"]
    assert Journal(tmp_path, "compare", {**vars(cfg), "n_samples": 3}).resumed == 0  # other settings: afresh


# -- qa through lm-eval --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qa_result(tiny):
    from umim_eval.tasks.qa import QAConfig, run_qa

    cfg = QAConfig(lm=tiny["lm"], run_dir=tiny["run"], tasks=[], local_tasks=["pydoc"], local_examples=6,
                   methods=["base", "umim", "select_context"], batch_size=4, device="cpu",
                   out_dir=str(tiny["root"] / "results" / "qa"))
    return run_qa(cfg)


def test_qa_runs_umim_and_matched_compressor(qa_result):
    from umim_eval.tasks.qa import qa_table

    rows, task = qa_result["rows"], qa_result["tasks"][0]
    assert task == "cloze_pydoc"
    assert rows["base"][task]["tr"] is None
    for m in ("umim", "select_context"):
        assert 0.0 < rows[m][task]["tr"] < 1.0
        assert 0.0 <= rows[m][task]["acc"] <= 1.0
    # select_context is driven per request to UMIM's TR on the context: same positions removed
    # from each context, so the same overall TR up to rounding of a few tokens
    assert rows["select_context"][task]["tr"] == pytest.approx(rows["umim"][task]["tr"], abs=0.02)
    assert "| Select Context |" in qa_table(qa_result)


def test_qa_token_reduction_is_on_the_context(tiny):
    """QA's TR is removed context positions / context tokens, the definition of every runner: a
    compressor at a fixed ratio reports that ratio (the unreduced continuations are not counted)."""
    from lm_eval.api.instance import Instance

    from umim_eval.harness.lm_eval_model import UMIMLM

    ctx = " ".join(load_documents("pydoc", "test")[:3])[:600]
    inst = [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, c), idx=i)
            for i, c in enumerate([" the end of a long continuation here", " no"])]
    comp = UMIMLM(pretrained=tiny["lm"], device="cpu", compressor="select_context", ratio=0.3)
    comp.loglikelihood(inst, disable_tqdm=True)
    original, compressed = comp._counts["loglikelihood"]
    assert original == 2 * len(comp.tokenizer(ctx)["input_ids"])
    assert comp.token_reduction_by_type["loglikelihood"] == pytest.approx(0.3, abs=0.02)


def test_compressor_at_ratio_zero_equals_plain(tiny):
    from lm_eval.api.instance import Instance

    from umim_eval.harness.lm_eval_model import UMIMLM

    reqs = [("The for statement is used to iterate over the", " elements"), ("Assignment statements", " bind names")]
    inst = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(reqs)]
    plain = UMIMLM(pretrained=tiny["lm"], device="cpu", merge="none").loglikelihood(inst, disable_tqdm=True)
    comp = UMIMLM(pretrained=tiny["lm"], device="cpu", compressor="select_context", ratio=0.0)
    got = comp.loglikelihood(inst, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(plain, got):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert comp.token_reduction == 0.0
    with pytest.raises(ValueError, match="unknown method"):
        UMIMLM(pretrained=tiny["lm"], device="cpu", compressor="nope", ratio=0.1)
    with pytest.raises(ValueError, match="ratio"):
        UMIMLM(pretrained=tiny["lm"], device="cpu", compressor="select_context")


@pytest.fixture(scope="module")
def generation_results(tiny, tmp_path_factory):
    """Summarization and math results of the tiny model on the built-in offline sets."""
    from umim_eval.tasks.math_reasoning import MathConfig, MathDataset, run_math
    from umim_eval.tasks.summarize import SummarizeConfig, run_summarize

    out = tmp_path_factory.mktemp("gen")
    summ = run_summarize(SummarizeConfig(data="local:pydoc_lead", n_samples=2, max_article_tokens=40, max_new_tokens=6,
                                         methods=["base", "umim", "select_context"], bertscore_model=None,
                                         out_dir=str(out / "summarize")), progress=False, merged_lm=tiny["m"])
    math_ = run_math(MathConfig(datasets={"arithmetic": MathDataset("local:arithmetic", question_field="problem")},
                                n_problems=2, k=2, n=2, max_new_tokens=6, chat_template=False, batch_size=2,
                                methods=["base", "umim"], out_dir=str(out / "math")),
                     progress=False, merged_lm=tiny["m"])
    return summ, math_


# -- CLI and notebooks ---------------------------------------------------------------------------------
def test_cli_writes_json_and_table(tiny, tmp_path, capsys):
    from umim_eval.cli import main

    out = tmp_path / "ppl"
    rc = main(["ppl", "--lm", tiny["lm"], "--run_dir", tiny["run"], "--datasets", '{"docs": "pydoc"}',
               "--max_tokens", "600", "--window", "100", "--out_dir", str(out)])
    assert rc == 0
    result = json.loads((out / "ppl.json").read_text())
    assert math.isfinite(result["rows"]["umim"]["docs"]["ppl"])
    assert (out / "ppl.md").read_text() in capsys.readouterr().out


@pytest.mark.parametrize("name", ["tr_vs_quality", "task_results"])
def test_notebook_executes_headless(name, tiny, compare_result, qa_result, generation_results, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from umim_eval.results import write_results

    results = tmp_path / "results"
    write_results(compare_result, results / "compare", "compare")
    for ranking in ("count", "cost"):  # the two umim_budget rankings, as `--out_dir .../compare_<ranking>` writes them
        write_results(compare_result, results / f"compare_{ranking}", "compare")
    write_results(qa_result, results / "qa", "qa")
    write_results(generation_results[0], results / "summarize", "summarization")
    write_results(generation_results[1], results / "math", "math")
    # a real benchmarks/rule_frontier.py result (runs/default, pydoc test split)
    frontier = json.loads((ROOT / "tests" / "data" / "rule_frontier.json").read_text())
    (results / "rule_frontier").mkdir()
    (results / "rule_frontier" / "rule_frontier.json").write_text(json.dumps(frontier))
    monkeypatch.setenv("UMIM_RESULTS", str(results))
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    figures = sorted(p.name for p in (results / "figures").glob("*.png"))
    assert figures == (["count_vs_cost.png", "rule_frontier.png", "tr_vs_ppl.png"] if name == "tr_vs_quality"
                       else ["math.png", "qa.png", "summarize.png"])
    assert np.all([p.stat().st_size > 1000 for p in (results / "figures").glob("*.png")])
    if name != "tr_vs_quality":
        return
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for r in frontier["rows"]:  # one table line per subset
        assert re.search(rf"^{r['method']} +\S+ +{r['rules']} +{100 * r['test_tr']:.1f}% ", printed, re.M), r
    for ranking in ("count", "cost"):  # one line per ranking, every compare row on it
        assert re.search(rf"^{ranking} +(TR +[\d.]+% PPL [\d.]+ *){{{len(compare_result['rows'])}}}$", printed, re.M)

    # without the frontier file (or one ranking) their cells print how to make it, plot nothing, and the
    # compare cells run as before
    (results / "rule_frontier" / "rule_frontier.json").unlink()
    (results / "compare_cost" / "compare.json").unlink()
    for p in (results / "figures").glob("*.png"):
        p.unlink()
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    assert sorted(p.name for p in (results / "figures").glob("*.png")) == ["tr_vs_ppl.png"]
    frontier_out = [o["text"] for c in nb.cells if c.cell_type == "code" and "rule_frontier" in c.source
                    for o in c.outputs]
    assert len(frontier_out) == 1 and frontier_out[0].count("\n") == 1, frontier_out
    assert "python benchmarks/rule_frontier.py --costs" in frontier_out[0]
    ranking_out = [o["text"] for c in nb.cells if c.cell_type == "code" and "compare_cost" in c.source
                   for o in c.outputs]
    assert len(ranking_out) == 1 and ranking_out[0].startswith(f"no {results}/compare_count"), ranking_out


def test_journal_starts_afresh_when_the_merger_or_rules_change(tmp_path):
    """The journal's settings include a hash of the merger and rules files, so pieces computed with a
    merger that was retrained since (same run_dir, same settings) are not reused."""
    import numpy as np
    import torch

    from umim.merging.merger import MergeModule, MergerConfig
    from umim.rules.store import MergeRules
    from umim_eval.cli import _inputs_stamp
    from umim_eval.tasks.compare import CompareConfig

    run = tmp_path / "run"
    merger = MergeModule(MergerConfig(hidden_size=8, num_heads=2))
    merger.save_pretrained(run / "merger")
    MergeRules(ngrams={2: np.array([[1, 2]])}, counts={2: np.array([5])}, tokenizer=None).save(run / "rules")
    cfg = CompareConfig(run_dir=str(run))
    first = _inputs_stamp(cfg)
    assert _inputs_stamp(cfg) == first
    with torch.no_grad():
        merger.query.add_(0.5)
    merger.save_pretrained(run / "merger")
    retrained = _inputs_stamp(cfg)
    MergeRules(ngrams={2: np.array([[1, 3]])}, counts={2: np.array([5])}, tokenizer=None).save(run / "rules")
    assert len({first, retrained, _inputs_stamp(cfg)}) == 3
