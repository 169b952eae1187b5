"""Generation-quality metrics against hand-computed values and the reference packages, and the
App. F.1 runner end to end on a tiny Llama with a tiny merger and rules (all local, no network)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import TEXT_A, make_tiny_lm

from umim.fingerprint import tokenizer_fingerprint
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.corpus import CorpusError
from umim.rules.store import MergeRules
from umim_eval import generation_metrics as gm
from umim_eval.cli import save_results
from umim_eval.tasks.gen_quality import (
    GenQualityConfig,
    gen_quality_tables,
    run_gen_quality,
)

# -- repetition / diversity ---------------------------------------------------------------------------


def test_rep_and_dist_by_hand():
    samples = [[1, 2, 1, 2, 1], [3, 4, 5], [7]]
    # bigrams: sample 0 has (1,2),(2,1),(1,2),(2,1): 2 unique of 4 -> 50 % repeated; sample 1: 0 %;
    # sample 2 has none and is left out of the mean.
    assert gm.rep_n(samples, 2) == pytest.approx(25.0)
    # corpus: 6 bigrams, distinct {(1,2),(2,1),(3,4),(4,5)}
    assert gm.dist_n(samples, 2) == pytest.approx(100 * 4 / 6)
    # trigrams: (1,2,1),(2,1,2),(1,2,1) -> 1 - 2/3; (3,4,5) -> 0
    assert gm.rep_n(samples, 3) == pytest.approx(100 * (1 - 2 / 3) / 2)
    assert gm.dist_n(samples, 3) == pytest.approx(100 * 3 / 4)
    assert math.isnan(gm.rep_n([[1], [2]], 2)) and math.isnan(gm.dist_n([[1]], 2))
    assert gm.rep_n(gm.whitespace_tokens(["a b a b"]), 2) == pytest.approx(100 / 3)
    with pytest.raises(ValueError):
        gm.rep_n(samples, 0)


# -- ROUGE / chrF -------------------------------------------------------------------------------------


def test_rouge_by_hand():
    r = gm.rouge(["the cat sat on the mat"], ["the cat lay on the mat"])
    # bigrams: 3 shared (the cat, on the, the mat) of 5 on each side -> P = R = F = 3/5
    assert r["rouge2"] == pytest.approx(60.0)
    # unigrams: the, cat, on, the, mat shared: 5/6; the LCS has the same 5 tokens
    assert r["rouge1"] == pytest.approx(100 * 5 / 6) and r["rougeL"] == pytest.approx(100 * 5 / 6)
    # two pairs: the mean of per-pair F1 (second pair identical -> 100)
    assert gm.rouge(["the cat sat on the mat", "dog"],
                    ["the cat lay on the mat", "dog"])["rouge2"] == pytest.approx(30.0)


def test_rouge_lsum_uses_newline_sentences():
    pred, ref = "cat sat.\ndog ran.", "dog ran.\ncat sat."
    r = gm.rouge([pred], [ref])
    assert r["rougeL"] == pytest.approx(50.0)  # LCS of "cat sat dog ran" / "dog ran cat sat" is 2 of 4
    assert r["rougeLsum"] == pytest.approx(100.0)  # each reference sentence is matched in full
    flat = gm.rouge(["cat sat. dog ran."], ["dog ran. cat sat."], split_sentences=True)
    assert flat["rougeLsum"] == pytest.approx(100.0)
    assert gm.rouge(["cat sat. dog ran."], ["dog ran. cat sat."])["rougeLsum"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="predictions"):
        gm.rouge(["a"], ["a", "b"])


def test_chrf_extremes():
    texts = ["the quick brown fox", "jumps over the lazy dog"]
    assert gm.chrf(texts, texts) == pytest.approx(100.0)
    assert gm.chrf(["aaaa bbbb"], ["xyz qqq"]) == pytest.approx(0.0, abs=1e-6)
    assert 0 < gm.chrf(["the quick brown cat"], ["the quick brown fox"]) < 100


# -- tiny encoders saved to disk ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_factory):
    return tiny_tokenizer_factory(TEXT_A * 3, vocab_size=120)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_lm("llama", len(tok), context=64).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("bert")
    words = sorted({w for line in TEXT_A for w in line.split()})
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = BertTokenizer(str(path / "vocab.txt"), model_max_length=64)  # bert_score needs a finite limit
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


CANDS = ["the quick brown fox", "a dog and a fox", "the lazy dog sleeps"]
REFS = ["the quick brown fox", "the fox runs in the forest", "once upon a time"]


def test_bertscore_equals_bert_score_package_on_bert(bert_dir):
    import bert_score

    ours = gm.BertScorer(bert_dir, num_layers=1, device="cpu").score(CANDS, REFS)
    P, R, F = bert_score.score(CANDS, REFS, model_type=bert_dir, num_layers=1, device="cpu")
    torch.testing.assert_close(ours["precision"], P, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["recall"], R, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["f1"], F, atol=1e-5, rtol=0)
    assert ours["f1"][0] == pytest.approx(1.0) and bool((ours["f1"][1:] < 1).all())


def test_bertscore_weighs_unknown_words_like_bert_score(bert_dir):
    """Out-of-vocabulary words become [UNK], a token of the text: weight 1, as in bert_score."""
    import bert_score

    cands, refs = ["the quick zebra fox", "a yak and a dog"], ["the quick brown fox", "a dog and a gnu"]
    ours = gm.BertScorer(bert_dir, num_layers=1, device="cpu").score(cands, refs)
    P, R, F = bert_score.score(cands, refs, model_type=bert_dir, num_layers=1, device="cpu")
    torch.testing.assert_close(ours["f1"], F, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["precision"], P, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [1, 2])
def test_bertscore_llama_states_equal_bert_scores_truncated_model(tmp_path, tok, layer):
    """bert_score drops the layers above num_layers and reads the model's output, after its final
    norm; our states are the same (bert_score.score itself refuses this tokenizer: no length limit).
    The norm's weights are random: with all ones it would only rescale, which cosines do not see."""
    import bert_score.utils

    lm = make_tiny_lm("llama", len(tok), context=64)
    torch.manual_seed(0)
    lm.model.norm.weight.data.uniform_(0.2, 2.0)
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    scorer = gm.BertScorer(str(tmp_path), num_layers=layer, device="cpu")
    truncated = bert_score.utils.get_model(str(tmp_path), layer)
    for text, (ours, _) in zip(CANDS, scorer.embed(CANDS)):
        ids = torch.tensor([scorer._encode(text)])
        theirs = torch.nn.functional.normalize(truncated(input_ids=ids).last_hidden_state[0].float(), dim=-1)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_bertscore_on_local_llama(llama_dir):
    scorer = gm.BertScorer(llama_dir, num_layers=1, batch_size=2, device="cpu")
    assert scorer.f1(CANDS, CANDS) == pytest.approx(100.0)
    mixed = scorer.score(CANDS, REFS)["f1"]
    assert mixed[0] == pytest.approx(1.0) and bool((mixed[1:] < 0.999).all())
    assert scorer.score(["", "the dog"], ["the dog", ""])["f1"].tolist() == [0.0, 0.0]  # empty scores 0
    assert gm.bertscore(CANDS, REFS, llama_dir, num_layers=2, device="cpu") < 100
    with pytest.raises(ValueError, match="num_layers"):
        gm.BertScorer(llama_dir)  # no tuned default layer for a local model
    with pytest.raises(ValueError, match="outside"):
        gm.BertScorer(llama_dir, num_layers=3)


