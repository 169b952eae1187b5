"""Batched decoding under KV policies (StreamingLLM, H2O) on real tiny models (Llama with GQA and
GPT-2, built from configs): a batch of left-padded prompts of different lengths decodes, per row,
exactly what the row-by-row decoder (the batch of one) does — tokens, cache size, stop reason, TR —
for every schedule, prefill and several ratios; at ratio 0 each row equals Hugging Face ``generate``
on its prompt alone; a row does not depend on the other rows (H2O's scores included); the method
contract's ``generate`` batches with a ``batch_size`` knob."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_lm

from umim.errors import UserError
from umim.inference.generation import SamplingConfig
from umim_eval.methods import H2O, StreamingLLM
from umim_eval.methods.base import keep_top
from umim_eval.scoring.policy_generate import policy_generate, policy_generate_batch

pytestmark = pytest.mark.usefixtures("one_thread")

V = 120
CONTEXT = 128
LENGTHS = (30, 120, 9, 44)  # 120 + the new tokens runs into the 128-position context
POLICIES = [StreamingLLM, H2O]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return make_tiny_lm(request.param, V, context=CONTEXT, eager=True)  # H2O reads attention weights


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(2, V, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def eos(lm, prompts):
    """A token the model emits early for the first prompt, so some rows stop at EOS."""
    return policy_generate(lm, prompts[0], StreamingLLM(0.0), SamplingConfig(max_new_tokens=8)).generated_ids[4]


def _row(r) -> tuple:
    return r.generated_ids, r.cache_len, r.n_seen, r.stop_reason, r.tr


@pytest.mark.parametrize("cls", POLICIES)
@pytest.mark.parametrize("prefill", ["full", "step"])
def test_batch_equals_row_by_row(lm, prompts, eos, cls, prefill):
    cfg = SamplingConfig(max_new_tokens=14, eos_token_id=eos)
    reasons = set()
    for schedule in ("fixed", "proportional", "prompt"):
        for ratio in (0.0, 0.3, 0.6):
            batch = policy_generate_batch(lm, prompts, cls(ratio), cfg, schedule=schedule, prefill=prefill)
            alone = [policy_generate(lm, p, cls(ratio), cfg, schedule=schedule, prefill=prefill) for p in prompts]
            assert [_row(r) for r in batch] == [_row(r) for r in alone], (schedule, ratio)
            reasons |= {r.stop_reason for r in batch}
            if ratio:
                assert any(r.cache_len < r.n_seen for r in batch)  # something was evicted
    assert reasons == {"eos", "max_new_tokens", "context"}  # rows finished independently, for every reason


@pytest.mark.parametrize("cls", POLICIES)
def test_rows_at_their_own_ratios(lm, prompts, cls):
    """``ratios``: each row evicts to its own target, as when decoded alone at that ratio."""
    cfg, ratios = SamplingConfig(max_new_tokens=10), [0.5, 0.0, 0.2, 0.35]
    batch = policy_generate_batch(lm, prompts, cls(0.9), cfg, schedule="prompt", ratios=ratios)
    alone = [policy_generate(lm, p, cls(r), cfg, schedule="prompt") for p, r in zip(prompts, ratios)]
    assert [_row(r) for r in batch] == [_row(r) for r in alone]
    with pytest.raises(ValueError, match="ratio"):
        policy_generate_batch(lm, prompts, cls(0.2), cfg, ratios=[0.1, 1.0, 0.1, 0.1])


def _hf(lm, ids, sampling: SamplingConfig) -> list[int]:
    torch.manual_seed(sampling.seed or 0)
    out = lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample, pad_token_id=0,
                      eos_token_id=None)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("cls", POLICIES)
@pytest.mark.parametrize("prefill", ["full", "step"])
def test_ratio_zero_batch_equals_hf_generate(lm, prompts, cls, prefill):
    cfg = SamplingConfig(max_new_tokens=12)
    short = [p for p in prompts if len(p) + cfg.max_new_tokens <= CONTEXT]
    batch = policy_generate_batch(lm, short, cls(0.0), cfg, prefill=prefill)
    for p, r in zip(short, batch):
        assert r.generated_ids == _hf(lm, p, cfg)
        assert r.cache_len == r.n_seen == len(p) + cfg.max_new_tokens and r.tr == 0.0


@pytest.mark.parametrize("prefill", ["full", "step"])
def test_a_row_does_not_depend_on_the_others(lm, prompts, prefill):
    """Padding gets zero attention: a row decodes the same text, and H2O gives its kept slots the same
    accumulated scores, alone or in batches: row c (30 tokens) is left-padded next to longer rows, row
    d (120 tokens) stops at the context while the others go on (its later slots are padding)."""
    cfg = SamplingConfig(max_new_tokens=10)
    c, d = prompts[0], prompts[1]

    def decode(batch: list[list[int]]) -> dict[int, tuple]:
        policy = H2O(0.4)
        rows = policy_generate_batch(lm, batch, policy, cfg, schedule="prompt", prefill=prefill)
        out = {}
        for b, p in enumerate(batch):
            n = rows[b].cache_len
            out[id(p)] = (_row(rows[b]), [s[b, :, -n:] for _, s in sorted(policy.scores.items())])
        return out

    alone = {**decode([c]), **decode([d])}
    assert alone[id(d)][0][3] == "context" and alone[id(c)][0][3] == "max_new_tokens"
    for batch in ([prompts[3], prompts[2], c, d], [d, c]):
        got = decode(batch)
        for p in (c, d):
            assert got[id(p)][0] == alone[id(p)][0]
            for a, o in zip(alone[id(p)][1], got[id(p)][1]):
                torch.testing.assert_close(o, a, atol=1e-5, rtol=1e-5)


def test_keep_top_pads_rows_with_smaller_budgets():
    """Each row keeps its own top n_keep[b] real slots, after K - n_keep[b] padding entries; padding
    slots (position -1) are never kept."""
    g = torch.Generator().manual_seed(0)
    pos = torch.arange(12).repeat(3, 2, 1)
    pos[1, :, :5] = -1  # row 1 holds 7 real slots
    priority = torch.rand(3, 2, 12, generator=g)
    priority[1, :, :5] = 10.0  # high priority on padding must not matter
    n_keep = torch.tensor([6, 7, 2])
    index = keep_top(priority, pos, n_keep)
    assert index.shape == (3, 2, 7)
    for b in range(3):
        for h in range(2):
            k = int(n_keep[b])
            real = (pos[b, h] >= 0).nonzero()[:, 0]
            best = real[priority[b, h, real].argsort(descending=True)[:k]]
            assert index[b, h, 7 - k :].tolist() == sorted(best.tolist())


def test_method_generate_batches(lm, prompts):
    """``KVPolicy.generate``: ``batch_size`` texts per batched decode, each prompt at its own target;
    greedy texts do not depend on the batch size; sampled ones are reseeded per batch."""
    run = SimpleNamespace(lm=lm, tokenizer=None)
    ps = [p for p in prompts if len(p) + 10 <= CONTEXT]
    targets = [0.3, 0.1, 0.5]
    greedy = SamplingConfig(max_new_tokens=10)
    for cls in POLICIES:
        method = cls(0.0)
        one = method.generate(run, ps, targets, greedy, n_samples=2, batch_size=1)
        four = method.generate(run, ps, targets, greedy, n_samples=2, batch_size=4)
        assert [[(g.ids, g.tr) for g in gs] for gs in one] == [[(g.ids, g.tr) for g in gs] for gs in four]
        for gs, t, p in zip(four, targets, ps):
            assert len(gs) == 2 and abs(gs[0].tr - t) <= 0.5 / len(p) + 1e-9
    sampled = SamplingConfig(max_new_tokens=10, do_sample=True, temperature=0.9, seed=4)
    method = StreamingLLM(0.0)
    one = method.generate(run, ps, targets, sampled, n_samples=2, batch_size=1)
    # batch size 1: text k (prompt-major) is drawn from seed + k, as when decoded alone
    for k, (i, s) in enumerate((i, s) for i in range(len(ps)) for s in range(2)):
        cfg = SamplingConfig(max_new_tokens=10, do_sample=True, temperature=0.9, seed=4 + k)
        alone = policy_generate(lm, ps[i], StreamingLLM(targets[i]), cfg, schedule="prompt")
        assert one[i][s].ids == alone.generated_ids
    three = [method.generate(run, ps, targets, sampled, n_samples=2, batch_size=3) for _ in range(2)]
    assert [[g.ids for g in gs] for gs in three[0]] == [[g.ids for g in gs] for gs in three[1]]
    assert [g.ids for gs in three[0] for g in gs] != [g.ids for gs in one for g in gs]  # another stream
    with pytest.raises(UserError, match="batch_size"):
        method.generate(run, ps, targets, greedy, batch_size=0)
    with pytest.raises(UserError, match="context"):
        method.generate(run, [list(range(2, 2 + CONTEXT))], [0.2], greedy)


def test_batch_errors_name_the_input(lm, prompts):
    cfg = SamplingConfig(max_new_tokens=4)
    for kw, match in (({"schedule": "linear"}, "schedule"), ({"ratios": [0.1]}, "one target TR per prompt"),
                      ({"prefill": "chunked"}, "prefill")):
        with pytest.raises(UserError, match=match):
            policy_generate_batch(lm, prompts, StreamingLLM(0.2), cfg, **kw)
    with pytest.raises(UserError, match="at least one prompt"):
        policy_generate_batch(lm, [], StreamingLLM(0.2), cfg)
    with pytest.raises(UserError, match="prompt 1: .*non-empty"):
        policy_generate_batch(lm, [prompts[0], []], StreamingLLM(0.2), cfg)
    with pytest.raises(UserError, match="prompt 1 has 130 tokens"):
        policy_generate_batch(lm, [prompts[0], list(range(2, 132))], StreamingLLM(0.2), cfg)
