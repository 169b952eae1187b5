"""LLMLingua-1 and LLMLingua-2 baselines on tiny real models built from configs (no downloads): ratio 0
is the identity, the requested TR is hit within 2 points in the target LM's tokens, kept tokens and
words keep their order, LLMLingua-1 keeps the highest-loss tokens of each segment (with or without
the KV cache), its demonstration-level step drops whole demonstrations, LLMLingua-2's word grouping
and word probabilities agree with the ``llmlingua`` package, and both are deterministic."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_lm

from umim_eval.methods.llmlingua1 import (
    LLMLingua1,
    demonstration_spans,
    iterative_compress,
    segment_budgets,
)
from umim_eval.methods.llmlingua2 import LLMLingua2, load_classifier, word_keep_probs
from umim_eval.methods.select_context import self_information

RATIOS = (0.1, 0.3, 0.5)

PARAGRAPHS = [
    ("The river rises in the hills north of the town and flows south through farmland. In spring the "
    "water is high and fast, and the old mill still turns when the current is strong. Children fish "
    "from the stone bridge, while their parents sell bread and cheese at the Saturday market."),
    ("A compiler reads the source code of a program and translates it into machine instructions. It "
    "first splits the text into tokens, then builds a syntax tree, checks the types of every "
    "expression, and finally emits code that the processor can run without further help."),
    ("When the train stopped at the small station, only two passengers stepped onto the platform. "
    "One carried a heavy suitcase, the other a basket of apples. The station master waved a green "
    "flag, the engine whistled, and the train moved slowly on towards the coast."),
]
DEMOS = "\n\n".join(PARAGRAPHS)


def _bytelevel_tokenizer(lines, vocab_size: int):
    """A tiny byte-level BPE (decodes back to the exact text), trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(lines), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")


def _wordpiece_tokenizer(lines):
    """A tiny BERT-style WordPiece tokenizer ([CLS] text [SEP]) with a vocabulary built in a fixed order:
    the specials, every character alone and as a ``##`` continuation, and the 100 most frequent words
    (tokenizers' WordPieceTrainer picks among equal counts differently in every process, which made
    the classifier, and so the LLMLingua-2 tests, differ from run to run)."""
    import collections
    import re

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = collections.Counter(w for line in lines for w in re.findall(r"\w+|[^\w\s]", line))
    chars = sorted({c for w in words for c in w})
    frequent = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:100] if len(w) > 1]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + chars + ["##" + c for c in chars] + frequent))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return _bytelevel_tokenizer(PARAGRAPHS, 300)


@pytest.fixture(scope="module")
def lm(tok):
    return make_tiny_lm("llama", len(tok), context=512)


@pytest.fixture(scope="module")
def prompts(tok):
    out = [tok(p, add_special_tokens=False)["input_ids"] for p in PARAGRAPHS]
    assert all(50 <= len(p) <= 512 for p in out), [len(p) for p in out]
    return out


@pytest.fixture(scope="module")
def small_lm_dir(tmp_path_factory):
    """A tiny llama with its OWN tokenizer (different vocabulary), saved as a local folder."""
    d = tmp_path_factory.mktemp("small-lm")
    small_tok = _bytelevel_tokenizer(PARAGRAPHS, 400)
    make_tiny_lm("llama", len(small_tok), context=512).save_pretrained(d)
    small_tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    """A tiny random 2-label BERT token classifier with a WordPiece tokenizer, saved as a local folder.
    The name carries the package's checkpoint key, so the package's word rules apply to it."""
    from transformers import BertConfig, BertForTokenClassification

    d = tmp_path_factory.mktemp("tiny-bert-base-multilingual-cased")
    ctok = _wordpiece_tokenizer(PARAGRAPHS)
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(
        vocab_size=len(ctok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=512, num_labels=2, initializer_range=0.1))
    model.save_pretrained(d)
    ctok.save_pretrained(d)
    return str(d)


def _is_subsequence(short: str, long: str) -> bool:
    it = iter(long)
    return all(c in it for c in short)


