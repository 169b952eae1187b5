"""QuickMerge++ saliency merging on real tiny models (Llama with GQA and GPT-2, eager attention) and
on the embedded SmolLM2: ratio 0 is the identity, every ratio hits its TR, groups tile the prompt
in order, each element is the mass-weighted average of its group, the grouping cuts the least
similar neighbour links, and the entropy budget merges more where attention is diffuse."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXT_A, TEXT_B, make_tiny_lm

from umim_eval.methods.base import MergedPrompt, n_removed
from umim_eval.methods.quickmerge import (
    ALPHA,
    QuickMerge,
    attention_entropy,
    contiguous_groups,
    entropy_budget,
)
from umim_eval.scoring.prompt_inputs import continuation_nll_from, prompt_inputs

RATIOS = (0.1, 0.25, 0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tok):
    return make_tiny_lm(request.param, len(tok), eager=True)


@pytest.fixture(scope="module")
def prompts(tok):
    texts = [" ".join(TEXT_A), " ".join(TEXT_A[::-1]), " ".join(TEXT_A[1:] + TEXT_B[:1]), " ".join(TEXT_A[:3])]
    out = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(20 <= len(p) <= 100 for p in out), "long enough for a 2-point TR, within GPT-2's 128 positions"
    return out


def _check_tiling(mp: MergedPrompt, n: int, d: int):
    starts = [s for s, _ in mp.segments]
    assert starts[0] == 0 and all(length >= 1 for _, length in mp.segments)
    assert all(s + length == nxt for (s, length), nxt in zip(mp.segments, starts[1:])), "contiguous, in order"
    assert sum(length for _, length in mp.segments) == n == mp.n_original, "the groups end at the prompt end"
    assert mp.embeds.shape == (len(mp.segments), d)


def test_knob_checks():
    assert QuickMerge(ratio=0.25).ratio == 0.25 and QuickMerge(ratio=None).ratio is None
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ratio"):
            QuickMerge(ratio=bad)
    with pytest.raises(ValueError, match="alpha"):
        QuickMerge(ratio=None, alpha=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        QuickMerge(ratio=0.1, epsilon=1.0)


# -- ratio 0 is the identity ----------------------------------------------------------------------------
def test_ratio_zero_is_the_plain_lm(lm, tok, prompts):
    ids, target = prompts[0][:20], prompts[0][20:]
    mp = QuickMerge(ratio=0.0).merge(lm, tok, ids)
    assert mp.segments == [(i, 1) for i in range(20)] and mp.tr == 0.0
    assert torch.equal(mp.embeds, lm.get_input_embeddings()(torch.tensor(ids)))
    nll = continuation_nll_from(lm, prompt_inputs(QuickMerge(ratio=0.0), lm, tok, ids), target)
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=torch.tensor([ids + target])).logits[0, 19:-1].double(), -1)
    plain = -logp.gather(-1, torch.tensor(target)[:, None])[:, 0]
    torch.testing.assert_close(nll, plain, rtol=0, atol=1e-6)


# -- the shared knob: target TR, tiling, token 0 alone ---------------------------------------------------
@pytest.mark.parametrize("ratio", RATIOS)
def test_hits_target_tr_and_tiles_the_prompt(lm, tok, prompts, ratio):
    d = lm.get_input_embeddings().weight.shape[1]
    for ids in prompts:
        mp = QuickMerge(ratio=ratio).merge(lm, tok, ids)
        assert abs(mp.tr - ratio) <= 0.02, (len(ids), mp.tr)
        assert len(mp.segments) == len(ids) - n_removed(ratio, len(ids))
        _check_tiling(mp, len(ids), d)
        assert mp.segments[0] == (0, 1), "the attention sink is never merged"
        assert any(length > 1 for _, length in mp.segments)
        assert mp.embeds.dtype == lm.get_input_embeddings().weight.dtype and torch.isfinite(mp.embeds).all()


def test_element_is_the_mass_weighted_average_of_its_group(lm, tok, prompts):
    ids, qm = prompts[1], QuickMerge(ratio=0.5)
    mp = qm.merge(lm, tok, ids)
    x = lm.get_input_embeddings()(torch.tensor(ids)).double()
    sal = 1.0 - qm.entropy(lm, torch.tensor(ids)).double()
    top = set(torch.topk(sal, len(mp.segments)).indices.tolist())
    k = max(range(len(mp.segments)), key=lambda i: mp.segments[i][1])  # the largest group
    start, length = mp.segments[k]
    m = torch.tensor([max(sal[j].item(), qm.epsilon) if j in top else qm.epsilon for j in range(start, start + length)],
                     dtype=torch.float64)
    expected = (m[:, None] * x[start : start + length]).sum(0) / m.sum()
    torch.testing.assert_close(mp.embeds[k].double(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, x[start : start + length].mean(0), atol=1e-4), "weights are not uniform"


def test_groups_cut_the_least_similar_links():
    blocks = torch.eye(3).repeat_interleave(torch.tensor([3, 4, 2]), dim=0)  # [9, 3]: 3 blocks of equal rows
    x = blocks + 0.01 * torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
    assert contiguous_groups(x, 3, keep_first=False).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert contiguous_groups(x, 4, keep_first=True).tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3]
    assert contiguous_groups(x, 9).tolist() == list(range(9))
    assert contiguous_groups(x, 1, keep_first=False).tolist() == [0] * 9
    with pytest.raises(ValueError, match="n_groups"):
        contiguous_groups(x, 10)


# -- the entropy budget ---------------------------------------------------------------------------------
def _causal(scores: torch.Tensor) -> torch.Tensor:
    """[N, N] logits -> [1, 1, N, N] causal attention probabilities."""
    N = scores.shape[0]
    return torch.softmax(scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf")), -1)[None, None]


def test_entropy_is_normalized_and_drives_the_budget():
    N = 12
    uniform = attention_entropy([_causal(torch.zeros(N, N))] * 2)
    sharp = attention_entropy([_causal(100.0 * torch.eye(N))] * 2)  # every query looks at itself only
    torch.testing.assert_close(uniform[1:], torch.ones(N - 1), rtol=0, atol=1e-5)
    assert uniform[0] == 0 and sharp.max() < 1e-3
    assert entropy_budget(uniform) == 2, "diffuse attention everywhere: token 0 + one group"
    assert entropy_budget(sharp) == N, "sharp attention everywhere: nothing merges"
    mixed = torch.cat([torch.zeros(1), torch.tensor([0.2, 0.9] * 5 + [0.3])])  # 6 of 11 below alpha
    assert entropy_budget(mixed, ALPHA) == 7 and entropy_budget(mixed, 0.95) == N
    # one layer uniform, one sharp: the layer mean sits in the middle
    torch.testing.assert_close(attention_entropy([_causal(torch.zeros(N, N)), _causal(100.0 * torch.eye(N))])[1:],
                               torch.full((N - 1,), 0.5), rtol=0, atol=1e-3)


def test_entropy_budget_on_tiny_models(lm, tok, prompts):
    qm = QuickMerge(ratio=None)
    d = lm.get_input_embeddings().weight.shape[1]
    for ids in prompts:
        mp = qm.merge(lm, tok, ids)
        assert 0.0 <= mp.tr < 1.0
        assert len(mp.segments) == entropy_budget(qm.entropy(lm, torch.tensor(ids)))
        _check_tiling(mp, len(ids), d)


def test_non_eager_attention_is_refused(tok, prompts):
    lm = make_tiny_lm("llama", len(tok), eager=False)
    with pytest.raises(ValueError, match="eager"):
        QuickMerge(ratio=0.25).merge(lm, tok, prompts[0])
    assert QuickMerge(ratio=0.0).merge(lm, tok, prompts[0]).tr == 0.0, "ratio 0 needs no attention"


def test_entropy_budget_merges_repetitive_text_more_on_smollm2():
    """On the real LM, repeating one sentence spreads attention over the earlier copies (higher
    normalized entropy), so the entropy budget removes more than on a documentation paragraph."""
    from umim.lm import LMSpec, load_lm, load_tokenizer
    from umim.rules.corpus import load_documents

    spec = LMSpec("embedded")
    lm, tok = load_lm(spec), load_tokenizer(spec)
    lm.set_attn_implementation("eager")
    qm = QuickMerge(ratio=None)
    text = next(d for d in load_documents("pydoc", "test") if len(tok(d)["input_ids"]) >= 64)
    prose = tok(text, add_special_tokens=False)["input_ids"][:64]
    repeated = tok(" the cat sat on the mat." * 12, add_special_tokens=False)["input_ids"][:64]
    tr_prose, tr_rep = qm.merge(lm, tok, prose).tr, qm.merge(lm, tok, repeated).tr
    assert 0.0 < tr_prose < tr_rep < 1.0, (tr_prose, tr_rep)
