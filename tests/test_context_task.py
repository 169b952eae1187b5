"""The sentence-recall comparison (``umim-eval recall``, :mod:`umim_eval.tasks.recall`): its questions
repeat the passage's own tokens and ask every third of it, it runs end to end on a tiny Llama with
every method at a matched TR (exact at TR 0), bad settings are refused in one line, and on the real
embedded SmolLM2 the passage is what answers the question: the full passage beats no passage, and
a method that drops the early context (StreamingLLM's recent window) does worse on an early answer."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_eval_runners import tiny  # noqa: F401  (the runners' tiny Llama + merger + rules fixture)

from umim.errors import UserError
from umim.inference.generation import MergedLM
from umim_eval.methods.registry import make_method
from umim_eval.tasks.recall import (
    RecallConfig,
    RecallExample,
    _score,
    load_examples,
    make_example,
    recall_table,
    run_recall,
    split_sentences,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = {"data": "pydoc", "context_tokens": 96, "cue_tokens": 2, "answer_tokens": 4, "n_choices": 3}


def _contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def test_sentences_are_split_at_their_ends():
    assert split_sentences("One is here.  Two\nfollows! \"Three\" ends? e.g. lower. Done") == \
        ["One is here.", "Two follows!", "\"Three\" ends? e.g. lower.", "Done"]


def test_questions_repeat_the_passage_and_ask_every_third(tiny):  # noqa: F811
    cfg = RecallConfig(n_samples=9, **TINY)
    examples = load_examples(cfg, tiny["m"].tokenizer)
    assert len(examples) == 9
    for ex in examples:
        cue, gold = ex.query[-cfg.cue_tokens :], ex.answers[0]
        assert 0.75 * cfg.context_tokens <= len(ex.context) <= cfg.context_tokens
        assert len(ex.answers) == cfg.n_choices and all(len(a) == cfg.answer_tokens for a in ex.answers)
        assert len({tuple(a) for a in ex.answers}) == cfg.n_choices  # distinct candidates
        assert _contains(ex.context, cue + gold)  # the gold answer follows the cue in the passage
        assert all(_contains(ex.context, a) for a in ex.answers[1:])  # the others are passage text too
        assert ex.region == min(int(3 * ex.position), 2)
    positions = np.array([ex.position for ex in examples])
    asked = np.arange(9) % 3
    # asked in turn from the beginning, middle and end third (the nearest usable sentence otherwise)
    assert positions[asked == 0].mean() < positions[asked == 1].mean() < positions[asked == 2].mean()
    assert (positions[asked == 0] < 1 / 3).all()


def test_a_passage_without_enough_usable_sentences_is_skipped():
    cfg = RecallConfig(cue_tokens=1, answer_tokens=2, n_choices=3, context_tokens=32)
    rng = np.random.default_rng(0)
    same_cue = [[5, 1, 2], [5, 3, 4], [6, 7, 8], [9, 10, 11]]  # 5 starts two sentences: neither is askable
    assert make_example(same_cue, [0], cfg, 0, rng) is None
    ok = make_example(same_cue + [[12, 13, 14]], [0], cfg, 0, rng)
    assert ok is not None and ok.query[-1] in (6, 9, 12) and ok.context == [t for s in same_cue for t in s] + \
        [12, 13, 14]


@pytest.fixture(scope="module")
def recall_result(tiny):  # noqa: F811
    cfg = RecallConfig(n_samples=6, methods=["umim", "select_context", "streaming_llm"],
                       targets=["umim", 0.0, 0.3], **TINY)
    return run_recall(cfg, progress=False, merged_lm=tiny["m"])


def test_recall_runs_every_method_at_a_matched_tr(recall_result, tiny):  # noqa: F811
    rows = {(str(r["target"]), r["method"]): r for r in recall_result["rows"]}
    assert set(rows) == {("umim", "umim"), *((t, n) for t in ("umim", "0.0", "0.3")
                                            for n in ("select_context", "streaming_llm"))}
    assert rows["umim", "umim"]["max_tr_gap"] == 0.0 and rows["umim", "umim"]["achieved_tr"] > 0.05
    for (target, name), r in rows.items():
        assert r["n"] == 6 and r["max_tr_gap"] <= 0.02, (target, name, r["max_tr_gap"])
        assert np.isfinite(r["nll"]) and 0.0 <= r["acc"] <= 1.0
    base = recall_result["base"]
    for name in ("select_context", "streaming_llm"):  # TR 0 removes nothing: the base LM's scores exactly
        assert rows["0.0", name]["achieved_tr"] == 0.0
        assert rows["0.0", name]["nll"] == pytest.approx(base["nll"], rel=1e-4)
        assert rows["0.0", name]["correct"] == base["correct"]
        np.testing.assert_allclose(rows["0.0", name]["scores"], base["scores"], rtol=1e-4)
    assert recall_result["no_context"]["nll"] != pytest.approx(base["nll"])
    table = recall_table(recall_result)
    assert table.count("\n") == 2 + 2 + 2 + len(recall_result["rows"])
    assert "Base LM, no passage" in table and "StreamingLLM" in table and "Acc beginning (%)" in table


def test_bad_settings_are_refused_in_one_line(tiny):  # noqa: F811
    for bad, word in (({"n_choices": 1}, "n_choices"), ({"answer_tokens": 0}, "answer_tokens"),
                      ({"n_choices": 20, "context_tokens": 64}, "context_tokens"), ({"targets": [1.5]}, "1.5")):
        with pytest.raises(UserError, match=word) as e:
            RecallConfig(**bad).check()
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="lower n_samples"):
        load_examples(RecallConfig(n_samples=100_000, **TINY), tiny["m"].tokenizer)


# -- the embedded model ----------------------------------------------------------------------------
PASSAGES = [
    ["Marta keeps three silver keys under the blue flower pot by the kitchen door.",
     "The weather in the valley turned cold after the long dry summer.",
     "Our train to the coast leaves every morning at a quarter past seven.",
     "Most of the old bridges in the town were rebuilt with red stone.",
     "The library closes early on Sundays because of the weekly cleaning.",
     "A small orange cat sleeps on the warm roof of the bakery."],
    ["Professor Lindqvist wrote her first book about the migration of northern geese.",
     "Fresh bread is delivered to the market before the shops open.",
     "The museum added a new room for paintings of the harbour.",
     "Children in the village learn to swim in the cold lake.",
     "Every winter the road over the mountain pass is closed for weeks.",
     "The farmer sold his apples at the Saturday fair near the church."],
]


@pytest.fixture(scope="module")
def smollm():
    from umim.lm import LMSpec, load_lm, load_tokenizer

    torch.set_num_threads(2)
    spec = LMSpec("embedded")
    return MergedLM(load_lm(spec), load_tokenizer(spec))


def test_the_early_context_answers_an_early_question_on_embedded_model(smollm):
    """The first sentence of a passage asked: the base LM recalls it, far better than with no passage,
    and StreamingLLM at TR 0.5 (sink + the recent half kept) loses it."""
    m, cfg = smollm, RecallConfig()
    k, a = cfg.cue_tokens, cfg.answer_tokens
    instruction = m.tokenizer(cfg.instruction, add_special_tokens=False)["input_ids"]
    base, streaming = make_method("base", 0.0, merged_lm=m), make_method("streaming_llm", 0.5, merged_lm=m)
    for texts in PASSAGES:
        sentences = [m.tokenizer(" " + s, add_special_tokens=False)["input_ids"] for s in texts]
        context = [t for s in sentences for t in s]
        assert sum(len(s) for s in sentences[:1]) < len(context) // 2 - 4  # past the sink, in the dropped half
        ex = RecallExample(context=context, query=instruction + sentences[0][:k],
                           answers=[s[k : k + a] for s in sentences[:4]], position=0.0, region=0)
        full, _ = _score(base, m, ex)
        none, _ = _score(base, m, ex, context=instruction)
        dropped, tr = _score(streaming, m, ex)
        assert tr == pytest.approx(0.5, abs=0.02)
        assert full[0] < min(full[1:]), full  # the base LM picks the gold answer
        # summed NLL of the gold answer's 8 tokens
        assert full[0] < 0.5 * none[0] and full[0] < 0.5 * dropped[0], (full, none, dropped)
