"""UMIM with a per-request token budget on a real tiny Llama with a (random) merger and frequency rules
mined from pydoc text: ratio 0 is the identity, requested TRs are hit within 2 points, a budget
beyond the rules reports its shortfall, segments tile the prompt and are rules, the remainder is
filled with sub-rules, the score decides what is merged first, and the TR-quality curve is
consistent with the unmerged and fixed-rule points."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm, pydoc_paragraphs

from umim.fingerprint import tokenizer_fingerprint
from umim.inference.generation import MergedLM
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.corpus import tokenize_documents
from umim.rules.mining import mine_rules
from umim.rules.store import MergeRules
from umim_eval.methods.umim_budget import (
    UMIMBudget,
    budget_curve,
    load_alignment_scores,
)


@pytest.fixture(scope="module")
def setup(tiny_tokenizer_factory):
    train = pydoc_paragraphs(0, 40)
    tok = tiny_tokenizer_factory(train, vocab_size=300)
    fp = tokenizer_fingerprint(tok)
    ids, off = tokenize_documents(train, tok, progress=False)
    rules = mine_rules(ids, off, fp, min_count=3, progress=False)
    lm = make_tiny_lm("llama", len(tok))
    torch.manual_seed(1)
    merger = MergeModule(MergerConfig(hidden_size=32, tokenizer=fp))
    torch.nn.init.normal_(merger.v_proj.weight, std=0.3)
    m = MergedLM(lm, tok, merger, rules)
    prompts = [tok(p, add_special_tokens=False)["input_ids"][:120] for p in pydoc_paragraphs(40, 60)[:6]]
    return m, tok, prompts


def _check_tiling(mp, ids, rules):
    assert sum(n for _, n in mp.segments) == len(ids)
    pos = 0
    for s, n in mp.segments:  # in order, contiguous, never past the prompt end
        assert s == pos and n >= 1
        pos += n
        if n > 1:
            assert tuple(ids[s : s + n]) in {tuple(g) for g in rules.ngrams[n].tolist()}
    assert mp.embeds.shape[0] == len(mp.segments)


def test_ratio_zero_is_identity(setup):
    m, tok, prompts = setup
    b = UMIMBudget(m, ratio=0.0)
    for ids in prompts:
        mp = b.merge(m.lm, tok, ids)
        assert mp.segments == [(i, 1) for i in range(len(ids))] and mp.tr == 0.0 and mp.shortfall == 0
        assert torch.equal(mp.embeds, m.lm.get_input_embeddings()(torch.tensor(ids)))


@pytest.mark.parametrize("score", ["count", "length"])
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2])
def test_requested_tr_is_hit(setup, ratio, score):
    m, tok, prompts = setup
    b = UMIMBudget(m, ratio=ratio, score=score)
    for ids in prompts:
        fixed = 1 - len(m.rules.segment(ids)) / len(ids)
        assert fixed > ratio + 0.05  # the test prompts have matches to spare
        mp = b.merge(m.lm, tok, ids)
        assert abs(mp.tr - ratio) <= 0.02 and mp.shortfall == 0 and mp.reason == ""
        _check_tiling(mp, ids, m.rules)
        for i, (s, n) in enumerate(mp.segments):  # surrogates from the trained merger, tokens elsewhere
            want = m.surrogate(tuple(ids[s : s + n])) if n > 1 else m.lm.get_input_embeddings()(torch.tensor(ids[s]))
            assert torch.equal(mp.embeds[i], want)


def test_per_request_ratio_overrides_default(setup):
    m, tok, prompts = setup
    b = UMIMBudget(m, ratio=0.05)
    ids = prompts[0]
    assert abs(b.merge(m.lm, tok, ids, ratio=0.2).tr - 0.2) <= 0.02
    assert abs(b.merge(m.lm, tok, ids).tr - 0.05) <= 0.02


def test_too_high_ratio_reports_shortfall(setup):
    m, tok, prompts = setup
    ids = prompts[0]
    with pytest.warns(UserWarning, match="rules match only"):
        mp = UMIMBudget(m, ratio=0.9).merge(m.lm, tok, ids)
    assert mp.segments == m.rules.segment(ids)  # everything the rules give, as fixed-rule UMIM
    assert mp.shortfall == mp.target_removed - mp.max_removable > 0 and "rules match only" in mp.reason
    _check_tiling(mp, ids, m.rules)


def _handmade(setup, ngrams: dict, counts: dict) -> MergedLM:
    m, tok, _ = setup
    rules = MergeRules(ngrams={n: np.array(g) for n, g in ngrams.items()},
                       counts={n: np.array(c) for n, c in counts.items()}, tokenizer=tokenizer_fingerprint(tok))
    return MergedLM(m.lm, tok, m.merger, rules)


def test_remainder_filled_with_sub_rules(setup):
    _, tok, _ = setup
    m = _handmade(setup, {4: [[1, 2, 3, 4]], 3: [[2, 3, 4]], 2: [[3, 4], [7, 8]]}, {4: [10], 3: [2], 2: [5, 1]})
    b = UMIMBudget(m)
    ids = [1, 2, 3, 4, 9, 9, 9, 9, 9, 9]  # longest match: the 4-gram only
    assert b.select(ids, 3) == ([(0, 4)], 3)
    assert b.select(ids, 2) == ([(1, 3)], 3)  # the 4-gram does not fit: its 3-gram suffix does
    assert b.select(ids, 1) == ([(2, 2)], 3)
    mp = b.merge(m.lm, tok, ids, ratio=0.2)
    assert mp.segments == [(0, 1), (1, 3)] + [(i, 1) for i in range(4, 10)] and mp.tr == pytest.approx(0.2)


def test_score_decides_what_merges_first(setup, tmp_path):
    _, tok, _ = setup
    m = _handmade(setup, {2: [[1, 2], [5, 6]], 3: [[7, 8, 9]]}, {2: [50, 3], 3: [1]})
    ids = [5, 6, 0, 1, 2, 0, 7, 8, 9, 0]
    assert UMIMBudget(m, score="count").select(ids, 1)[0] == [(3, 2)]
    assert UMIMBudget(m, score="length").select(ids, 2)[0] == [(6, 3)]
    path = tmp_path / "align.json"
    path.write_text(json.dumps([{"ngram": [5, 6], "score": 0.9}, {"ngram": [1, 2], "score": 0.1}]))
    assert load_alignment_scores(path) == {(5, 6): 0.9, (1, 2): 0.1}
    aligned = UMIMBudget(m, score="alignment", alignment=path)
    assert aligned.select(ids, 1)[0] == [(0, 2)]
    assert aligned.select(ids, 3)[0] == [(0, 2), (3, 2)]  # the unscored 3-gram comes last


def test_bad_settings(setup):
    m, tok, prompts = setup
    with pytest.raises(ValueError, match="unknown score"):
        UMIMBudget(m, score="random")
    with pytest.raises(ValueError, match="per-rule scores"):
        UMIMBudget(m, score="alignment")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        UMIMBudget(m, ratio=1.0)
    with pytest.raises(ValueError, match="held by merged_lm"):
        UMIMBudget(m).merge(make_tiny_lm("llama", len(tok)), tok, prompts[0])
    with pytest.raises(ValueError, match="merger and rules"):
        UMIMBudget(MergedLM(m.lm, tok))


def test_budget_curve(setup):
    m, tok, _ = setup
    texts = pydoc_paragraphs(40, 60)[:3] + ["too short"]
    rows = budget_curve(m.lm, tok, m, texts, [0.0, 0.1, 0.2], context_tokens=60, target_tokens=12, progress=False)
    by = {(r["method"], r["target_tr"]): r for r in rows}
    assert [r["method"] for r in rows] == ["none", "umim"] + ["umim_budget"] * 3
    assert all(r["n_texts"] == 3 for r in rows)  # the short text is skipped
    assert by[("none", None)]["achieved_tr"] == 0.0
    assert by[("umim_budget", 0.0)]["nll"] == pytest.approx(by[("none", None)]["nll"], abs=1e-9)
    for r in (0.1, 0.2):
        assert abs(by[("umim_budget", r)]["achieved_tr"] - r) <= 0.02 and by[("umim_budget", r)]["n_short"] == 0
    assert by[("umim", None)]["achieved_tr"] > 0.2
    assert all(np.isfinite(r["nll"]) and r["ppl"] == pytest.approx(np.exp(r["nll"])) for r in rows)
