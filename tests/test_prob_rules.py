"""Model-probability merge rules (App. G.4) on real tiny Llamas: a Llama wired to be confident on
known chains gives exactly the expected rules in every mode; on a random Llama the vectorized miner
equals a per-position brute-force reference; spans never cross documents or chunk cuts; the rules
save, load, segment with the shared matcher and refuse another tokenizer."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm

from umim.fingerprint import TokenizerMismatchError, tokenizer_fingerprint
from umim.inference.generation import MergedLM
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.mining import MiningError
from umim.rules.prob_rules import mine_model_prob_rules
from umim.rules.store import MergeRules

CHAIN = [10, 11, 12, 13, 14, 15]  # each token makes the next one near certain
PAIR = [20, 21]
MARKED = 8  # embedding dims reserved for the wired transitions


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def _wired_llama(vocab: int):
    """A real Llama whose layers add nothing (o_proj, down_proj zero), so the logits depend on the
    current token only, with p(next | cur) ~ 1 on CHAIN and PAIR transitions and ~1/V elsewhere."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = lm.model.embed_tokens.weight, lm.lm_head.weight
        emb[:, :MARKED] = 0
        head.normal_(std=0.02)
        head[:, :MARKED] = 0
        transitions = list(zip(CHAIN[:-1], CHAIN[1:])) + [tuple(PAIR)]
        for dim, (cur, nxt) in enumerate(transitions):
            emb[cur] = 0
            emb[cur, dim] = 1.0
            head[nxt] = 0
            head[nxt, dim] = 30.0
    return lm.eval()


def _corpus(vocab: int):
    rng = np.random.default_rng(0)
    filler = lambda k: rng.integers(30, vocab, k).tolist()  # noqa: E731 - never a wired token
    docs = [filler(3) + CHAIN + filler(2) for _ in range(3)]  # A x3
    docs += [filler(1) + PAIR + filler(1)]  # B
    docs += [CHAIN[2:5] + filler(2)]  # C: starts inside the chain
    docs += [filler(2) + CHAIN[:2], CHAIN[2:4] + filler(1)]  # D | E: the chain is cut by the boundary
    ids = np.concatenate([np.array(d) for d in docs])
    return ids, np.concatenate([[0], np.cumsum([len(d) for d in docs])])


def _as_counter(rules: MergeRules) -> Counter:
    return Counter({tuple(g): int(c) for n in rules.ngrams for g, c in zip(rules.ngrams[n].tolist(), rules.counts[n])})


c = CHAIN
EXPECTED = {
    ("confident", "split"): {tuple(c[1:5]): 3, tuple(c[3:5]): 1},
    ("confident", "discard"): {tuple(c[3:5]): 1},
    ("free", "split"): {tuple(c[0:4]): 3, tuple(c[4:6]): 3, tuple(PAIR): 1, tuple(c[2:5]): 1, tuple(c[0:2]): 1,
                        tuple(c[2:4]): 1},
    ("free", "discard"): {tuple(PAIR): 1, tuple(c[2:5]): 1, tuple(c[0:2]): 1, tuple(c[2:4]): 1},
}


@pytest.mark.parametrize("head,long_runs", list(EXPECTED))
def test_wired_llama_gives_exactly_the_expected_rules(tok, head, long_runs):
    vocab = tokenizer_fingerprint(tok)["vocab_size"]
    ids, off = _corpus(vocab)
    rules = mine_model_prob_rules(_wired_llama(vocab), tok, ids, off, threshold=0.5, batch_size=2, block_size=64,
                                  head=head, long_runs=long_runs, progress=False)
    got = _as_counter(rules)
    # exact: a span across the D|E boundary would add (c1, c2, c3) or (c0, c1, c2, c3) once more
    assert got == Counter(EXPECTED[(head, long_runs)])
    assert rules.tokens_scanned == ids.size and rules.n_range == (2, 4) and "model-prob" in rules.corpus
    for n, counts in rules.counts.items():
        assert (np.diff(counts) <= 0).all()  # sorted by descending count, like frequency rules


