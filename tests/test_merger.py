"""Merge module (paper Sec. 3.2, App. B): size, initial behaviour, masking, batching, persistence."""

from __future__ import annotations

import json

import pytest
import torch

from umim.fingerprint import TokenizerMismatchError, tokenizer_fingerprint
from umim.merging.merger import CONFIG_NAME, WEIGHTS_NAME, MergeModule, MergerConfig

D, H = 16, 4


def randomize(module: MergeModule, seed: int = 0) -> MergeModule:
    """Give every parameter random values (a 'trained' merger: not the mean-pooling init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def spans(K: int = 7, n_max: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, n_max, D, generator=g)
    lens = torch.tensor([2, 3, 4, 2, 4, 3, 2][:K])
    mask = torch.arange(n_max)[None, :] < lens[:, None]
    return x, mask, lens


def test_parameter_count_is_d_plus_3d2():
    m = MergeModule(MergerConfig(hidden_size=D, num_heads=H))
    assert sum(p.numel() for p in m.parameters()) == D + 3 * D * D == 784
    for d, h in [(8, 1), (12, 3), (32, 8)]:
        mm = MergeModule(MergerConfig(hidden_size=d, num_heads=h))
        assert sum(p.numel() for p in mm.parameters()) == d + 3 * d * d


def test_parameter_count_with_token_processor():
    m = MergeModule(MergerConfig(hidden_size=D, num_heads=H, token_processor=True))
    n = sum(p.numel() for p in m.parameters())
    # + Linear(d, d) with bias + LayerNorm(d) weight and bias
    assert n == D + 3 * D * D + (D * D + D) + 2 * D
    assert n > D + 3 * D * D


def test_span_positions_start_as_the_paper_module_and_then_tell_order_apart():
    x, mask, _ = spans()
    plain = randomize(MergeModule(MergerConfig(hidden_size=D, num_heads=H)), seed=4)
    m = MergeModule(MergerConfig(hidden_size=D, num_heads=H, span_positions=True))
    m.load_state_dict(plain.state_dict(), strict=False)  # the position table stays at its zero init
    assert sum(p.numel() for p in m.parameters()) == D + 3 * D * D + 4 * D
    torch.testing.assert_close(m(x, mask), plain(x, mask))
    swapped = x.clone()
    swapped[:, [0, 1]] = x[:, [1, 0]]  # reverse the first two tokens of every span
    first = mask[:, 1] & ~mask[:, 2]  # 2-token spans: swapping reverses them
    torch.testing.assert_close(plain(swapped, mask)[first], plain(x, mask)[first])  # the paper's pooling: blind
    with torch.no_grad():
        m.span_position.copy_(torch.randn(4, D))
    assert not torch.allclose(m(swapped, mask)[first], m(x, mask)[first], atol=1e-3)
    # the table is indexed from the span's end: the last real token always gets row 0
    y = torch.zeros(1, 4, D)
    one_pad = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(m(y, one_pad), m(y[:, :3]))


def test_heads_must_divide_hidden_size():
    with pytest.raises(ValueError, match="divisible"):
        MergeModule(MergerConfig(hidden_size=10, num_heads=4))


def test_untrained_merger_is_the_masked_mean():
    torch.manual_seed(0)
    m = MergeModule(MergerConfig(hidden_size=D, num_heads=H))
    x, mask, lens = spans()
    out = m(x, mask)
    assert out.shape == (len(x), D)
    expected = (x * mask[..., None]).sum(1) / lens[:, None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # without a mask every position is real
    torch.testing.assert_close(m(x), x.mean(1), atol=1e-5, rtol=1e-5)
    # the mean over the real tokens differs from the mean over all four slots
    assert not torch.allclose(out, x.mean(1), atol=1e-3)


@pytest.mark.parametrize("trained", [False, True])
def test_padding_content_is_ignored(trained):
    m = MergeModule(MergerConfig(hidden_size=D, num_heads=H))
    if trained:
        randomize(m)
    x, mask, _ = spans()
    garbage = x.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), D) * 1000.0
    torch.testing.assert_close(m(x, mask), m(garbage, mask), atol=1e-5, rtol=1e-5)
    # but real-token content matters
    changed = x.clone()
    changed[0, 0] += 1.0
    assert not torch.allclose(m(x, mask)[0], m(changed, mask)[0])


@pytest.mark.parametrize("token_processor,span_positions", [(False, False), (True, False), (False, True)])
def test_batched_equals_one_span_at_a_time(token_processor, span_positions):
    cfg = MergerConfig(hidden_size=D, num_heads=H, token_processor=token_processor, span_positions=span_positions)
    m = randomize(MergeModule(cfg), seed=1)
    x, mask, lens = spans(seed=3)
    batched = m(x, mask)
    for i, n in enumerate(lens.tolist()):
        single = m(x[i : i + 1, :n])  # unpadded, no mask
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=1e-5)
    # a trained merger is no longer the mean
    assert not torch.allclose(batched, (x * mask[..., None]).sum(1) / lens[:, None], atol=1e-2)


def test_output_dtype_follows_input():
    m = MergeModule(MergerConfig(hidden_size=D, num_heads=H))
    x, mask, _ = spans()
    out = m(x.to(torch.bfloat16), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), m(x.to(torch.bfloat16).float(), mask), atol=1e-2, rtol=1e-2)


def test_query_gets_a_gradient_at_init():
    m = MergeModule(MergerConfig(hidden_size=D, num_heads=H))
    x, mask, _ = spans()
    target = torch.randn(len(x), D)
    ((m(x, mask) - target) ** 2).sum().backward()
    assert m.query.grad is not None and m.query.grad.abs().sum() > 0
    for p in m.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_empty_batch_of_spans():
    m = MergeModule(MergerConfig(hidden_size=D, num_heads=H))
    out = m(torch.zeros(0, 4, D), torch.zeros(0, 4, dtype=torch.bool))
    assert out.shape == (0, D)


# -- persistence -------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_processor,span_positions", [(False, False), (True, False), (False, True)])
def test_save_load_round_trip(tmp_path, token_processor, span_positions, tiny_tokenizer):
    fp = tokenizer_fingerprint(tiny_tokenizer)
    cfg = MergerConfig(hidden_size=D, num_heads=H, token_processor=token_processor, span_positions=span_positions,
                       lm_name="tiny-lm", tokenizer=fp)
    m = randomize(MergeModule(cfg), seed=2)
    path = m.save_pretrained(tmp_path / "merger")
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = MergeModule.from_pretrained(path, hidden_size=D, tokenizer_fp=fp)
    assert loaded.config == cfg
    x, mask, _ = spans(seed=5)
    assert torch.equal(m(x, mask), loaded(x, mask))
    for (k1, v1), (k2, v2) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    # saving again over the directory replaces it
    m2 = randomize(MergeModule(cfg), seed=9)
    m2.save_pretrained(path)
    assert torch.equal(MergeModule.from_pretrained(path)(x, mask), m2(x, mask))
    assert [p.name for p in tmp_path.iterdir()] == ["merger"]


def test_hidden_size_mismatch_refused(tmp_path):
    MergeModule(MergerConfig(hidden_size=D, num_heads=H, lm_name="lm-16")).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="hidden size 16"):
        MergeModule.from_pretrained(tmp_path / "m", hidden_size=32)
    MergeModule.from_pretrained(tmp_path / "m", hidden_size=D)


def test_tokenizer_mismatch_refused(tmp_path, tiny_tokenizer, other_tiny_tokenizer):
    fp_a, fp_b = tokenizer_fingerprint(tiny_tokenizer), tokenizer_fingerprint(other_tiny_tokenizer)
    MergeModule(MergerConfig(hidden_size=D, num_heads=H, tokenizer=fp_a)).save_pretrained(tmp_path / "m")
    with pytest.raises(TokenizerMismatchError, match="merger"):
        MergeModule.from_pretrained(tmp_path / "m", tokenizer_fp=fp_b)
    MergeModule.from_pretrained(tmp_path / "m", tokenizer_fp=fp_a)


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.95])
def test_truncated_weights_give_clear_error(tmp_path, keep):
    MergeModule(MergerConfig(hidden_size=D, num_heads=H)).save_pretrained(tmp_path / "m")
    w = tmp_path / "m" / WEIGHTS_NAME
    data = w.read_bytes()
    w.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="corrupted"):
        MergeModule.from_pretrained(tmp_path / "m")


def test_garbage_weights_give_clear_error(tmp_path):
    MergeModule(MergerConfig(hidden_size=D, num_heads=H)).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_NAME).write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="corrupted"):
        MergeModule.from_pretrained(tmp_path / "m")


def test_weights_not_matching_config_give_clear_error(tmp_path):
    MergeModule(MergerConfig(hidden_size=D, num_heads=H)).save_pretrained(tmp_path / "m")
    cfg_file = tmp_path / "m" / CONFIG_NAME
    cfg = json.loads(cfg_file.read_text())
    cfg["hidden_size"] = 2 * D
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        MergeModule.from_pretrained(tmp_path / "m")


def test_corrupted_or_foreign_config(tmp_path):
    MergeModule(MergerConfig(hidden_size=D, num_heads=H)).save_pretrained(tmp_path / "m")
    cfg_file = tmp_path / "m" / CONFIG_NAME
    cfg_file.write_bytes(b"\xff\x00 not json")
    with pytest.raises(ValueError, match="corrupted"):
        MergeModule.from_pretrained(tmp_path / "m")
    cfg_file.write_text(json.dumps({"hidden_size": D}))
    with pytest.raises(ValueError, match="not a UMIM merger"):
        MergeModule.from_pretrained(tmp_path / "m")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        MergeModule.from_pretrained(tmp_path / "nothing")
    MergeModule(MergerConfig(hidden_size=D, num_heads=H)).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        MergeModule.from_pretrained(tmp_path / "m")
