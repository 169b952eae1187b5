"""Merged batch construction (paper App. C): masks, index mapping, teacher/student alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from umim.merging.batch import (
    AlignmentError,
    add_segments,
    aligned_hidden,
    build_merged_batch,
    check_segments,
)
from umim.merging.matcher import SpanMatcher
from umim.merging.merger import MergeModule, MergerConfig
from umim.merging.span_encoder import RuleSegmenter
from umim.rules.store import MergeRules

D, VOCAB = 8, 20


def setup_modules(seed: int = 0):
    torch.manual_seed(seed)
    emb = nn.Embedding(VOCAB, D)
    merger = MergeModule(MergerConfig(hidden_size=D, num_heads=2))
    return emb, merger


def segs_tensor(rows: list[list[tuple[int, int]]]):
    S = max(len(r) for r in rows)
    start = torch.zeros(len(rows), S, dtype=torch.long)
    length = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        for s, (st, ln) in enumerate(r):
            start[b, s], length[b, s] = st, ln
    return start, length


def app_c_example():
    """Row 0: x1 (x2,x3) x4 (x5,x6) pad pad; row 1 is longer (8 tokens) so row 0 is padded."""
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12, 13, 14]])
    lengths = torch.tensor([6, 8])
    seg_start, seg_len = segs_tensor(
        [[(0, 1), (1, 2), (3, 1), (4, 2)], [(0, 2), (2, 1), (3, 3), (6, 1), (7, 1)]]
    )
    return input_ids, lengths, seg_start, seg_len


def test_app_c_worked_example():
    emb, merger = setup_modules()
    input_ids, lengths, seg_start, seg_len = app_c_example()
    with torch.no_grad():
        batch = build_merged_batch(input_ids, seg_start, seg_len, emb, merger, lengths)
    # row 0: exactly the table of App. C
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 0]
    assert batch.loss_mask[0].tolist() == [False, True, True, True, False]
    assert batch.teacher_pos[0][batch.loss_mask[0]].tolist() == [2, 3, 5]
    assert batch.orig_to_comp[0].tolist() == [0, 1, 1, 2, 3, 3, -1, -1]
    # row 1: first segment is a merge, so every real position enters the loss
    assert batch.attention_mask[1].tolist() == [1, 1, 1, 1, 1]
    assert batch.loss_mask[1].tolist() == [True] * 5
    assert batch.teacher_pos[1].tolist() == [1, 2, 5, 6, 7]
    assert batch.orig_to_comp[1].tolist() == [0, 0, 1, 2, 2, 2, 3, 4]
    assert batch.attention_mask.dtype == torch.long and batch.loss_mask.dtype == torch.bool
    assert batch.num_original == 14 and batch.num_compressed == 9
    assert batch.inputs_embeds.shape == (2, 5, D)

    # embeddings: single tokens are the LM's embeddings, merged spans the (untrained) mean, padding 0
    E = emb.weight.detach()
    expected0 = torch.stack([E[1], (E[2] + E[3]) / 2, E[4], (E[5] + E[6]) / 2, torch.zeros(D)])
    expected1 = torch.stack([(E[7] + E[8]) / 2, E[9], (E[10] + E[11] + E[12]) / 3, E[13], E[14]])
    torch.testing.assert_close(batch.inputs_embeds[0], expected0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.inputs_embeds[1], expected1, atol=1e-5, rtol=1e-5)
    assert torch.equal(batch.inputs_embeds[0, 0], E[1]) and torch.equal(batch.inputs_embeds[0, 4], torch.zeros(D))


def test_merger_called_once_per_batch_with_all_spans():
    emb, merger = setup_modules()
    calls = []
    merger.register_forward_hook(lambda mod, args, out: calls.append((args[0].shape, args[1].clone())))
    input_ids, lengths, seg_start, seg_len = app_c_example()
    build_merged_batch(input_ids, seg_start, seg_len, emb, merger, lengths)
    assert len(calls) == 1
    shape, mask = calls[0]
    assert shape == (4, 4, D)  # 4 merged spans in the batch, padded to the merger's max_span
    assert mask.sum(1).tolist() == [2, 2, 2, 3]


def test_gradient_reaches_the_merger_only_through_merged_positions():
    emb, merger = setup_modules()
    emb.requires_grad_(False)
    input_ids, lengths, seg_start, seg_len = app_c_example()
    batch = build_merged_batch(input_ids, seg_start, seg_len, emb, merger, lengths)
    batch.inputs_embeds[batch.loss_mask].pow(2).sum().backward()
    assert merger.v_proj.weight.grad is not None and merger.v_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "rows,lengths",
    [
        ([[(0, 1), (2, 1)]], [3]),  # gap
        ([[(0, 2), (1, 2)]], [3]),  # overlap
        ([[(0, 2), (2, 2)]], [3]),  # runs past the length
        ([[(0, 1), (1, 1)]], [3]),  # stops short
        ([[(1, 2), (3, 1)]], [3]),  # does not start at 0
        ([[(0, 1), (0, 0), (1, 2)]], [3]),  # padding between real segments
        ([[(0, 5), (5, 1)]], [6]),  # longer than the longest rule
        ([[(0, 2), (2, 2), (0, -1)]], [3]),  # a negative length hiding an overrun
        ([[(0, 1), (1, 2)], [(0, 2), (2, 1)]], [3, 4]),  # second row wrong only
    ],
)
def test_non_tiling_segments_raise(rows, lengths):
    emb, merger = setup_modules()
    seg_start, seg_len = segs_tensor(rows)
    L = max(lengths)
    input_ids = torch.randint(0, VOCAB, (len(rows), L))
    with pytest.raises(AlignmentError):
        build_merged_batch(input_ids, seg_start, seg_len, emb, merger, torch.tensor(lengths))
    with pytest.raises(AlignmentError):
        check_segments(seg_start.numpy(), seg_len.numpy(), np.array(lengths))


def test_valid_segments_pass_check():
    input_ids, lengths, seg_start, seg_len = app_c_example()
    check_segments(seg_start.numpy(), seg_len.numpy(), lengths.numpy())


def test_identity_without_merges():
    emb, merger = setup_modules()
    input_ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    lengths = torch.tensor([5, 3])
    seg_start, seg_len = segs_tensor([[(i, 1) for i in range(5)], [(i, 1) for i in range(3)]])
    batch = build_merged_batch(input_ids, seg_start, seg_len, emb, merger, lengths)
    expected = emb(input_ids).detach() * (torch.arange(5)[None, :] < lengths[:, None])[..., None]
    assert torch.equal(batch.inputs_embeds.detach(), expected)
    assert torch.equal(batch.inputs_embeds[0].detach(), emb(input_ids[0]).detach())
    assert not batch.loss_mask.any()
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch.orig_to_comp.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, -1, -1]]
    assert batch.num_original == batch.num_compressed == 8
    t, s = aligned_hidden(torch.randn(2, 5, D), torch.randn(2, 5, D), batch)
    assert t.shape == s.shape == (0, D)


def test_aligned_hidden_pairs_rows():
    emb, merger = setup_modules()
    input_ids, lengths, seg_start, seg_len = app_c_example()
    batch = build_merged_batch(input_ids, seg_start, seg_len, emb, merger, lengths)
    teacher = torch.randn(2, 8, D)
    student = torch.randn(2, 5, D)
    t, s = aligned_hidden(teacher, student, batch)
    exp_t = torch.stack([teacher[0, 2], teacher[0, 3], teacher[0, 5]] + [teacher[1, p] for p in (1, 2, 5, 6, 7)])
    exp_s = torch.stack([student[0, 1], student[0, 2], student[0, 3]] + [student[1, p] for p in range(5)])
    assert torch.equal(t, exp_t) and torch.equal(s, exp_s)
    # a corrupted alignment is detected
    batch.teacher_pos[0, 2] = 4  # x5 instead of x4: belongs to another segment
    with pytest.raises(AlignmentError):
        aligned_hidden(teacher, student, batch)


def test_with_matcher_segments_random_batch():
    """End to end with the real matcher: invariants of the batch on random padded rows."""
    rng = np.random.default_rng(0)
    emb, merger = setup_modules(1)
    rules = {2: np.array([[1, 2], [3, 3], [4, 5]]), 3: np.array([[1, 2, 3]]), 4: np.array([[5, 6, 7, 8]])}
    matcher = SpanMatcher(rules, VOCAB)
    B, L = 6, 30
    lengths = np.array([30, 0, 1, 17, 25, 9])
    ids = rng.integers(0, 9, size=(B, L))
    starts, lens = matcher.segment_batch(ids, lengths)
    batch = build_merged_batch(
        torch.from_numpy(ids), torch.from_numpy(starts), torch.from_numpy(lens), emb, merger, torch.from_numpy(lengths)
    )
    assert batch.num_original == lengths.sum()
    assert batch.num_compressed == int((lens > 0).sum()) < batch.num_original
    assert batch.attention_mask.sum(1).tolist() == [int((lens[b] > 0).sum()) for b in range(B)]
    for b in range(B):
        n = lengths[b]
        o2c = batch.orig_to_comp[b].tolist()
        assert o2c[n:] == [-1] * (L - n)
        assert o2c[:n] == sorted(o2c[:n])
        merged = (lens[b] > 1).nonzero()[0]
        for s in range(batch.loss_mask.shape[1]):
            real = lens[b, s] > 0 if s < lens.shape[1] else False
            expected = bool(real and len(merged) and s >= merged[0])
            assert bool(batch.loss_mask[b, s]) == expected
            if expected:
                tp = int(batch.teacher_pos[b, s])
                assert tp == starts[b, s] + lens[b, s] - 1 and o2c[tp] == s
    t, s = aligned_hidden(torch.randn(B, L, D), torch.randn(B, batch.inputs_embeds.shape[1], D), batch)
    assert len(t) == len(s) == int(batch.loss_mask.sum()) > 0


@pytest.mark.parametrize("longest", [2, 3, 5])
def test_span_width_comes_from_the_rules(longest):
    """The rules' longest n-gram sets the longest segment and the width the merger sees (no fixed
    longest n: a 5-gram rule is merged whole), and a segment longer than it is refused."""
    emb, merger = setup_modules()
    gram = list(range(1, longest + 1))
    rules = MergeRules(ngrams={longest: np.array([gram])}, counts={longest: np.array([7])},
                       tokenizer={"vocab_size": VOCAB})
    ids = torch.tensor([gram + [9, 9] + gram, [9] + gram + [9] * (longest + 1)])
    batch = add_segments({"input_ids": ids, "lengths": torch.tensor([2 * longest + 2, 2 * longest + 2])},
                         RuleSegmenter(rules))
    seen = []
    merger.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    merged = build_merged_batch(ids, batch["seg_start"], batch["seg_len"], emb, merger, batch["lengths"],
                                batch["max_span"])
    assert batch["max_span"] == longest and int(batch["seg_len"].max()) == longest
    assert seen == [(3, longest, D)]  # three occurrences, each one span of the rule's length
    assert merged.num_compressed == merged.num_original - 3 * (longest - 1)
    with pytest.raises(AlignmentError):  # a longer segment than the segmenter's longest span
        too_long = [(0, longest + 1)] + [(i, 1) for i in range(longest + 1, 2 * longest + 2)]
        build_merged_batch(ids, *segs_tensor([too_long] * 2), emb, merger, batch["lengths"], longest)