# -- MAUVE --------------------------------------------------------------------------------------------


def test_mauve_identical_and_far_apart_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 8))
    assert gm.mauve_from_features(a, a.copy(), num_buckets=4) == pytest.approx(100.0)
    far = np.zeros((20, 8))
    far[:, 0] = 1
    far_q = np.zeros((20, 8))
    far_q[:, 1] = 1
    far += 0.01 * rng.normal(size=far.shape)
    far_q += 0.01 * rng.normal(size=far_q.shape)
    assert gm.mauve_from_features(far, far_q, num_buckets=2) < 5.0
    with pytest.raises(ValueError, match="at least 4 samples"):
        gm.mauve_from_features(a[:3], a, num_buckets=4)
    assert gm.mauve_buckets(250, 400) == 25 and gm.mauve_buckets(5, 5) == 2


def test_mauve_featurizer_on_local_llama(llama_dir):
    f = gm.MauveFeaturizer(llama_dir, batch_size=2, device="cpu")
    feats = f.features(TEXT_A + [""])
    assert feats.shape == (5, 32) and np.isfinite(feats).all()
    # right padding leaves a causal model's last-token state as it is alone
    np.testing.assert_allclose(feats[0], f.features(TEXT_A[:1])[0], atol=1e-5)
    assert gm.mauve(TEXT_A, TEXT_A, f, num_buckets=2) == pytest.approx(100.0)


# -- the runner end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """100 paragraphs of TEXT_A words: the index split leaves 5 test documents."""
    rnd = random.Random(0)
    words = " ".join(TEXT_A).split()
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(" ".join(rnd.choice(words) for _ in range(30)) for _ in range(100)) + "\n")
    return str(path)