def test_min_count_and_block_cuts(tok):
    vocab = tokenizer_fingerprint(tok)["vocab_size"]
    ids, off = _corpus(vocab)
    lm = _wired_llama(vocab)
    frequent = mine_model_prob_rules(lm, tok, ids, off, min_count=2, head="free", progress=False)
    assert _as_counter(frequent) == Counter({tuple(c[0:4]): 3, tuple(c[4:6]): 3})
    # chunks of 5 tokens cut doc A (3 filler + chain) after c1: the chain restarts without context
    cut = mine_model_prob_rules(lm, tok, ids, off, block_size=5, progress=False)
    # c2 starts doc A's second chunk, so it has no context: only c3..c5 stay confident there
    assert _as_counter(cut) == Counter({tuple(c[3:6]): 3, tuple(c[3:5]): 1})


def _chunk_probs(lm, ids, off, block_size) -> list[tuple[list[int], list[float]]]:
    """Brute force: every chunk alone through the LM; p of each token given the chunk before it."""
    out = []
    for d in range(len(off) - 1):
        doc = ids[off[d] : off[d + 1]].tolist()
        for s in range(0, len(doc), block_size):
            chunk = doc[s : s + block_size]
            with torch.no_grad():
                logits = lm(input_ids=torch.tensor([chunk])).logits[0]
            out.append((chunk, [0.0] + [float(logits[j - 1].softmax(-1)[chunk[j]]) for j in range(1, len(chunk))]))
    return out


def _reference(chunks, threshold, head, long_runs, max_n=4, min_n=2) -> Counter:
    """Runs of confident tokens found token by token, cut as the module docstring says."""
    out = Counter()
    for chunk, probs in chunks:
        conf = [j > 0 and p > threshold for j, p in enumerate(probs)]
        j = 0
        while j < len(chunk):
            if not conf[j]:
                j += 1
                continue
            k = j
            while k < len(chunk) and conf[k]:
                k += 1
            run = chunk[j - 1 if head == "free" else j : k]
            if long_runs == "discard":
                pieces = [run] if len(run) <= max_n else []
            else:
                pieces = [run[i : i + max_n] for i in range(0, len(run), max_n)]
            out.update(tuple(p) for p in pieces if len(p) >= min_n)
            j = k
    return out


@pytest.fixture(scope="module")
def random_case(tok):
    vocab = tokenizer_fingerprint(tok)["vocab_size"]
    lm = make_tiny_lm("llama", vocab)
    rng = np.random.default_rng(1)
    # a small vocabulary slice makes repeats (counts > 1) likely
    docs = [rng.integers(0, 24, rng.integers(2, 40)) for _ in range(8)]
    docs += docs[:4]  # repeated documents: counts above 1
    ids = np.concatenate(docs)
    off = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    chunks = _chunk_probs(lm, ids, off, 16)
    # a threshold in a wide gap of the probabilities: float noise of batching cannot flip a token
    p = np.sort([q for _, probs in chunks for q in probs[1:]])
    lo, hi = int(0.3 * len(p)), int(0.5 * len(p))
    i = lo + int(np.argmax(np.diff(p[lo:hi])))
    return lm, ids, off, chunks, float((p[i] + p[i + 1]) / 2)


@pytest.mark.parametrize("head,long_runs", list(EXPECTED))
def test_vectorized_equals_brute_force(tok, random_case, head, long_runs):
    lm, ids, off, chunks, threshold = random_case
    ref = _reference(chunks, threshold, head, long_runs)
    assert sum(ref.values()) > 10 and max(ref.values()) > 1 and any(len(g) == 4 for g in ref)
    rules = mine_model_prob_rules(lm, tok, ids, off, threshold=threshold, batch_size=3, block_size=16, head=head,
                                  long_runs=long_runs, progress=False)
    assert _as_counter(rules) == ref


