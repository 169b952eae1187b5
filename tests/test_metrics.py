"""Alignment metrics (paper App. C, Alg. 2-5), token reduction and the chunked distillation loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from umim.training.alignment_metrics import (
    MeanReciprocalRank,
    TokenReduction,
    Top1Agreement,
    TopKOverlap,
    TopPOverlap,
    alignment_metrics,
    nucleus_mask,
)
from umim.training.distill_loss import distillation_loss


def logits_from_probs(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).log()


def value(metric, t, s) -> float:
    metric.update(t, s)
    return float(metric.compute())


# -- hand-computed values ----------------------------------------------------------------------------

# distinct logits so every top-k set is unambiguous
T_RANK = torch.tensor(
    [
        [6.0, 5, 4, 3, 2, 1],  # top3 {0,1,2}, argmax 0
        [1.0, 2, 6, 5, 4, 3],  # top3 {2,3,4}, argmax 2
        [1.0, 2, 3, 4, 5, 6],  # top3 {3,4,5}, argmax 5
    ]
)
S_RANK = torch.tensor(
    [
        [6.0, 5, 1, 4, 2, 3],  # top3 {0,1,3}: overlap 2; argmax 0; teacher's 0 has rank 0
        [6.0, 5, 4, 1, 2, 3],  # top3 {0,1,2}: overlap 1; argmax 0; teacher's 2 has rank 2
        [3.0, 2, 1, 6, 5, 4],  # top3 {3,4,5}: overlap 3; argmax 3; teacher's 5 has rank 2
    ]
)


def test_top1_agreement_hand_computed():
    assert value(Top1Agreement(), T_RANK, S_RANK) == pytest.approx(1 / 3)
    t = torch.tensor([[0.0, 1, 0], [3.0, 0, 0], [0.0, 0, 2], [1.0, 2, 3]])
    s = torch.tensor([[0.0, 5, 0], [0.0, 1, 0], [0.0, 0, 9], [3.0, 2, 1]])
    assert value(Top1Agreement(), t, s) == pytest.approx(2 / 4)


def test_topk_overlap_hand_computed():
    assert value(TopKOverlap(3), T_RANK, S_RANK) == pytest.approx((2 / 3 + 1 / 3 + 3 / 3) / 3)
    # ties entirely inside the top-3 do not make the set ambiguous
    t = torch.tensor([[5.0, 5, 5, 0, 0, 0]])
    s = torch.tensor([[5.0, 5, 5, 1, 0, 0]])
    assert value(TopKOverlap(3), t, s) == pytest.approx(1.0)
    s2 = torch.tensor([[0.0, 0, 5, 5, 5, 1]])
    assert value(TopKOverlap(3), t, s2) == pytest.approx(1 / 3)
    # k = 1 is top-1 agreement
    assert value(TopKOverlap(1), T_RANK, S_RANK) == pytest.approx(1 / 3)


def test_mrr_hand_computed():
    assert value(MeanReciprocalRank(), T_RANK, S_RANK) == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    # teacher argmax ranked last of 6 by the student
    t = torch.tensor([[0.0, 0, 0, 0, 0, 9]])
    s = torch.tensor([[6.0, 5, 4, 3, 2, 1]])
    assert value(MeanReciprocalRank(), t, s) == pytest.approx(1 / 6)


T_P = [
    [0.5, 0.3, 0.1, 0.05, 0.03, 0.02],  # nucleus {0, 1}
    [0.0, 1 / 3, 0.0, 1 / 3, 0.0, 1 / 3],  # flat over 3 tokens: nucleus {1, 3, 5} (0.667 < 0.7)
    [0.4, 0.4, 0.1, 0.05, 0.03, 0.02],  # tie at the top, both in: {0, 1}
]
S_P = [
    [0.75, 0.1, 0.05, 0.05, 0.03, 0.02],  # {0}: |∩| = 1, min size 1 -> 1
    [0.05, 0.4, 0.35, 0.05, 0.1, 0.05],  # {1, 2}: |∩| = 1, min size 2 -> 1/2
    [0.1, 0.2, 0.2, 0.2, 0.2, 0.1],  # four-way tie, all in: {1,2,3,4}: |∩| = 1, min 2 -> 1/2
]


def test_nucleus_sets_hand_computed():
    mt = nucleus_mask(logits_from_probs(T_P), 0.7)
    ms = nucleus_mask(logits_from_probs(S_P), 0.7)
    as_sets = lambda m: [set(r.nonzero().flatten().tolist()) for r in m]  # noqa: E731
    assert as_sets(mt) == [{0, 1}, {1, 3, 5}, {0, 1}]
    assert as_sets(ms) == [{0}, {1, 2}, {1, 2, 3, 4}]
    # fully flat over 6: the first 5 reach 5/6 >= 0.7 but 4/6 < 0.7 -> exactly 5 tokens
    assert int(nucleus_mask(torch.zeros(1, 6), 0.7).sum()) == 5
    # a single dominant token
    assert nucleus_mask(torch.tensor([[0.0, 10, 0, 0]]), 0.7).tolist() == [[False, True, False, False]]


def test_top_p_overlap_hand_computed():
    assert value(TopPOverlap(0.7), logits_from_probs(T_P), logits_from_probs(S_P)) == pytest.approx(
        (1 + 1 / 2 + 1 / 2) / 3
    )
    # disjoint nuclei
    t = logits_from_probs([[0.9, 0.02, 0.02, 0.02, 0.02, 0.02]])
    s = logits_from_probs([[0.02, 0.02, 0.02, 0.02, 0.02, 0.9]])
    assert value(TopPOverlap(0.7), t, s) == 0.0


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metrics_average_over_positions_across_updates():
    m = Top1Agreement()
    m.update(T_RANK[:1], S_RANK[:1])  # 1 of 1 agrees
    m.update(T_RANK[1:], S_RANK[1:])  # 0 of 2 agree
    assert float(m.compute()) == pytest.approx(1 / 3)  # per position, not mean of update means
    m.reset()
    assert float(m.compute()) == 0.0  # nothing seen


def test_token_reduction():
    tr = TokenReduction()
    tr.update(10, 7)
    tr.update(6, 5)
    assert float(tr.compute()) == pytest.approx(100 * (1 - 12 / 16))
    tr2 = TokenReduction()
    tr2.update(5, 5)
    assert float(tr2.compute()) == 0.0


def test_identical_logits_give_one_everywhere():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 50, generator=g) * 3
    logits[5] = 0.0  # flat row
    logits[6] = torch.randn(50, generator=g) * 1e-4  # nearly flat row
    coll = alignment_metrics(top_p=0.7)
    coll.update(logits, logits.clone())
    res = coll.compute()
    assert set(res) == {"top1", "top3", "top10", "top_p", "mrr"}
    for k, v in res.items():
        assert float(v) == pytest.approx(1.0), k


def test_metrics_are_below_one_for_different_logits():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(64, 30, generator=g), torch.randn(64, 30, generator=g)
    coll = alignment_metrics()
    coll.update(t, s)
    for k, v in coll.compute().items():
        assert 0.0 <= float(v) < 1.0, k


# -- nucleus mask against a brute-force reference ----------------------------------------------------


def reference_nucleus(logits: torch.Tensor, p: float):
    probs = logits.float().softmax(-1)
    out = torch.zeros_like(probs, dtype=torch.bool)
    for i in range(len(probs)):
        sp, order = probs[i].sort(descending=True)
        before = 0.0
        cum = sp.cumsum(0)
        for j in range(len(sp)):
            before = float(cum[j] - sp[j])
            if before >= p:
                break
            out[i, order[j]] = True
    return out, probs


def assert_same_nucleus(mask, ref, probs):
    for i in range(len(mask)):
        if torch.equal(mask[i], ref[i]):
            continue
        # only tokens tied (exactly) with the boundary probability may be swapped
        assert int(mask[i].sum()) == int(ref[i].sum()), i
        boundary = probs[i][ref[i]].min()
        assert (probs[i][mask[i] ^ ref[i]] == boundary).all(), i


@pytest.mark.parametrize("p", [0.1, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("k0", [256, 8])
def test_nucleus_mask_equals_brute_force(p, k0):
    g = torch.Generator().manual_seed(int(p * 100) + k0)
    V = 1000
    rows = [
        torch.randn(6, V, generator=g) * 4,  # peaked
        torch.randn(3, V, generator=g),  # moderate
        torch.randn(3, V, generator=g) * 1e-3,  # very flat: top-k0 mass < p, full sort needed
        torch.zeros(1, V),  # exactly flat: all ties
    ]
    logits = torch.cat(rows)
    mask = nucleus_mask(logits, p, k0=k0)
    ref, probs = reference_nucleus(logits, p)
    assert mask.shape == logits.shape and mask.dtype == torch.bool
    assert_same_nucleus(mask, ref, probs)
    # flat rows really do need more than k0 tokens when p is large
    if p >= 0.7:
        assert int(mask[-1].sum()) > 256
    # minimality: the kept mass reaches p, and removing the least probable kept token falls below p
    kept = (probs * mask).sum(-1)
    assert (kept >= p - 1e-5).all()
    least = torch.where(mask, probs, torch.full_like(probs, 2.0)).min(-1).values
    assert (kept - least < p + 1e-5).all()


# -- distillation loss ------------------------------------------------------------------------------


def reference_loss(teacher_h, student_h, head):
    with torch.no_grad():
        t_logp = F.log_softmax(head(teacher_h).float(), -1)
    s_logp = F.log_softmax(head(student_h).float(), -1)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / teacher_h.shape[0]


def make_case(N=10, d=12, V=37, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(d, V, bias=False)
    teacher_h = torch.randn(N, d)
    student_h = teacher_h + 0.5 * torch.randn(N, d)
    return head, teacher_h, student_h


@pytest.mark.parametrize("chunk", [1, 3, 10, 64])
def test_distillation_loss_no_grad_equals_full_kl(chunk):
    head, t, s = make_case()
    with torch.no_grad():
        ref = reference_loss(t, s, head)
        got = distillation_loss(t, s, head, chunk_size=chunk)
    assert float(ref) > 0
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_distillation_loss_grad_equals_unchunked(chunk):
    head, t, s = make_case(seed=1)
    s_ref = s.clone().requires_grad_(True)
    ref = reference_loss(t, s_ref, head)
    ref.backward()
    ref_head_grad = head.weight.grad.clone()
    head.weight.grad = None

    s_got = s.clone().requires_grad_(True)
    got = distillation_loss(t, s_got, head, chunk_size=chunk)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), ref.detach(), atol=1e-6, rtol=1e-5)
    got.backward()
    torch.testing.assert_close(s_got.grad, s_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad, ref_head_grad, atol=1e-6, rtol=1e-5)
    assert s_got.grad.abs().sum() > 0


def test_distillation_loss_zero_when_identical_and_with_no_positions():
    head, t, _ = make_case()
    with torch.no_grad():
        assert float(distillation_loss(t, t.clone(), head, chunk_size=4)) == pytest.approx(0.0, abs=1e-6)
    empty = torch.zeros(0, 12, requires_grad=True)
    loss = distillation_loss(torch.zeros(0, 12), empty, head)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()  # graph kept even with nothing to align
    assert empty.grad is not None


def test_distillation_loss_feeds_metrics_chunk_by_chunk():
    head, t, s = make_case(N=23, V=40, seed=3)
    chunked = alignment_metrics()
    with torch.no_grad():
        distillation_loss(t, s, head, chunk_size=5, metrics=chunked)
        full = alignment_metrics()
        full.update(head(t), head(s))
    a, b = chunked.compute(), full.compute()
    for k in a:
        assert float(a[k]) == pytest.approx(float(b[k])), k
    assert not math.isclose(float(a["top1"]), 1.0)
