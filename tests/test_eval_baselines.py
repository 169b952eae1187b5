"""Context-reduction baselines on real tiny models (Llama with GQA and GPT-2, built from configs):
every method hits the requested TR, ratio 0 is the identity, the cache never exceeds its budget,
StreamingLLM keeps sinks + the recent window (and its one-forward mask equals the evicting cache),
H2O keeps the heaviest hitters, Select Context drops the lowest self-information tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_lm

from umim_eval.methods import (
    BASELINES,
    H2O,
    KVPolicy,
    SelectContext,
    StreamingLLM,
    continuation_nll,
    match_tr,
    policy_nll,
    self_information,
    visible_mask,
)
from umim_eval.methods.base import n_removed

RATIOS = (0.1, 0.3, 0.5)
L = 64


def _model(arch: str, vocab: int):
    return make_tiny_lm(arch, vocab, eager=True)  # H2O reads attention weights


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tok):
    return _model(request.param, len(tok))


@pytest.fixture(scope="module")
def ids(tok):
    """[2, L] random token ids (KV policies score rows of equal length)."""
    return torch.randint(0, len(tok), (2, L), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def prompts(tok):
    from conftest import TEXT_A, TEXT_B

    texts = [" ".join(TEXT_A), " ".join(TEXT_A[::-1]), " ".join(TEXT_A[1:] + TEXT_B[:1])]
    out = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(25 <= len(p) <= 128 for p in out), "long enough for a 2-point TR, within GPT-2's 128 positions"
    return out


@torch.no_grad()
def _plain_nll(lm, ids: torch.Tensor) -> torch.Tensor:
    """[B, L - 1] NLL of tokens 1.. under the uncompressed LM (one forward, no cache)."""
    logp = torch.log_softmax(lm(input_ids=ids).logits[:, :-1].float(), -1)
    return -logp.gather(-1, ids[:, 1:, None])[..., 0].double()


KV_POLICIES = [StreamingLLM, H2O]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the shared knob ------------------------------------------------------------------------------------
def test_registry_and_ratio_checks():
    assert set(BASELINES) == {"select_context", "llmlingua1", "llmlingua2", "streaming_llm", "h2o"}
    for cls in BASELINES.values():
        assert cls(ratio=0.25).ratio == 0.25
        for bad in (-0.1, 1.0):
            with pytest.raises(ValueError, match="ratio"):
                cls(ratio=bad)


# -- ratio 0 is the identity ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", KV_POLICIES)
@pytest.mark.parametrize("step_by_step", [False, True])
def test_kv_ratio_zero_is_plain_lm(lm, ids, cls, step_by_step):
    r = policy_nll(lm, ids, cls(ratio=0.0), step_by_step=step_by_step)
    torch.testing.assert_close(r.token_nll[:, 1:], _plain_nll(lm, ids), atol=1e-5, rtol=1e-5)
    assert r.cache_len.tolist() == list(range(1, L)) and r.tr_final == 0.0 and r.tr_mean == 0.0


def test_select_context_ratio_zero_is_identity(lm, tok, prompts):
    for p in prompts:
        c = SelectContext(0.0).compress(lm, tok, p)
        assert c.ids == p and c.kept == list(range(len(p))) and c.tr == 0.0
        torch.testing.assert_close(lm(input_ids=torch.tensor([c.ids])).logits, lm(input_ids=torch.tensor([p])).logits,
                                   atol=0, rtol=0)


# -- matched TR -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("cls", KV_POLICIES)
def test_kv_policy_hits_tr(lm, ids, cls, ratio):
    r = policy_nll(lm, ids, cls(ratio=ratio))
    assert abs(r.tr_final - ratio) <= 0.02 and abs(r.tr_mean - ratio) <= 0.02
    assert torch.isfinite(r.token_nll[:, 1:]).all()
    # fixed schedule: the cache fills up, then holds (1 - ratio) of the whole text
    f = policy_nll(lm, ids, cls(ratio=ratio), schedule="fixed")
    assert abs(f.tr_final - ratio) <= 0.02 and f.tr_mean < f.tr_final


@pytest.mark.parametrize("ratio", RATIOS)
def test_select_context_hits_tr(lm, tok, prompts, ratio):
    for p in prompts:
        c = SelectContext(ratio).compress(lm, tok, p)
        assert abs(c.tr - ratio) <= 0.02
        assert c.ids == [p[i] for i in c.kept]
    # short prompts cannot reach the ratio exactly: the error is bounded by half a token
    for n in (1, 2, 3, 7):
        c = SelectContext(ratio).compress(lm, tok, list(range(2, 2 + n)))
        assert abs(c.tr - ratio) <= 0.5 / n + 1e-9 or len(c.ids) == 1


# -- budgets and the evicting cache ---------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["proportional", "fixed"])
@pytest.mark.parametrize("cls", KV_POLICIES)
def test_cache_never_exceeds_budget(lm, ids, cls, schedule):
    policy = cls(ratio=0.4)
    r = policy_nll(lm, ids, policy, schedule=schedule, step_by_step=True)
    budget = torch.tensor([policy.budget(t, L - 1, schedule) for t in range(1, L)])
    assert (r.cache_len <= budget).all() and (r.cache_len == budget).all()  # evicts only what it must
    for pos in r.kept_positions.values():  # every layer and head holds distinct, ascending positions
        assert pos.shape[-1] == int(r.cache_len[-1]) and (pos.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("cls", [StreamingLLM])  # H2O grows to its budget first: the next test
def test_prompt_schedule_reduces_only_the_prompt(lm, ids, cls):
    """``prompt``: while the first P tokens are read the cache loses round(ratio * seen) entries; after
    them the deficit stays round(ratio * P): the cache of a prompt reduced by ``ratio``, then unreduced."""
    P, ratio = L // 2, 0.4
    r = policy_nll(lm, ids, cls(ratio=ratio), schedule="prompt", prompt_len=P, step_by_step=True)
    seen = torch.arange(1, L)
    deficit = torch.tensor([n_removed(ratio, min(int(n), P)) for n in seen])
    want = torch.maximum(seen - deficit, torch.minimum(seen, torch.tensor(cls(ratio=ratio).min_entries)))
    assert torch.equal(r.cache_len, want)
    assert abs((L - 1 - int(r.cache_len[-1])) / P - ratio) <= 0.02  # TR on the prompt scale
    with pytest.raises(ValueError, match="prompt_len"):
        policy_nll(lm, ids, cls(ratio=ratio), schedule="prompt")


@pytest.mark.parametrize("ratio", [0.25, 0.4, 0.6])
def test_h2o_grows_to_its_budget_before_evicting(lm, ids, ratio):
    """As published, H2O evicts only once the cache holds the prompt's allowance P - round(ratio * P):
    the early tokens (the attention sink among them) are all kept until then, the prompt ends at the
    same cache size as StreamingLLM's, and every later token adds one entry."""
    P = L // 2
    r = policy_nll(lm, ids, H2O(ratio=ratio), schedule="prompt", prompt_len=P, step_by_step=True)
    allowance = P - n_removed(ratio, P)
    seen = torch.arange(1, L)
    want = torch.minimum(seen, allowance + torch.clamp(seen - P, min=0))
    assert torch.equal(r.cache_len, want)
    assert abs((L - 1 - int(r.cache_len[-1])) / P - ratio) <= 0.02


