"""Every registered method through the one method contract (:mod:`umim_eval.methods.base`), on a
tiny real Llama with a byte-level tokenizer, a merger and rules mined from Python's docs.

One table (:data:`OPTIONS`) names what each method is built with; a new method is added to the
registry and to this table, and the checks below run on it unchanged:

* it carries its name, label, kind and knob, and is built from a run by ``make_method``;
* ratio 0 is the identity: the continuation NLL equals the base LM's;
* a target TR is hit within 2 points per example (or the method states its shortfall);
* merging and dropping stay inside the prompt (no padding merged), and ``generate`` returns texts
  for prompts of different lengths in one batch at the TR it reports.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_tiny_lm
from test_eval_llmlingua import _bytelevel_tokenizer, _wordpiece_tokenizer

from umim.fingerprint import tokenizer_fingerprint
from umim.inference.generation import MergedLM, SamplingConfig
from umim.ktoken.encoder import KTokenConfig, KTokenEncoder
from umim.ktoken.lora import ADAPTER_DIR, LoRASettings, add_lora, save_adapter
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.corpus import load_documents, tokenize_documents
from umim.rules.mining import mine_rules
from umim_eval.methods.base import KVPolicy, Method, PromptCompressor, PromptMerger
from umim_eval.methods.registry import METHODS, check_methods, make_method, method_class
from umim_eval.scoring.policy_generate import eager_attention

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KINDS = {"prompt_compressor": PromptCompressor, "prompt_merger": PromptMerger, "kv_policy": KVPolicy}

OPTIONS = {
    "base": lambda d: {},
    "umim": lambda d: {},
    "umim_budget": lambda d: {},
    "select_context": lambda d: {},
    "llmlingua1": lambda d: {"iterative_size": 32},
    # words of this 400-token vocabulary span several tokens: a word step can exceed 2 points of TR
    "llmlingua2": lambda d: {"model": d["clf"], "tr_tolerance": 0.1},
    "quickmerge": lambda d: {},
    "ktoken": lambda d: {"path": d["ktoken"]},
    "ktoken_lora": lambda d: {"path": d["ktoken_lora"]},  # a fresh adapter (B = 0): ratio 0 is the identity
    "streaming_llm": lambda d: {},
    "h2o": lambda d: {},
}
"""Registry name -> options from the fixture's folders (the table every method is run from)."""

TARGET = 0.25


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    docs = load_documents("pydoc", "train")[:1500]
    tok = _bytelevel_tokenizer(docs, 400)
    lm = make_tiny_lm("llama", len(tok), context=256)
    lm.config.eos_token_id = lm.config.pad_token_id = tok.pad_token_id
    fp = tokenizer_fingerprint(tok)
    ids, offsets = tokenize_documents(docs, tok, progress=False)
    rules = mine_rules(ids, offsets, fp, min_count=10)
    torch.manual_seed(1)
    merger = MergeModule(MergerConfig(hidden_size=32, tokenizer=fp))
    KTokenEncoder(KTokenConfig(hidden_size=32, k=2, tokenizer=fp)).save_pretrained(root / "ktoken")
    KTokenEncoder(KTokenConfig(hidden_size=32, k=2, tokenizer=fp)).save_pretrained(root / "ktoken_lora")
    with torch.random.fork_rng():  # the other builders draw what they drew before
        adapted = make_tiny_lm("llama", len(tok), context=256)
        add_lora(adapted, LoRASettings(r=2))
        save_adapter(adapted, root / "ktoken_lora" / ADAPTER_DIR)
    from transformers import BertConfig, BertForTokenClassification

    ctok = _wordpiece_tokenizer(docs[:300])
    BertForTokenClassification(BertConfig(vocab_size=len(ctok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_labels=2,
                                          max_position_embeddings=512)).save_pretrained(root / "tiny-bert")
    ctok.save_pretrained(root / "tiny-bert")
    stream = ids[: 6 * 72].tolist()
    examples = [(stream[i : i + 56 - 4 * j], stream[i + 56 : i + 72]) for j, i in enumerate(range(0, 6 * 72, 72))]
    return {"m": MergedLM(lm, tok, merger, rules), "examples": examples,
            "dirs": {"clf": str(root / "tiny-bert"), "ktoken": str(root / "ktoken"),
                     "ktoken_lora": str(root / "ktoken_lora")}}


def build(run, name: str, ratio: float) -> Method:
    options = OPTIONS[name](run["dirs"])
    check_methods([name], {name: options})
    return make_method(name, ratio, merged_lm=run["m"], **options)


def test_the_table_covers_the_registry():
    assert set(OPTIONS) == set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_carries_its_name_label_kind_and_knob(run, name):
    method = build(run, name, 0.0)
    assert method.name == name and method.label and isinstance(method, KINDS[method.kind])
    assert (method.ratio is None) == method.fixed_tr


@pytest.mark.parametrize("name", [n for n in sorted(METHODS) if n == "base" or not method_class(n).fixed_tr])
def test_ratio_zero_is_the_identity(run, name):
    """(Methods without a TR knob, fixed-rule UMIM, have no ratio 0.)"""
    m, base = run["m"], build(run, "base", 0.0)
    method = build(run, name, 0.0)
    for ctx, tgt in run["examples"]:
        s, b = method.score_continuation(m, ctx, tgt), base.score_continuation(m, ctx, tgt)
        assert s.tr == 0.0
        torch.testing.assert_close(s.nll, b.nll, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_target_tr_is_hit(run, name):
    m = run["m"]
    method = build(run, name, 0.0)
    for ctx, tgt in run["examples"]:
        want = m.token_reduction(ctx) if method.fixed_tr and name != "base" else (0.0 if name == "base" else TARGET)
        method.aim(want)
        s = method.score_continuation(m, ctx, tgt)
        assert s.nll.shape == (len(tgt),) and torch.isfinite(s.nll).all()
        assert abs(s.tr - want) <= 0.02 + method.tr_shortfall(len(ctx), want), (name, len(ctx), s.tr, want)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_reduction_stays_inside_the_prompt_and_batches_generate(run, name):
    m = run["m"]
    method = build(run, name, TARGET)
    prompts = [ctx for ctx, _ in run["examples"][:3]]  # 56, 52, 48 tokens: padded when batched
    if isinstance(method, PromptMerger):
        for p in prompts:
            with eager_attention(m.lm, method.needs_attentions):
                mp = method.merge(m.lm, m.tokenizer, p)
            starts = [s for s, _ in mp.segments]
            assert starts[0] == 0 and sum(n for _, n in mp.segments) == len(p) == mp.n_original
            assert all(a + n == b for (a, n), b in zip(mp.segments, starts[1:]))  # tiles the prompt, in order
            assert mp.embeds.shape[0] == len(mp.segments)
    elif isinstance(method, PromptCompressor):
        for p in prompts:
            c = method.compress(m.lm, m.tokenizer, p)
            assert c.kept is None or (c.kept == sorted(c.kept) and all(0 <= i < len(p) for i in c.kept))
    targets = [m.token_reduction(p) if method.fixed_tr and name != "base" else TARGET * (name != "base")
               for p in prompts]
    sampling = SamplingConfig(max_new_tokens=4, eos_token_id=None)
    gens = method.generate(m, prompts, targets, sampling, batch_size=3)
    assert [len(g) for g in gens] == [1, 1, 1]
    for g, t, p in zip(gens, targets, prompts):
        assert len(g[0].ids) == 4
        assert abs(g[0].tr - t) <= 0.02 + method.tr_shortfall(len(p), t), (name, g[0].tr, t)
