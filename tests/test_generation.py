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
    batch = m.generate(PROMPTS, "dynamic", GREEDY, compact_every=3)
    t_final = kv_cache.cache_length(m.last_cache)
    for p, rb in zip(PROMPTS, batch):
        r1 = m.generate(p, "dynamic", GREEDY)[0]
        assert rb.generated_ids == r1.generated_ids
        assert rb.segments == r1.segments and rb.kv_len_final == r1.kv_len_final
    # after the final compaction the cache is as long as the longest row, not the unmerged length
    assert t_final == max(r.kv_len_final for r in batch)


def test_batched_rollback_equals_recompute(setup):
    lm, tok, merger, rules = setup
    m = MergedLM(lm, tok, merger, rules)
    for r in m.generate(PROMPTS, "dynamic", GREEDY, compact_every=2, trace=True):
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
