"""Two-stage perplexity (paper Pseudocode 5) on real tiny models (Llama and GPT-2 built from
configs): the batched two-pass version equals the literal one-forward-per-token definition, every
token is scored exactly once, no merges gives the plain LM perplexity, at most two forwards per
batch, and TR is 1 - compressed / original."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm

from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.store import MergeRules
from umim_eval.scoring.perplexity import perplexity, reference_nll, two_stage_nll

V = 48
FP = {"name": "synthetic", "vocab_size": V, "vocab_sha256": "0" * 64}


def _model(arch: str):
    return make_tiny_lm(arch, V, context=64)


def _rules(grams: list[list[int]]) -> MergeRules:
    by_n: dict[int, list] = {}
    for g in grams:
        by_n.setdefault(len(g), []).append(g)
    return MergeRules(ngrams={n: np.array(g) for n, g in by_n.items()},
                      counts={n: np.ones(len(g), dtype=np.int64) for n, g in by_n.items()}, tokenizer=FP)


@pytest.fixture(scope="module")
def merger():
    torch.manual_seed(1)
    m = MergeModule(MergerConfig(hidden_size=32))
    torch.nn.init.normal_(m.v_proj.weight, std=0.3)  # not the mean: surrogates differ from any token
    return m.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def batch():
    """Two rows (lengths 26 and 17, right-padded) and rules giving merges of length 4, 3, 2: one at
    the very start of a row, adjacent ones, and one that ends a row."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, V, (2, 26), generator=g)
    lengths = torch.tensor([26, 17])
    r0, r1 = ids[0].tolist(), ids[1].tolist()
    grams = [r0[0:4], r0[7:10], r0[10:12], r0[24:26], r1[3:6], r1[15:17], r1[9:11]]
    ids[1, 17:] = 0  # padding
    return ids, lengths, _rules(grams)


def test_batch_has_merges_of_every_length(batch):
    ids, lengths, rules = batch
    starts, lens = rules.matcher.segment_batch(ids.numpy(), lengths.numpy())
    assert {2, 3, 4} <= set(lens.ravel().tolist())
    assert lens[0, 0] == 4  # a merge at the start of a row
    assert lens[0, (lens[0] > 0).sum() - 1] > 1  # and one that ends it


def test_two_stage_equals_reference(lm, merger, batch):
    ids, lengths, rules = batch
    fast = two_stage_nll(lm, merger, rules, ids, lengths)
    ref = reference_nll(lm, merger, rules, ids, lengths)
    assert fast.nll_sum.dtype == torch.float64
    torch.testing.assert_close(fast.nll_sum, ref.nll_sum, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.token_nll, ref.token_nll, rtol=1e-4, atol=1e-4, equal_nan=True)
    for f in ("n_scored", "n_compressed", "n_original", "n_skipped"):
        assert torch.equal(getattr(fast, f), getattr(ref, f)), f
    assert (fast.n_skipped > 0).all()
    # merging changes the result (so the comparison above is not between two plain runs)
    plain = two_stage_nll(lm, None, None, ids, lengths)
    assert not torch.allclose(plain.nll_sum, fast.nll_sum, rtol=1e-3)


def test_every_token_scored_exactly_once(lm, merger, batch):
    ids, lengths, rules = batch
    r = two_stage_nll(lm, merger, rules, ids, lengths)
    assert torch.equal(r.n_scored, lengths - 1)
    pos = torch.arange(ids.shape[1])[None]
    scored = ~torch.isnan(r.token_nll)
    assert torch.equal(scored, (pos >= 1) & (pos < lengths[:, None]))  # all but x_0 and padding
    assert torch.equal(r.n_skipped, r.n_original - r.n_compressed)


def test_at_most_two_forwards_per_batch(lm, merger, batch):
    ids, lengths, rules = batch
    calls = []
    handle = lm.base_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        two_stage_nll(lm, merger, rules, ids, lengths)
        assert len(calls) == 2  # merges present: stage 1 + one batched stage 2
        calls.clear()
        two_stage_nll(lm, merger, _rules([]), ids, lengths)
        assert len(calls) == 1  # nothing skipped: stage 2 is not run
        calls.clear()
        stream = torch.cat([ids[0], ids[0], ids[0][:9]])  # windows of 16: 16, 16, 16, 13 (merges in each)
        perplexity(lm, merger, rules, stream, window=16, batch_size=3, progress=False)
        assert len(calls) == 2 * 2  # 2 batches, both with skipped tokens
        calls.clear()
        reference_nll(lm, merger, rules, ids, lengths)
        assert len(calls) > 2  # the hook does count the one-forward-per-token definition
    finally:
        handle.remove()


@pytest.mark.parametrize("rules", [None, "empty"])
def test_no_merges_equals_plain_lm_perplexity(lm, rules):
    g = torch.Generator().manual_seed(9)
    stream = torch.randint(0, V, (16 * 4 + 7,), generator=g)
    res = perplexity(lm, None, _rules([]) if rules else None, stream, window=16, batch_size=3, progress=False)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in stream.split(16):
            logits = lm(input_ids=w[None]).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            n += len(w) - 1
    assert res["tokens_scored"] == n == len(stream) - 5
    assert res["tr"] == 0.0
    assert math.isclose(res["nll"], nll / n, rel_tol=1e-5)
    assert math.isclose(res["ppl"], math.exp(nll / n), rel_tol=1e-5)


def test_perplexity_matches_reference_and_reports_tr(lm, merger, batch):
    ids, _, rules = batch
    stream = torch.cat([ids[0], ids[1, :17], ids[0, :11]])  # 54 tokens -> windows 20, 20, 14
    res = perplexity(lm, merger, rules, stream, window=20, batch_size=2, progress=False)
    windows = list(stream.split(20))
    segs = [rules.segment(w.numpy()) for w in windows]
    compressed, original = sum(map(len, segs)), len(stream)
    assert compressed < original
    assert res["tr"] == pytest.approx(1 - compressed / original, abs=1e-12)
    assert res["tokens_scored"] == original - len(windows)
    ref_nll = sum(float(reference_nll(lm, merger, rules, w[None]).nll_sum[0]) for w in windows)
    assert res["nll"] == pytest.approx(ref_nll / res["tokens_scored"], rel=1e-4)
    assert res["ppl"] == pytest.approx(math.exp(res["nll"]), rel=1e-12)


def test_clear_errors(lm, merger, batch):
    ids, lengths, rules = batch
    with pytest.raises(ValueError, match="window"):
        perplexity(lm, merger, rules, ids[0], window=1, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(lm, merger, rules, [], progress=False)
    with pytest.raises(ValueError, match="context"):
        perplexity(lm, merger, rules, ids[0], window=65, progress=False)
    with pytest.raises(ValueError, match="empty"):
        two_stage_nll(lm, merger, rules, torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="lengths"):
        two_stage_nll(lm, merger, rules, ids, torch.tensor([26, 0]))
    with pytest.raises(ValueError, match="no merger"):
        two_stage_nll(lm, None, rules, ids, lengths)