# -- the shared knob ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LLMLingua1, LLMLingua2])
def test_ratio_checks_and_identity(cls, lm, tok, prompts, clf_dir):
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ratio"):
            cls(ratio=bad)
    kw = {"model": clf_dir} if cls is LLMLingua2 else {}
    for p in prompts:
        c = cls(0.0, **kw).compress(lm, tok, p)
        assert c.ids == p and c.kept == list(range(len(p))) and c.tr == 0.0
    with pytest.raises(ValueError, match="empty prompt"):
        cls(0.3, **kw).compress(lm, tok, [])


# -- LLMLingua-1 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", RATIOS)
def test_llmlingua1_hits_tr_index_aligned(lm, tok, prompts, ratio):
    for p in prompts:
        c = LLMLingua1(ratio, iterative_size=24).compress(lm, tok, p)
        assert abs(c.tr - ratio) <= 0.02
        assert c.kept[0] == 0 and c.kept == sorted(set(c.kept)) and c.ids == [p[i] for i in c.kept]


def test_llmlingua1_segments_keep_their_highest_loss_tokens(lm, prompts):
    p = prompts[0]
    # one segment: the prompt's own self-information decides (first token always kept)
    kept = iterative_compress(lm, p, 0.4, iterative_size=len(p))
    k = segment_budgets(len(p), 0.4, len(p))[0]
    info = self_information(lm, p)[1:]
    assert kept == [0] + sorted((torch.sort(-info, stable=True).indices[: k - 1] + 1).tolist())
    # several segments: each keeps its share, scored on the compressed prefix (cache == recompute)
    for rate in (0.3, 0.7):
        fast = iterative_compress(lm, p, rate, iterative_size=16)
        slow = iterative_compress(lm, p, rate, iterative_size=16, use_cache=False)
        assert fast == slow
        counts = [sum(s <= i < s + 16 for i in fast) for s in range(0, len(p), 16)]
        assert counts == segment_budgets(len(p), rate, 16)
    # conditioning on the compressed prefix matters: a later segment differs from scoring it whole
    assert iterative_compress(lm, p, 0.3, 16)[-10:] != iterative_compress(lm, p, 0.3, len(p))[-10:]


def test_llmlingua1_demonstration_level_drops_whole_demos(lm, tok):
    ids = tok(DEMOS, add_special_tokens=False)["input_ids"]
    spans = demonstration_spans(tok, ids, "\n\n")
    assert len(spans) == 3 and spans[0][0] == 0 and spans[-1][1] == len(ids)
    c = LLMLingua1(0.5, demo_sep="\n\n", context_budget=0, iterative_size=32).compress(lm, tok, ids)
    assert abs(c.tr - 0.5) <= 0.02
    touched = [any(a <= i < b for i in c.kept) for a, b in spans]
    assert 1 <= sum(touched) < 3  # a budget of half the tokens leaves some demonstration out whole
    # with a large slack every demonstration survives the coarse step
    c = LLMLingua1(0.5, demo_sep="\n\n", context_budget=10_000, iterative_size=32).compress(lm, tok, ids)
    assert abs(c.tr - 0.5) <= 0.02 and all(any(a <= i < b for i in c.kept) for a, b in spans)


def test_llmlingua1_other_small_lm_retokenizes(lm, tok, prompts, small_lm_dir):
    for p in prompts[:2]:
        c = LLMLingua1(0.3, small_lm=small_lm_dir, iterative_size=32).compress(lm, tok, p)
        assert c.kept is None and abs(c.tr - 0.3) <= 0.02
        assert _is_subsequence(tok.decode(c.ids), tok.decode(p))
    # too short to reach the TR within 2 points: a clear error, or the closest with a warning
    short = prompts[0][:12]
    with pytest.raises(RuntimeError, match="achieved TR"):
        LLMLingua1(0.3, small_lm=small_lm_dir).compress(lm, tok, short)
    with pytest.warns(UserWarning, match="achieved TR"):
        LLMLingua1(0.3, small_lm=small_lm_dir, strict=False).compress(lm, tok, short)