def test_save_load_segment_and_fingerprint(tok, other_tiny_tokenizer, tmp_path):
    vocab = tokenizer_fingerprint(tok)["vocab_size"]
    ids, off = _corpus(vocab)
    lm = _wired_llama(vocab)
    rules = mine_model_prob_rules(lm, tok, ids, off, head="free", corpus="wired test corpus", progress=False)
    loaded = MergeRules.load(rules.save(tmp_path / "prob"), tokenizer=tok)
    assert _as_counter(loaded) == _as_counter(rules)
    assert loaded.corpus.startswith("wired test corpus | model-prob rules") and "p>0.5" in loaded.corpus
    doc_a = ids[off[0] : off[1]].tolist()  # 3 filler + chain + 2 filler
    assert loaded.segment(doc_a) == [(0, 1), (1, 1), (2, 1), (3, 4), (7, 2), (9, 1), (10, 1)]
    merger = MergeModule(MergerConfig(hidden_size=32, tokenizer=tokenizer_fingerprint(tok)))
    m = MergedLM(lm, tok, merger, loaded)  # used unchanged by generation
    assert m.segment_embeds(doc_a, loaded.segment(doc_a)).shape == (7, 32)
    with pytest.raises(TokenizerMismatchError):
        MergeRules.load(tmp_path / "prob", tokenizer=other_tiny_tokenizer)


def test_bad_inputs(tok):
    vocab = tokenizer_fingerprint(tok)["vocab_size"]
    ids, off = _corpus(vocab)
    lm = _wired_llama(vocab)
    with pytest.raises(MiningError, match="threshold"):
        mine_model_prob_rules(lm, tok, ids, off, threshold=1.5, progress=False)
    with pytest.raises(MiningError, match="outside"):
        mine_model_prob_rules(lm, tok, np.append(ids[:-1], vocab + 5), off, progress=False)
    with pytest.raises(MiningError, match="offsets"):
        mine_model_prob_rules(lm, tok, ids, off[:-1], progress=False)
    with pytest.raises(MiningError, match="head"):
        mine_model_prob_rules(lm, tok, ids, off, head="first", progress=False)
    with pytest.raises(MiningError, match="no span"):
        mine_model_prob_rules(lm, tok, ids, off, min_count=50, progress=False)


def test_cli_mines_model_prob_rules(tok, tmp_path, capsys):
    """``umim mine --model-prob T`` on a saved tiny Llama and a local text file: a threshold of 1e-9
    makes every token confident, so every document yields its 4-token pieces (``long_runs='split'``);
    an impossible threshold is a clear error and writes nothing."""
    from umim.cli import mine_main

    lm = _wired_llama(len(tok))
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    corpus = tmp_path / "docs.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n\nonce upon a time in the forest\n")
    out = tmp_path / "rules"
    rc = mine_main(["--tokenizer", str(tmp_path / "lm"), "--data", str(corpus), "--split", "train",
                    "--model-prob", "1e-9", "--out", str(out)])
    assert rc == 0 and "model-probability rules (p > 1e-09)" in capsys.readouterr().out
    rules = MergeRules.load(out, tokenizer=tok)
    assert rules.min_count == 1 and not rules.filters
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in corpus.read_text().split("\n\n")]
    # every document's tokens after the first (which has no context) are confident: pieces of 4
    expected = Counter()
    for d in docs:
        run = d[1:]
        for i in range(0, len(run), 4):
            piece = tuple(run[i : i + 4])
            if len(piece) >= 2:
                expected[piece] += 1
    got = Counter({tuple(g): int(c) for n in rules.ngrams for g, c in zip(rules.ngrams[n].tolist(), rules.counts[n])})
    assert got == expected
    bad = mine_main(["--tokenizer", str(tmp_path / "lm"), "--data", str(corpus), "--split", "train",
                     "--model-prob", "1.5", "--out", str(tmp_path / "bad")])
    assert bad == 2 and "threshold" in capsys.readouterr().err and not (tmp_path / "bad").exists()