@pytest.mark.parametrize("schedule", ["proportional", "fixed", "prompt"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_streaming_mask_equals_evicting_cache(lm, ids, ratio, schedule):
    fast = policy_nll(lm, ids, StreamingLLM(ratio), schedule=schedule, prompt_len=L // 2)
    slow = policy_nll(lm, ids, StreamingLLM(ratio), schedule=schedule, step_by_step=True, prompt_len=L // 2)
    torch.testing.assert_close(fast.token_nll, slow.token_nll, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(fast.cache_len, slow.cache_len)


@pytest.mark.parametrize("ratio", RATIOS)
def test_streaming_keeps_sinks_and_recent_window(lm, ids, ratio):
    policy = StreamingLLM(ratio)
    r = policy_nll(lm, ids, policy, step_by_step=True)
    n_keep = int(r.cache_len[-1])
    expected = list(range(4)) + list(range(L - 1 - (n_keep - 4), L - 1))
    for pos in r.kept_positions.values():
        assert (pos == torch.tensor(expected)).all()
    vis, _ = visible_mask(policy, L)
    for t in range(20, L - 1):  # query t sees the sinks, the newest entries and itself, nothing else
        w = policy.budget(t) - 4  # the cache after step t - 1, then t itself
        assert vis[t].nonzero()[:, 0].tolist() == list(range(4)) + list(range(t - w, t + 1))


# -- H2O ------------------------------------------------------------------------------------------------
def test_h2o_keeps_heaviest_hitters_on_handmade_attention():
    T, n_keep = 10, 4  # budget 4: recent window of 2, heavy hitters 2
    pos = torch.arange(T).expand(1, 2, T)  # 2 KV heads, 4 query heads (GQA groups {0, 1}, {2, 3})
    attn = torch.zeros(1, 4, 1, T)
    attn[0, 0, 0, [2, 5, 7]] = torch.tensor([0.5, 0.3, 0.2])
    attn[0, 1, 0, [2, 3]] = 0.5  # group 0 totals: 2 -> 1.0, 5 -> 0.3, 3 -> 0.5, 7 -> 0.2
    attn[0, 2, 0, [1, 9]] = 0.5
    attn[0, 3, 0, [6, 8]] = 0.5  # group 1 totals: 1 and 6 -> 0.5 (8, 9 are recent anyway)
    policy = H2O(ratio=0.6)
    policy.observe(0, attn[..., : T - 1], pos[..., : T - 1])  # a first step, one slot fewer
    policy.observe(0, attn, pos)
    # accumulated over both steps: group 0 = 2 -> 2.0, 3 -> 1.0, 5 -> 0.6, 7 -> 0.4
    keep = policy.keep(0, pos, n_keep)
    assert keep[0, 0].tolist() == [2, 3, 8, 9] and keep[0, 1].tolist() == [1, 6, 8, 9]
    # the kept slots' scores travel with them (slot 9 was new in the second step)
    torch.testing.assert_close(policy.scores[0][0], torch.tensor([[2.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.5]]))
    # brute force on random scores: recent window + top scores among the rest, per head
    g = torch.Generator().manual_seed(0)
    policy = H2O(ratio=0.5)
    policy.scores[1] = scores = torch.rand(3, 2, 20, generator=g)
    keep = policy.keep(1, torch.arange(20).expand(3, 2, 20), 9)  # 5 recent (4.5 rounded up), 4 heavy
    for b in range(3):
        for h in range(2):
            heavy = scores[b, h, :15].argsort(descending=True)[:4].tolist()
            assert keep[b, h].tolist() == sorted(heavy + list(range(15, 20)))


def test_h2o_on_a_real_model_keeps_recent_window(lm, ids):
    policy = H2O(ratio=0.5)
    r = policy_nll(lm, ids, policy)
    n_keep = int(r.cache_len[-1])
    recent = torch.arange(L - 1 - int(n_keep / 2 + 0.5), L - 1)
    for layer, pos in r.kept_positions.items():
        assert torch.isin(recent, pos).all()
        assert policy.scores[layer].shape == pos.shape  # scores follow the evictions
    assert not torch.equal(r.token_nll, policy_nll(lm, ids, StreamingLLM(0.5)).token_nll)


def test_h2o_refuses_fused_attention(tok, ids):
    lm = _model("llama", len(tok))
    lm.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="eager"):
        policy_nll(lm, ids[:, :8], H2O(0.3))


# -- Select Context -------------------------------------------------------------------------------------
@torch.no_grad()
def test_select_context_drops_lowest_self_information(lm, tok, prompts):
    p = prompts[0]
    # brute force: one forward per prefix
    brute = [float("nan")] + [
        -torch.log_softmax(lm(input_ids=torch.tensor([p[:t]])).logits[0, -1].float(), -1)[p[t]].item()
        for t in range(1, len(p))
    ]
    info = self_information(lm, p)
    torch.testing.assert_close(info, torch.tensor(brute, dtype=torch.float64), atol=1e-4, rtol=1e-4, equal_nan=True)
    for ratio in RATIOS:
        c = SelectContext(ratio).compress(lm, tok, p)
        dropped = sorted(set(range(len(p))) - set(c.kept))
        k = n_removed(ratio, len(p))
        assert len(dropped) == k and 0 not in dropped
        assert dropped == sorted(sorted(range(1, len(p)), key=lambda t: brute[t])[:k])
        # and the compressed prompt is what the LM conditions on
        nll = continuation_nll(lm, c.ids, p[-3:])
        assert nll.shape == (3,) and torch.isfinite(nll).all()


def test_match_tr_drives_a_threshold_knob(lm, prompts):
    """Li et al.'s native knob is a self-information threshold, not a token count: bisect it."""
    infos = [self_information(lm, p)[1:] for p in prompts]

    def measure(threshold: float) -> float:  # TR over all prompts when tokens below threshold go
        return sum(int((i < threshold).sum()) for i in infos) / sum(len(p) for p in prompts)

    hi = max(float(i.max()) for i in infos) + 1
    for target in RATIOS:
        knob, method, tr = match_tr(lambda x: x, target, measure, lo=0.0, hi=hi)
        assert abs(tr - target) <= 0.02 and method == knob and measure(knob) == tr
    with pytest.raises(ValueError, match="outside"):
        match_tr(lambda x: x, 0.5, measure, lo=0.0, hi=1e-9)


def test_custom_policy_plugs_in(lm, ids):
    """The interface is enough for a new policy: keep the oldest entries (a content-free toy)."""

    class KeepOldest(KVPolicy):
        name = "keep_oldest"
        content_free = True

        def __init__(self, ratio):
            self.ratio = ratio

        def priority(self, layer, pos, n_keep):
            return -pos  # the oldest first

    a = policy_nll(lm, ids, KeepOldest(0.3))
    b = policy_nll(lm, ids, KeepOldest(0.3), step_by_step=True)
    torch.testing.assert_close(a.token_nll, b.token_nll, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert abs(a.tr_mean - 0.3) <= 0.02