def test_llmlingua1_deterministic(lm, tok, prompts):
    a = LLMLingua1(0.3, demo_sep="\n\n").compress(lm, tok, prompts[1])
    b = LLMLingua1(0.3, demo_sep="\n\n").compress(lm, tok, prompts[1])
    assert a == b


# -- LLMLingua-2 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", RATIOS)
def test_llmlingua2_hits_tr_and_keeps_order(lm, tok, prompts, clf_dir, ratio):
    for p in prompts:
        c = LLMLingua2(ratio, model=clf_dir).compress(lm, tok, p)
        assert c.kept is None and abs(c.tr - ratio) <= 0.02
        assert _is_subsequence(tok.decode(c.ids), tok.decode(p))  # kept words, in order, nothing added


def test_llmlingua2_keeps_most_probable_words_and_forced_ones(lm, tok, prompts, clf_dir):
    model, ctok = load_classifier(clf_dir)
    text = tok.decode(prompts[2])
    words = word_keep_probs(model, ctok, text)
    c = LLMLingua2(0.5, model=clf_dir).compress(lm, tok, prompts[2])
    kept_words = set(tok.decode(c.ids).split())
    ranked = torch.sort(-words.probs, stable=True).indices.tolist()
    top = {text[slice(*words.spans[i])] for i in ranked[:5]}
    assert all(any(w in k for k in kept_words) for w in top)  # the 5 most probable words survive
    forced = text[slice(*words.spans[ranked[-1]])]  # the least probable word, forced in
    c = LLMLingua2(0.5, model=clf_dir, force_tokens=(forced,)).compress(lm, tok, prompts[2])
    assert forced in tok.decode(c.ids)


def test_llmlingua2_words_agree_with_llmlingua_package(tok, prompts, clf_dir):
    """Words and word probabilities equal the package's token-level path (``__merge_token_to_word``
    + mean, as in its ``__compress``), called on its private helpers: its constructor downloads a
    tiktoken vocabulary. (Its ``__get_context_prob`` differs on purpose: there a word's later tokens
    repeat the first token's probability, a quirk of the package's context-level filter.)"""
    from llmlingua import PromptCompressor

    model, ctok = load_classifier(clf_dir)
    pc = object.__new__(PromptCompressor)  # skip __init__ (network); set what the helper reads
    pc.model_name = clf_dir  # holds "bert-base-multilingual-cased": the package's WordPiece rules
    pc.special_tokens = {v for k, v in ctok.special_tokens_map.items() if k != "additional_special_tokens"}
    for p in prompts:
        text = tok.decode(p)
        ours = word_keep_probs(model, ctok, text)
        x = [ctok.cls_token_id] + ctok(text, add_special_tokens=False)["input_ids"] + [ctok.sep_token_id]
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.tensor([x])).logits[0], -1)[:, 1].tolist()
        words, word_probs, _ = pc._PromptCompressor__merge_token_to_word(
            ctok.convert_ids_to_tokens(x), probs, force_tokens=[], token_map={}, force_reserve_digit=False)
        assert [text[s:e] for s, e in ours.spans] == words
        torch.testing.assert_close(ours.probs, torch.tensor([sum(w) / len(w) for w in word_probs], dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        assert ours.probs.std() > 1e-3  # the classifier is not saturated: the ranking means something


def test_llmlingua2_deterministic_and_bos_kept(lm, tok, prompts, clf_dir):
    p = [tok.bos_token_id] + prompts[0]
    a = LLMLingua2(0.3, model=clf_dir).compress(lm, tok, p)
    assert a == LLMLingua2(0.3, model=clf_dir).compress(lm, tok, p)
    assert a.ids[0] == tok.bos_token_id and a.ids.count(tok.bos_token_id) == 1
    with pytest.raises(ValueError, match="no text"):
        LLMLingua2(0.3, model=clf_dir).compress(lm, tok, [tok.bos_token_id])
