"""Generation with merging on real tiny models (Llama and GPT-2 built from configs): `none` equals
HF generate, rollback equals recompute, the cache holds one entry per segment, batches equal
batch size 1 row for row, and edge cases give clear behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm

from umim import kv_cache
from umim.fingerprint import TokenizerMismatchError, tokenizer_fingerprint
from umim.inference.generation import MergedLM, SamplingConfig
from umim.lm import cache_kwargs
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.store import MergeRules

PROMPTS = [
    "The for statement is used to iterate over the elements of a sequence",
    "Assignment statements are used to bind names to values",
    "x",
]


def _pydoc_lines(n_topics: int) -> list[str]:
    from pydoc_data.topics import topics

    return [ln for k in sorted(topics)[:n_topics] for ln in topics[k].splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_factory):
    t = tiny_tokenizer_factory(_pydoc_lines(30), vocab_size=300)
    t.add_special_tokens({"eos_token": "[PAD]"})
    return t


def _model(arch: str, vocab: int):
    return make_tiny_lm(arch, vocab)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tok):
    """(lm, tokenizer, merger, rules): rules hold n-grams of the model's own sampled text, so merges happen."""
    lm = _model(request.param, len(tok))
    fp = tokenizer_fingerprint(tok)
    torch.manual_seed(1)
    merger = MergeModule(MergerConfig(hidden_size=32, tokenizer=fp))
    torch.nn.init.normal_(merger.v_proj.weight, std=0.3)  # a non-trivial merger, not the mean
    plain = MergedLM(lm, tok)
    seqs = []
    for p in PROMPTS:
        r = plain.generate(p, "none", SamplingConfig(max_new_tokens=30, do_sample=True, seed=3, top_k=0))[0]
        seqs.append(r.prompt_ids + r.generated_ids)
    grams = {n: {tuple(s[i : i + n]) for s in seqs for i in range(0, len(s) - n + 1, 2 * n - 1)} for n in (2, 3, 4)}
    rules = MergeRules(ngrams={n: np.array(sorted(g)) for n, g in grams.items()},
                       counts={n: np.ones(len(g), dtype=np.int64) for n, g in grams.items()}, tokenizer=fp)
    return lm, tok, merger, rules


GREEDY = SamplingConfig(max_new_tokens=24)
SAMPLED = SamplingConfig(max_new_tokens=24, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=7)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_none_equals_hf_generate(setup, sampling):
    lm, tok, _, _ = setup
    m = MergedLM(lm, tok)
    for p in PROMPTS:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        torch.manual_seed(sampling.seed or 0)
        hf = lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
                         temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, len(ids) :].tolist()
        ours = m.generate(p, "none", sampling)[0]
        assert ours.generated_ids == hf


def _check_rollback(lm, result):
    """Every step's logits == one full forward over the final compressed sequence at that position."""
    t = result.trace
    with torch.no_grad():
        full = lm(inputs_embeds=t["embeds"][None]).logits[0].float()
    keep = t["survives"]
    diff = (t["logits"][keep] - full[t["position"][keep]]).abs().max().item()
    assert diff <= 1e-4, diff
    return diff