def _run_dir(root, tok, llama_dir, grams: dict[int, set]) -> str:
    fp = tokenizer_fingerprint(tok)
    torch.manual_seed(1)
    merger = MergeModule(MergerConfig(hidden_size=32, tokenizer=fp))
    torch.nn.init.normal_(merger.v_proj.weight, std=0.3)
    merger.save_pretrained(root / "merger")
    MergeRules(ngrams={n: np.array(sorted(g)) for n, g in grams.items()},
               counts={n: np.ones(len(g), dtype=np.int64) for n, g in grams.items()}, tokenizer=fp).save(root / "rules")
    return str(root)


def _cfg(llama_dir, corpus, run_dir, **kw) -> GenQualityConfig:
    base = dict(lm=llama_dir, run_dir=run_dir, data=corpus, split="test", n_samples=4, prompt_tokens=8, ref_tokens=8,
                new_tokens=8, decodings=["greedy", "top_p"], runs=1, batch_size=4, bertscore_model=llama_dir,
                bertscore_layers=1, mauve_featurizer=llama_dir, device="cpu", seed=0)
    return GenQualityConfig(**{**base, **kw})


def test_run_gen_quality_without_matches_equals_base(tmp_path, tok, llama_dir, corpus):
    pad = tok.pad_token_id  # never produced by encoding text, so no rule ever matches
    run = _run_dir(tmp_path / "run", tok, llama_dir, {2: {(pad, pad)}})
    res = run_gen_quality(_cfg(llama_dir, corpus, run, out_dir=str(tmp_path / "out")), progress=False)
    save_results("gen-quality", res, str(tmp_path / "out"))  # runners return results; the command writes them
    assert res["n_samples"] == 4 and set(res["decodings"]) == {"greedy", "top_p"}
    for dec in ("greedy", "top_p"):
        base, merged = res["decodings"][dec]["base"], res["decodings"][dec]["merged"]
        expected = {"rep-2", "dist-2", "rep-3", "dist-3", "rep-4", "dist-4", "rouge2", "rougeL", "rougeLsum",
                    "bertscore", "chrf", "mauve"}
        assert set(base["metrics"]) == expected and len(base["runs"]) == 1
        # nothing merges: same tokens (same seeds for sampling), same scores, zero reduction
        assert merged["metrics"] == base["metrics"] and merged["tr"] == 0.0 and merged["tr_prompt"] == 0.0
        m = base["metrics"]
        assert all(0 <= m[k] <= 100 for k in expected), m
        assert res["examples"][f"{dec}/base"] == res["examples"][f"{dec}/merged"]
    on_disk = json.loads((tmp_path / "out" / "gen_quality.json").read_text())
    assert on_disk["decodings"]["greedy"]["base"]["metrics"] == res["decodings"]["greedy"]["base"]["metrics"]
    tables = (tmp_path / "out" / "gen_quality.md").read_text()
    assert tables == gen_quality_tables(res)
    for row in ("Greedy (Base model)", "Greedy (Merge model)", "Top-p (Base model)", "Top-p (Merge model)",
                "Reference (human)", "| Rep-2 |", "| ROUGE-2 |", "| MAUVE |", "TR (%)"):
        assert row in tables


def test_run_gen_quality_with_merges_reduces_tokens(tmp_path, tok, llama_dir, corpus):
    from umim.rules.corpus import load_documents

    seqs = tok(load_documents(corpus, "test"), add_special_tokens=False)["input_ids"]
    grams = {n: {tuple(s[i : i + n]) for s in seqs for i in range(0, len(s) - n + 1)} for n in (2, 3)}
    run = _run_dir(tmp_path / "run", tok, llama_dir, grams)
    res = run_gen_quality(_cfg(llama_dir, corpus, run, decodings=["greedy"]), progress=False)
    merged = res["decodings"]["greedy"]["merged"]
    assert merged["tr_prompt"] > 0 and merged["tr"] > 0
    assert res["decodings"]["greedy"]["base"].get("tr") is None
    assert "Greedy (Merge model)" in gen_quality_tables(res)


def test_run_gen_quality_clear_errors(tmp_path, tok, llama_dir, corpus):
    with pytest.raises(ValueError, match="unknown decoding"):
        run_gen_quality(_cfg(llama_dir, corpus, None, decodings=["beam"]), progress=False)
    with pytest.raises(ValueError, match="run_dir"):
        run_gen_quality(_cfg(llama_dir, corpus, None), progress=False)
    pad = tok.pad_token_id
    run = _run_dir(tmp_path / "run", tok, llama_dir, {2: {(pad, pad)}})
    with pytest.raises(CorpusError, match="5 of 5 documents"):
        run_gen_quality(_cfg(llama_dir, corpus, run, n_samples=6), progress=False)
    with pytest.raises(CorpusError, match="0 of 5 documents"):
        run_gen_quality(_cfg(llama_dir, corpus, run, prompt_tokens=100), progress=False)