@pytest.mark.parametrize("mode", ["prompt", "dynamic"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_rollback_equals_recompute(setup, mode, sampling):
    lm, tok, merger, rules = setup
    m = MergedLM(lm, tok, merger, rules)
    merged_any = False
    for p in PROMPTS:
        r = m.generate(p, mode, sampling, trace=True)[0]
        _check_rollback(lm, r)
        # the cache really holds one entry per segment
        assert r.kv_len_final == len(r.segments) == kv_cache.cache_length(m.last_cache) == len(r.trace["embeds"])
        # segments tile prompt + generation; multi-token segments are rules
        seq = r.prompt_ids + r.generated_ids
        assert [s for s, _ in r.segments] == list(np.cumsum([0] + [n for _, n in r.segments])[:-1])
        assert sum(n for _, n in r.segments) == len(seq) == r.kv_len_unmerged
        for s, n in r.segments:
            if n > 1:
                assert tuple(seq[s : s + n]) in {tuple(g) for g in rules.ngrams[n].tolist()}
                merged_any = True
                if mode == "prompt":
                    assert s + n <= len(r.prompt_ids)  # prompt mode never merges generated tokens
        if mode == "prompt":
            assert r.prompt_len_merged == sum(1 for s, _ in r.segments if s < len(r.prompt_ids))
    assert merged_any


def test_dynamic_merges_generated_tokens_and_shrinks_cache(setup):
    lm, tok, merger, rules = setup
    p = PROMPTS[0]
    first = MergedLM(lm, tok, merger, rules).generate(p, "dynamic", SAMPLED)[0]
    seq, prompt_len = first.prompt_ids + first.generated_ids, first.prompt_len
    # a bigram of two single-token generated steps, absent from the prompt: with it added to the
    # rules the run is identical up to its second token, which must then merge online
    singles = {s for s, n in first.segments if n == 1}
    prompt_grams = {tuple(seq[i : i + 2]) for i in range(prompt_len - 1)}
    i = next(i for i in range(prompt_len, len(seq) - 1)
             if i in singles and i + 1 in singles and tuple(seq[i : i + 2]) not in prompt_grams)
    grams = {n: rules.ngrams[n] for n in rules.ngrams}
    grams[2] = np.vstack([grams[2], [seq[i : i + 2]]])
    more = MergeRules(ngrams=grams, counts={n: np.ones(len(g), dtype=np.int64) for n, g in grams.items()},
                      tokenizer=rules.tokenizer)
    dyn = MergedLM(lm, tok, merger, more).generate(p, "dynamic", SAMPLED)[0]
    assert dyn.generated_ids[: i + 2 - prompt_len] == first.generated_ids[: i + 2 - prompt_len]
    assert (i, 2) in dyn.segments
    assert dyn.kv_len_final == len(dyn.segments) < dyn.kv_len_unmerged
    assert dyn.token_reduction > 0


def test_batched_dynamic_equals_batch_of_one(setup):
    lm, tok, merger, rules = setup
    m = MergedLM(lm, tok, merger, rules)
    batch = m.generate(PROMPTS, "dynamic", GREEDY)
    t_final = kv_cache.cache_length(m.last_cache)
    for p, rb in zip(PROMPTS, batch):
        r1 = m.generate(p, "dynamic", GREEDY)[0]
        assert rb.generated_ids == r1.generated_ids
        assert rb.segments == r1.segments and rb.kv_len_final == r1.kv_len_final
    # the cache (ragged) is as wide as the longest row, not the unmerged length
    assert t_final == max(r.kv_len_final for r in batch)


def test_batched_rollback_equals_recompute(setup):
    lm, tok, merger, rules = setup
    m = MergedLM(lm, tok, merger, rules)
    for r in m.generate(PROMPTS, "dynamic", GREEDY, trace=True):
        _check_rollback(lm, r)


def test_edge_cases(setup, other_tiny_tokenizer):
    lm, tok, merger, rules = setup
    m = MergedLM(lm, tok, merger, rules)
    with pytest.raises(ValueError, match="empty prompt"):
        m.generate("", "dynamic")
    one = m.generate([tok("x", add_special_tokens=False)["input_ids"][0]], "dynamic", GREEDY)[0]
    assert one.prompt_len == 1 and len(one.generated_ids) == GREEDY.max_new_tokens
    with pytest.raises(ValueError, match="context"):
        m.generate(list(range(5, 5 + 200)), "dynamic", GREEDY)
    # EOS as the first token: generation stops after it, and the cache still covers the text
    first = m.generate(PROMPTS[0], "dynamic", GREEDY)[0].generated_ids[0]
    r = m.generate(PROMPTS[0], "dynamic", SamplingConfig(max_new_tokens=10, eos_token_id=first))[0]
    assert r.generated_ids == [first] and r.stop_reason == "eos" and r.kv_len_final == len(r.segments)
    with pytest.raises(ValueError, match="merge mode"):
        MergedLM(lm, tok).generate("x", "dynamic")
    with pytest.raises(ValueError, match="unknown merge mode"):
        m.generate("x", "both")
    with pytest.raises(TokenizerMismatchError):
        MergedLM(lm, other_tiny_tokenizer, merger, rules)


def test_generation_stops_at_model_context(setup):
    lm, tok, merger, rules = setup
    m = MergedLM(lm, tok, merger, rules)
    r = m.generate(PROMPTS[0], "none", SamplingConfig(max_new_tokens=500))[0]
    assert r.stop_reason == "context" and r.kv_len_final <= lm.config.max_position_embeddings


def test_generate_cli_json_and_brackets(setup, tmp_path, capsys):
    import json

    from umim.cli import main

    lm, tok, merger, rules = setup
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    merger.save_pretrained(tmp_path / "run" / "merger")
    rules.save(tmp_path / "run" / "rules")
    args = ["generate", "--model", str(tmp_path / "lm"), "--run-dir", str(tmp_path / "run"), "--prompt", PROMPTS[0],
            "--max-new-tokens", "12"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"text", "generated_ids", "segments", "prompt_len", "prompt_len_merged", "kv_len_final",
            "kv_len_unmerged", "token_reduction"} <= set(out)
    assert out["kv_len_final"] == len(out["segments"]) and len(out["generated_ids"]) == 12
    assert out["token_reduction"] == pytest.approx(1 - out["kv_len_final"] / out["kv_len_unmerged"])
    assert main(args) == 0
    human = capsys.readouterr().out
    assert "[" in human and "KV cache" in human
    assert main(["generate", "--model", str(tmp_path / "lm"), "--run-dir", str(tmp_path / "nowhere"),
                 "--prompt", "x"]) == 2
    assert "no merger" in capsys.readouterr().err


def test_decoding_uses_no_deprecated_transformers_argument(setup):
    """transformers renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40): our calls
    use the name the installed version takes, so decoding raises no deprecation warning."""
    import warnings

    lm, tok, merger, rules = setup
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MergedLM(lm, tok, merger, rules).generate(PROMPTS[0], "dynamic", SamplingConfig(max_new_tokens=8))
    assert not [str(w.message) for w in caught if "deprecated" in str(w.message)]


def test_long_stop_strings_are_found_and_cli_stops_read_escapes(setup):
    """A stop string longer than 16 tokens still stops decoding (the check window covers it), and
    `umim generate --stop '\\n\\n'` means two newlines, not a backslash and an n."""
    from umim.cli import _unescape

    lm, tok, merger, rules = setup
    m = MergedLM(lm, tok)
    free = m.generate(PROMPTS[0], "none", SamplingConfig(max_new_tokens=60))[0]
    ids = free.generated_ids
    stop = tok.decode(ids[30:55])  # 25 tokens, well past the old 16-token window
    assert len(tok(stop, add_special_tokens=False)["input_ids"]) > 16 and stop in free.text
    r = m.generate(PROMPTS[0], "none", SamplingConfig(max_new_tokens=60, stop_strings=[stop]))[0]
    assert r.stop_reason == "stop_string" and stop not in r.text and len(r.generated_ids) < 60
    assert _unescape(r"\n\n") == "\n\n" and _unescape(r"a\tb\\n") == "a\tb\\n"


# -- the decoder's pieces: cache object, stop checker, trace recorder, streaming, keyword settings --------


def _slot_bytes(lm) -> int:
    """Bytes of one cached step over all layers, keys and values, from the model's config."""
    c = lm.config
    h_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * h_kv * head_dim * lm.dtype.itemsize


def test_ragged_cache_rollback_finished_rows_and_trim_equal_recompute(setup):
    """Rows of 9, 5 and 7 entries: rolling back entries of any row, a row that finishes, and the
    final trim give the logits of one plain forward over each row's remaining sequence; freed slots
    are reused, and the bytes are the allocated slots (exactly the entries + 1 scratch after trim)."""
    from umim.inference.kv_cache import MergingCache, cache_bytes

    lm = setup[0]
    torch.manual_seed(0)
    d = lm.get_input_embeddings().embedding_dim
    init = [torch.randn(9, d), torch.randn(5, d), torch.randn(7, d)]  # each row's sequence so far, [S_b, d]
    steps = torch.randn(5, 3, 1, d)
    plan = [[0, 0, 0], [2, 0, 1], [0, 3, 0], [1, 1, 0], [0, 2, 0]]  # entries rolled back before each step
    live_at = [[True] * 3] * 3 + [[True, True, False]] * 2  # row 2 finishes after step 2

    def recompute(seq):
        with torch.no_grad():
            return lm(inputs_embeds=seq[None]).logits[0, -1].float()

    with torch.no_grad():
        for B in (1, 3):
            seqs = [s.clone() for s in init[:B]]
            cache = MergingCache(lm)
            logits = cache.prefill(seqs)
            assert cache.next_pos == cache.lengths() == [len(s) for s in seqs]
            for b in range(B):
                assert torch.allclose(logits[b], recompute(seqs[b]), atol=1e-5)
            for i, (k, live) in enumerate(zip(plan, live_at)):
                k, live = [n if v else 0 for n, v in zip(k, live)][:B], live[:B]
                cache.rollback(k)
                for b in range(B):
                    if live[b]:
                        seqs[b] = torch.cat([seqs[b][: len(seqs[b]) - k[b]], steps[i, b]])
                logits = cache.step(steps[i, :B], live)
                for b in range(B):
                    if live[b]:
                        assert torch.allclose(logits[b], recompute(seqs[b]), atol=1e-4)
                assert cache.lengths() == [len(s) for s in seqs]
                assert kv_cache.cache_length(cache.kv) == max(map(len, seqs))  # the table is as wide as the longest row
                assert cache_bytes(cache.kv) == (cache.kv.capacity + 1) * _slot_bytes(lm)  # allocated, spare included
            # freed slots were reused: the pool never held much more than the peak of live entries
            peak = max(sum(len(s) for s in init[:B]) + 5 * B, 1)
            assert cache.kv.capacity <= peak * (1 + cache.kv.grow) + B
            cache.finish()
            assert cache_bytes(cache.kv) == (sum(map(len, seqs)) + 1) * _slot_bytes(lm) == cache.kv.nbytes()
            for b in range(B):  # the trimmed cache (slots renumbered) still decodes each row correctly
                seqs[b] = torch.cat([seqs[b], steps[0, b]])
            logits = cache.step(steps[0, :B], [True] * B)
            for b in range(B):
                assert torch.allclose(logits[b], recompute(seqs[b]), atol=1e-4)


def test_ragged_cache_prefill_after_rollback_to_empty_equals_a_new_cache(setup):
    """A second prefill on a cache rolled back to empty takes RaggedKV's general path (its pools exist, its
    free slots come out of order), not the first-prefill copy: for a padded batch and a batch of one, its
    logits and the next steps' logits equal those of a brand-new cache bitwise."""
    from umim.inference.kv_cache import MergingCache

    lm = setup[0]
    d = lm.get_input_embeddings().embedding_dim
    torch.manual_seed(0)
    with torch.no_grad():
        for lens in ([5, 2, 7], [6]):
            rows = [torch.randn(n, d) for n in lens]  # [S_b, d]
            steps = torch.randn(3, len(lens), 1, d)
            used = MergingCache(lm)
            used.prefill([torch.randn(4, d), torch.randn(6, d)])  # other rows, another batch size
            for _ in range(3):
                used.step(torch.randn(2, 1, d), [True, True])
            used.rollback(used.lengths())
            assert used.lengths() == [0, 0] and used.kv.table.numel() == 0 and used.kv.capacity >= 16
            new = MergingCache(lm)
            got, want = used.prefill(rows), new.prefill(rows)
            assert not used.kv._fresh and new.kv._fresh  # the general path against the first-prefill one
            assert torch.equal(got, want)
            assert used.lengths() == new.lengths() == lens and used.next_pos == new.next_pos
            for step in steps:
                live = [True] * len(lens)
                assert torch.equal(used.step(step, live), new.step(step, live))
            assert used.lengths() == new.lengths() == [n + 3 for n in lens]

def test_a_step_over_rows_of_equal_length_passes_no_mask_and_equals_recompute(setup):
    """Rows of one length (batch 1 always) step without a mask of ours (transformers' own then lets SDPA
    skip it); rows of different lengths pass our 4-D mask. Both give the logits of a full recompute."""
    from umim.inference.kv_cache import MergingCache

    lm = setup[0]
    d = lm.get_input_embeddings().embedding_dim
    torch.manual_seed(0)
    masks = []
    hook = lm.register_forward_pre_hook(lambda m, a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        with torch.no_grad():
            for lens in ([5, 5], [5, 3]):
                rows = [torch.randn(n, d) for n in lens]
                cache = MergingCache(lm)
                cache.prefill(rows)
                step = torch.randn(len(lens), 1, d)
                masks.clear()
                logits = cache.step(step, [True] * len(lens))
                assert (masks[0] is None) == (lens[0] == lens[1])
                for b, row in enumerate(rows):
                    full = lm(inputs_embeds=torch.cat([row, step[b]])[None]).logits[0, -1].float()
                    assert torch.allclose(logits[b], full, atol=1e-4)
    finally:
        hook.remove()


def test_ragged_cache_refuses_an_unplanned_forward_and_reads_its_length_without_changing(setup):
    """A forward the cache did not plan (a plain model call on a finished decode's cache) is refused, not
    written over live slots; asking the length between a plan and its forward (as models do when no
    positions are given) leaves the plan intact."""
    from umim.inference.kv_cache import MergingCache

    lm = setup[0]
    d = lm.get_input_embeddings().embedding_dim
    torch.manual_seed(0)
    seqs = [torch.randn(5, d), torch.randn(3, d)]
    with torch.no_grad():
        cache = MergingCache(lm)
        cache.prefill(seqs)
        cache.kv.plan_step(torch.tensor([False, True]))  # row 0 finished: a dummy column, table not packed
        assert cache.kv.get_seq_length() == 5
        step = torch.randn(2, 1, d)
        mask = kv_cache.additive_mask(cache.kv.valid[:, None, None, :], step.dtype)
        lm(inputs_embeds=step, attention_mask=mask, position_ids=torch.tensor([[4], [3]]),
           **cache_kwargs(lm, cache.kv), use_cache=True)
        assert cache.kv.lengths() == [5, 4]
        cache.finish()
        before = [p.clone() for p in cache.kv.keys.values()]
        with pytest.raises(RuntimeError, match="must be planned"):
            lm(inputs_embeds=step, **cache_kwargs(lm, cache.kv), use_cache=True)
        assert all(torch.equal(a, b) for a, b in zip(before, cache.kv.keys.values()))


def test_ragged_batches_with_early_stops_equal_batch_of_one_and_recompute(setup):
    """Batches of 1, 3 and 8 rows of different lengths, some stopping early at EOS: every row equals its
    batch-of-one run (tokens, segments, cache length), its logits equal recomputing its final merged
    sequence, and the cache's bytes are the sum of the row lengths (+ the scratch slot) times a step's bytes."""
    lm, tok, merger, rules = setup
    m = MergedLM(lm, tok, merger, rules)
    lines = [ln for ln in _pydoc_lines(30) if 8 <= len(tok(ln, add_special_tokens=False)["input_ids"]) <= 60]
    prompts = sorted(lines[:40], key=len)[::5][:8]  # 8 prompts of different lengths
    free = m.generate(prompts[1], "dynamic", GREEDY)[0].generated_ids
    cfg = SamplingConfig(max_new_tokens=24, eos_token_id=free[4])  # row 1 stops by its 5th token
    solo = [m.generate(p, "dynamic", cfg)[0] for p in prompts]
    assert solo[1].stop_reason == "eos" and {r.stop_reason for r in solo} == {"eos", "max_new_tokens"}
    assert len({len(r.prompt_ids) for r in solo}) > 4
    for B in (1, 3, 8):
        batch = m.generate(prompts[:B], "dynamic", cfg, trace=True)
        for rb, r1 in zip(batch, solo):
            assert rb.generated_ids == r1.generated_ids and rb.stop_reason == r1.stop_reason
            assert rb.segments == r1.segments and rb.kv_len_final == r1.kv_len_final == len(rb.segments)
            _check_rollback(lm, rb)
        assert m.last_cache.lengths() == [r.kv_len_final for r in batch]
        assert kv_cache.cache_length(m.last_cache) == max(r.kv_len_final for r in batch)
        assert kv_cache.cache_bytes(m.last_cache) == (sum(r.kv_len_final for r in batch) + 1) * _slot_bytes(lm)


def test_stop_check_reasons_in_order(tok):
    from umim.inference.decoding import StopCheck, cut_at_stop

    cfg = SamplingConfig(max_new_tokens=4, eos_token_id=[7, 9])
    stop = StopCheck(cfg, context=20, default_eos=3)  # the config's EOS set wins over the default
    assert stop([], 5) is None and stop([], 20) == "context"
    assert stop([1, 9], 7) == "eos" and stop([3], 7) is None
    assert stop([1, 2, 3, 9], 30) == "eos"  # EOS before max_new_tokens before context
    assert stop([1, 2, 3, 4], 30) == "max_new_tokens" and stop([1, 2], 19) is None and stop([1, 2], 20) == "context"
    assert StopCheck(SamplingConfig(), default_eos=3)([5, 3], 9) == "eos"
    ids = tok("bind names to values", add_special_tokens=False)["input_ids"]
    words = StopCheck(SamplingConfig(max_new_tokens=50, stop_strings=["to val"]), tokenizer=tok)
    assert words(ids[:2], 9) is None and words(ids, 9) == "stop_string"
    assert cut_at_stop("bind names to values", ["to val", "names"]) == "bind "
    assert cut_at_stop("bind", ["x"]) == "bind"
    with pytest.raises(ValueError, match="tokenizer"):
        StopCheck(SamplingConfig(stop_strings=["x"]))


def test_trace_recorder_follows_merges():
    """An element merged away later no longer survives at its recorded position; NoTrace records nothing."""
    from umim.inference.trace import NoTrace, TraceRecorder

    rec, e = TraceRecorder(), torch.arange(12.0).reshape(3, 1, 4)
    rec.start([e[0, :, :].repeat(3, 1)])  # 3 prompt elements
    rec.record(torch.zeros(1, 5), [2], [True])  # prefill: logits of element 2
    rec.step(e[1:2], [0], [True])  # element 3 at position 3
    rec.record(torch.ones(1, 5), [3], [True])
    rec.step(e[2:3], [2], [True])  # merges elements 2 and 3 away: the surrogate sits at position 2
    rec.record(torch.full((1, 5), 2.0), [2], [True])
    rec.step(e[2:3], [0], [False])  # a finished row records nothing
    rec.record(torch.full((1, 5), 3.0), [3], [False])
    t = rec.result(0)
    assert t["position"].tolist() == [2, 3, 2] and t["survives"].tolist() == [False, False, True]
    assert t["logits"][:, 0].tolist() == [0.0, 1.0, 2.0] and torch.equal(t["embeds"][-1], e[2, 0])
    assert len(t["embeds"]) == 3 and NoTrace().result(0) is None


@pytest.mark.parametrize("mode", ["none", "prompt", "dynamic"])
def test_stream_equals_generate(setup, mode):
    lm, tok, merger, rules = setup
    m = MergedLM(lm, tok, merger, rules)
    for p, sampling in ((PROMPTS[0], SAMPLED), (PROMPTS[1], GREEDY)):
        want = m.generate(p, mode, sampling)[0]
        got = list(m.stream(p, mode, sampling))
        assert [t.id for t in got] == want.generated_ids
        assert "".join(t.text for t in got) == tok.decode(want.generated_ids, skip_special_tokens=False)
        assert [t.stop_reason for t in got] == [None] * (len(got) - 1) + [want.stop_reason]
        assert kv_cache.cache_length(m.last_cache) == want.kv_len_final
    # a stop string ends the stream on the same token
    stop = tok.decode(want.generated_ids[5:7])
    want = m.generate(PROMPTS[1], mode, max_new_tokens=24, stop_strings=[stop])[0]
    got = list(m.stream(PROMPTS[1], mode, max_new_tokens=24, stop_strings=[stop]))
    assert [t.id for t in got] == want.generated_ids and got[-1].stop_reason == want.stop_reason == "stop_string"
    with pytest.raises(ValueError, match="one prompt"):
        m.stream(PROMPTS, mode)  # raised at the call, before any decoding


def test_stream_text_pieces_hold_back_split_characters(tiny_tokenizer_factory):
    """With byte-level tokens a character may span several tokens: pieces never show half of one,
    and they join to the decoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from umim.inference.decoding import TextPieces

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["plain words and more words"] * 4, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    text = "words 日本語 and café — more"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the rare characters are split into byte tokens
    pieces = TextPieces(tok)
    out = [pieces.push(i) for i in ids] + [pieces.flush()]
    assert "".join(out) == tok.decode(ids) == text and not any("\ufffd" in p for p in out)
    assert "" in out  # some byte tokens were held back


def test_keyword_settings(setup):
    lm, tok, merger, rules = setup
    m = MergedLM(lm, tok, merger, rules)
    kw = m.generate(PROMPTS[0], max_new_tokens=8, do_sample=True, seed=4, top_k=10)[0]
    cfg = m.generate(PROMPTS[0], "dynamic", SamplingConfig(max_new_tokens=8, do_sample=True, seed=4, top_k=10))[0]
    assert kw.generated_ids == cfg.generated_ids and kw.segments == cfg.segments and len(kw.generated_ids) == 8
    from umim.inference.generation import GenerationError

    for call, words in ((lambda: m.generate("x", max_new_token=8), ("max_new_token", "unknown")),
                        (lambda: m.generate("x", sampling=GREEDY, max_new_tokens=8), ("max_new_tokens", "not both")),
                        (lambda: m.generate("x", temperature="hot"), ("temperature", "hot")),
                        (lambda: m.stream("x", top_q=0.5), ("top_q",))):
        with pytest.raises(GenerationError) as e:
            call()
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_batch_with_a_row_stopped_at_the_context(setup):
    """A row stopped by the context keeps feeding masked dummies while the others go on: the dummies
    stay inside the position table (GPT-2 learns absolute positions), and every row equals its
    batch-of-one run."""
    lm, tok, merger, rules = setup
    m = MergedLM(lm, tok, merger, rules)
    long = list(range(5, 5 + 100))
    batch = m.generate([long, PROMPTS[2]], "dynamic", max_new_tokens=60)
    assert batch[0].stop_reason == "context" and len(batch[0].generated_ids) < len(batch[1].generated_ids)
    for p, rb in zip([long, PROMPTS[2]], batch):
        r1 = m.generate(p, "dynamic", max_new_tokens=60)[0]
        assert rb.generated_ids == r1.generated_ids and rb.segments == r1.segments


def test_generate_cli_with_merger_and_rules_needs_no_default_run(setup, tmp_path, capsys, monkeypatch):
    """``--merger`` and ``--rules`` given: the default ``runs/default`` is neither read nor looked up on
    the hub (from a folder without ``runs/``, offline)."""
    from umim.cli import main

    lm, tok, merger, rules = setup
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    merger.save_pretrained(tmp_path / "m")
    rules.save(tmp_path / "r")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--model", str(tmp_path / "lm"), "--merger", "m", "--rules", "r", "--prompt", PROMPTS[0],
                 "--max_new_tokens", "4", "--json", "true"]) == 0
    assert '"token_reduction"' in capsys.readouterr().out


def test_dynamic_merge_of_a_two_token_prompt_with_the_first_new_token(tok):
    """A 3-gram made of a 2-token prompt and the first generated token merges (the row keeps the
    rules' n_max - 1 predecessors even when the prompt is shorter than that)."""
    from umim.inference.generation import _Row

    row = _Row([5, 6], np.array([0, 1]), np.array([1, 1]), keep=3)
    assert row.tail == [5, 6]
    row.generated.append(7)
    assert row.push(7, 3) == (5, 6, 7) and row.segments == [(0, 3)]


@pytest.mark.parametrize("mode", ["none", "dynamic"])
def test_prefill_gives_the_first_token_of_generate(setup, mode):
    """``MergedLM.prefill`` (matcher + merger + prefill forward: time to first token) picks each row's
    first generated token, and its cache holds each merged prompt."""
    lm, tok, merger, rules = setup
    m = MergedLM(lm, tok, merger, rules)
    logits, cache = m.prefill(PROMPTS, mode)
    want = m.generate(PROMPTS, mode, GREEDY)
    assert logits.argmax(-1).tolist() == [r.generated_ids[0] for r in want]
    assert cache.lengths() == cache.next_pos == [r.prompt_len_merged for r in want]
    if mode == "none":
        assert cache.lengths() == [r.prompt_len for r in want]
