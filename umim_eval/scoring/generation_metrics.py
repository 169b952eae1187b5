"""Metrics for generated continuations against reference continuations (paper App. F.1, Tables 10-11).

Every score is in percent (0-100), as the paper prints them.

Repetition and diversity (Li et al., 2016)
------------------------------------------
Both work on token sequences: lists of hashable tokens. :mod:`umim_eval.tasks.gen_quality` passes the
LM tokenizer's ids, since the protocol counts its 100 generated tokens in those units; use
:func:`whitespace_tokens` for word-level numbers. For a sequence ``t_1 .. t_L`` the n-grams are the
``max(L - n + 1, 0)`` windows ``(t_i, .., t_{i+n-1})``, counted with multiplicity.

* ``Rep-n`` (sequence level): per sample ``100 * (1 - |unique n-grams| / |n-grams|)``, averaged over
  samples. 0 means no n-gram occurs twice inside a sample.
* ``Dist-n`` (corpus level): ``100 * |distinct n-grams over all samples| / |n-grams over all
  samples|``. 100 means no n-gram occurs twice anywhere.

Samples shorter than ``n`` have no n-grams: they are left out of Rep-n's mean and add nothing to
Dist-n. With no n-gram at all both are NaN (shown as "–" in tables).

Similarity to the reference
---------------------------
* :func:`rouge` — ROUGE-1/2/L/Lsum F1 of ``rouge_score`` (``use_stemmer=True``), mean over pairs.
  ROUGE-Lsum treats newlines as sentence breaks (the ``rouge_score`` convention, as in
  ``evaluate``'s ``rouge``); ``split_sentences=True`` first puts each sentence on its own line.
* :func:`chrf` — corpus chrF (character 6-grams, beta 2) of ``sacrebleu``, which ``evaluate``'s
  ``chrf`` wraps.
* :func:`bertscore` / :class:`BertScorer` — BERTScore F1 (Zhang et al., 2020), see the class.
* :func:`mauve` / :class:`MauveFeaturizer` — MAUVE (Pillutla et al., 2021) of ``mauve-text`` on
  features we compute, see the class and :func:`mauve_from_features`.

Encoders are hub ids or local folders; ``"embedded"`` names the offline SmolLM2-135M folder
(:func:`umim.lm.resolve`), so every metric runs without network access.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from umim.errors import UserError

# -- repetition and diversity ------------------------------------------------------------------------


def _ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    if n < 1:
        raise UserError(f"n must be >= 1, got {n}")
    tokens = list(tokens)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def rep_n(token_lists: Sequence[Sequence[Hashable]], n: int) -> float:
    """Sequence-level repetition Rep-n in percent (see module docstring).

    Parameters
    ----------
    token_lists : N sequences of tokens (ids or words), one per sample.
    n : n-gram order.
    """
    rates = []
    for toks in token_lists:
        grams = _ngrams(toks, n)
        if grams:
            rates.append(100.0 * (1.0 - len(set(grams)) / len(grams)))
    return float(np.mean(rates)) if rates else math.nan


def dist_n(token_lists: Sequence[Sequence[Hashable]], n: int) -> float:
    """Corpus-level diversity Dist-n in percent (see module docstring).

    Parameters
    ----------
    token_lists : N sequences of tokens (ids or words), one per sample.
    n : n-gram order.
    """
    counts: Counter = Counter()
    for toks in token_lists:
        counts.update(_ngrams(toks, n))
    total = sum(counts.values())
    return 100.0 * len(counts) / total if total else math.nan


def whitespace_tokens(texts: Sequence[str]) -> list[list[str]]:
    """Word tokens: each text split on whitespace."""
    return [t.split() for t in texts]


# -- ROUGE and chrF -----------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _check_pairs(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise UserError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise UserError("no texts to score")


def rouge(preds: Sequence[str], refs: Sequence[str], split_sentences: bool = False) -> dict[str, float]:
    """Mean ROUGE F1 in percent: keys ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``.

    Parameters
    ----------
    preds, refs : N generated and N reference texts, paired by index.
    split_sentences : put every sentence (split after ``.!?`` + whitespace) on its own line before
        scoring, so ROUGE-Lsum sees sentences in texts that have no newlines.
    """
    from rouge_score import rouge_scorer

    _check_pairs(preds, refs)
    keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    prep = (lambda t: "\n".join(_SENTENCE_END.split(t.strip()))) if split_sentences else (lambda t: t)
    sums = dict.fromkeys(keys, 0.0)
    for p, r in zip(preds, refs):
        scores = scorer.score(prep(r), prep(p))  # rouge_score's order: (target, prediction)
        for k in keys:
            sums[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(preds) for k, v in sums.items()}


def chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: char order 6, word order 0, beta 2), 0-100.

    Parameters
    ----------
    preds, refs : N generated and N reference texts, paired by index (one reference each).
    """
    from sacrebleu.metrics import CHRF

    _check_pairs(preds, refs)
    return float(CHRF().corpus_score(list(preds), [list(refs)]).score)


# -- encoders -----------------------------------------------------------------------------------------


def _resolve(name_or_path: str) -> str:
    from umim.lm import LMSpec, resolve

    return resolve(LMSpec(str(name_or_path)))[0]


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _load_encoder(name_or_path: str, device):
    """(tokenizer, base model without LM head in eval mode, max input length)."""
    from transformers import AutoModel, AutoTokenizer

    path = _resolve(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(_device(device)).eval().requires_grad_(False)
    # Tokenizers saved without a limit report ~1e30, which the fast backend cannot truncate to.
    max_len = tok.model_max_length if tok.model_max_length < 1_000_000 else None
    max_len = max_len or getattr(model.config, "max_position_embeddings", None) or 1024
    return tok, model, int(max_len)


def _is_byte_bpe(tok) -> bool:
    from transformers import GPT2Tokenizer, RobertaTokenizer

    return isinstance(tok, (GPT2Tokenizer, RobertaTokenizer))


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and mask [B, T]; right padding leaves a causal model's valid states as is."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# -- BERTScore ----------------------------------------------------------------------------------------


class BertScorer:
    """BERTScore F1 with any Hugging Face encoder, hub id or local folder, offline.

    Why not ``bert_score.score`` itself: with transformers 5 it fails on tokenizers saved without a
    ``model_max_length`` (an OverflowError when truncating, e.g. SmolLM2 and any tiny test
    tokenizer), on tokenizers without a pad token (Llama), and needs ``num_layers`` from its own
    table. Its empty-text check assumes ``[CLS] [SEP]`` (2 tokens), so it misfires on a Llama text
    of 2 tokens, and transformers 5 silently ignores the ``add_prefix_space=True`` it passes for
    RoBERTa/GPT-2. So we compute BERTScore ourselves, the same way (checked against
    ``bert_score.score`` on a BERT model in the tests):

    * each text is stripped and encoded with special tokens, truncated to the model's length; a
      byte-level BPE tokenizer (RoBERTa, GPT-2) gets a leading space, which is what
      ``add_prefix_space=True`` meant;
    * token states are the output of layer ``num_layers`` (``hidden_states[num_layers]``; 0 = the
      embeddings), which is what ``bert_score`` gets by dropping the layers above it; a decoder-only
      model's final norm is applied to them as the truncated model would;
    * the wrapping tokens (``[CLS]``, ``[SEP]``, ``<s>``, ``</s>``, BOS) get weight 0, every other
      token weight 1, ``[UNK]`` included (``bert_score`` without idf zeroes ``[CLS]``/``[SEP]``; we
      also zero BOS, the attention sink of causal LMs);
    * recall = mean over reference tokens of the max cosine to a candidate token, precision the
      same the other way, F1 = 2PR / (P + R); a text with no weighted token scores 0. No idf, no
      baseline rescaling.

    Scores from a causal LM's states (e.g. ``"embedded"``) are valid for comparing systems under
    the same encoder but are not on the scale of the roberta-large numbers of the paper.

    Parameters
    ----------
    model_type : hub id or local folder of the encoder; ``"embedded"`` for the offline SmolLM2.
    num_layers : layer whose states are used; default: ``bert_score``'s tuned layer for known hub
        models (roberta-large: 17), otherwise required.
    batch_size : texts per forward.
    device : torch device; default CUDA when available.
    """

    def __init__(self, model_type: str = "roberta-large", num_layers: int | None = None, batch_size: int = 64,
                 device: str | torch.device | None = None):
        if num_layers is None:
            from bert_score.utils import model2layers

            if model_type not in model2layers:
                raise UserError(f"no default layer for BERTScore model {model_type!r}: give num_layers "
                                "(about two thirds of the model's depth is a common choice)")
            num_layers = model2layers[model_type]
        self.tokenizer, self.model, self.max_len = _load_encoder(model_type, device)
        n_total = getattr(self.model.config, "num_hidden_layers", None)
        if not 0 <= num_layers <= (n_total if n_total is not None else num_layers):
            raise UserError(f"num_layers={num_layers} is outside 0..{n_total} for {model_type!r}")
        self.model_type, self.num_layers, self.batch_size = model_type, num_layers, batch_size
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        # the wrapping tokens only: [UNK] is a word of the text and weighs 1, as in bert_score
        self.special = {t for t in (tok.cls_token_id, tok.sep_token_id, tok.bos_token_id) if t is not None}
        # decoder-only models end in a norm (Llama `norm`, GPT-2 `ln_f`) that bert_score's truncated
        # model applies after layer num_layers; BERT and RoBERTa have none
        self.final_norm = getattr(self.model, "norm", None) or getattr(self.model, "ln_f", None)

    def _encode(self, text: str) -> list[int]:
        text = text.strip()
        if not text:
            return []  # scores 0 whatever the encoding; not every tokenizer can wrap an empty input
        if _is_byte_bpe(self.tokenizer):
            text = " " + text
        return self.tokenizer.encode(text, add_special_tokens=True, truncation=True, max_length=self.max_len)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per text: unit-norm token states [T_i, d] (float32, CPU) and token weights [T_i]."""
        out = []
        dev = next(self.model.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            seqs = [self._encode(t) for t in texts[i : i + self.batch_size]]
            # a row with no token would give an all-masked attention row; its weights stay 0 anyway
            seqs = [s or [self.pad_id] for s in seqs]
            ids, mask = _pad(seqs, self.pad_id)
            h = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True)
            states = h.hidden_states[self.num_layers]
            if self.final_norm is not None and self.num_layers < len(h.hidden_states) - 1:
                states = self.final_norm(states)  # what the model truncated to num_layers would output
            states = torch.nn.functional.normalize(states.float(), dim=-1).cpu()
            for j, s in enumerate(seqs):
                w = torch.tensor([0.0 if t in self.special else 1.0 for t in s])
                if texts[i + j].strip() == "":
                    w.zero_()
                out.append((states[j, : len(s)], w))
        return out

    def score(self, preds: Sequence[str], refs: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-pair ``precision``, ``recall``, ``f1`` [N] as fractions in [0, 1]."""
        _check_pairs(preds, refs)
        uniq = list(dict.fromkeys(list(preds) + list(refs)))  # encode each distinct text once
        emb = dict(zip(uniq, self.embed(uniq)))
        P, R = torch.zeros(len(preds)), torch.zeros(len(preds))
        for k, (p, r) in enumerate(zip(preds, refs)):
            (hp, wp), (hr, wr) = emb[p], emb[r]
            if wp.sum() == 0 or wr.sum() == 0:
                continue  # an empty text scores 0
            sim = hp @ hr.T  # [Tp, Tr] cosines
            P[k] = (sim.max(dim=1).values * wp).sum() / wp.sum()
            R[k] = (sim.max(dim=0).values * wr).sum() / wr.sum()
        F = torch.where(P + R > 0, 2 * P * R / (P + R).clamp_min(1e-12), torch.zeros_like(P))
        return {"precision": P, "recall": R, "f1": F}

    def f1(self, preds: Sequence[str], refs: Sequence[str]) -> float:
        """Mean BERTScore F1 in percent."""
        return 100.0 * float(self.score(preds, refs)["f1"].mean())


def bertscore(preds: Sequence[str], refs: Sequence[str], model_type: str = "roberta-large",
              num_layers: int | None = None, batch_size: int = 64, device: str | torch.device | None = None) -> float:
    """Mean BERTScore F1 in percent of ``preds`` against ``refs`` (see :class:`BertScorer`)."""
    return BertScorer(model_type, num_layers, batch_size, device).f1(preds, refs)


# -- MAUVE --------------------------------------------------------------------------------------------


class MauveFeaturizer:
    """MAUVE's text features from any Hugging Face LM, offline.

    As ``mauve-text`` does with GPT-2: each text is encoded (special tokens as the tokenizer adds
    them, truncated to ``max_length``), and its feature is the final-layer hidden state (after the
    final norm) at its last token. An empty text is encoded as the single EOS token, so every text
    keeps a feature (``mauve-text`` drops empty texts instead).

    Parameters
    ----------
    name_or_path : hub id or local folder; ``"gpt2-large"`` is MAUVE's default, ``"embedded"`` the
        offline SmolLM2.
    batch_size : texts per forward.
    max_length : token limit per text (MAUVE: 1024).
    device : torch device; default CUDA when available.
    """

    def __init__(self, name_or_path: str = "gpt2-large", batch_size: int = 16, max_length: int = 1024,
                 device: str | torch.device | None = None):
        self.tokenizer, self.model, model_max = _load_encoder(name_or_path, device)
        self.name, self.batch_size, self.max_length = name_or_path, batch_size, min(max_length, model_max)
        tok = self.tokenizer
        self.fallback = tok.eos_token_id if tok.eos_token_id is not None else (tok.pad_token_id or 0)

    @torch.no_grad()
    def features(self, texts: Sequence[str]) -> np.ndarray:
        """Features [N, d] float32, one row per text, in order."""
        if not texts:
            raise UserError("no texts to featurize")
        dev = next(self.model.parameters()).device
        feats = []
        for i in range(0, len(texts), self.batch_size):
            seqs = [self.tokenizer.encode(t, truncation=True, max_length=self.max_length) or [self.fallback]
                    for t in texts[i : i + self.batch_size]]
            ids, mask = _pad(seqs, self.fallback)
            h = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state  # [B, T, d]
            last = mask.sum(1) - 1
            feats.append(h[torch.arange(len(seqs)), last.to(dev)].float().cpu())
        return torch.cat(feats).numpy()


def mauve_buckets(n_p: int, n_q: int, num_buckets: int | str = "auto") -> int:
    """The histogram size MAUVE uses: ``"auto"`` = ``max(2, round(min(n_p, n_q) / 10))`` (mauve-text's rule)."""
    if num_buckets == "auto":
        return max(2, int(round(min(n_p, n_q) / 10)))
    if not isinstance(num_buckets, int) or num_buckets < 2:
        raise UserError(f"num_buckets must be 'auto' or an int >= 2, got {num_buckets!r}")
    return num_buckets


def mauve_from_features(p_features: np.ndarray, q_features: np.ndarray, num_buckets: int | str = "auto",
                        seed: int = 25, kmeans_num_redo: int = 5, kmeans_max_iter: int = 500) -> float:
    """MAUVE in percent between two feature sets, via ``mauve.compute_mauve``.

    Minimum size: k-means must place ``num_buckets`` clusters, so each side needs at least
    ``num_buckets`` samples (2 with ``"auto"`` and fewer than 25 samples); smaller inputs raise a
    ValueError. Equal histograms score exactly 100 (see the comment in the code). MAUVE is a
    distribution estimate: its authors use thousands of samples, and with
    fewer than a few hundred per side scores are noisy and depend on the seed; use them for
    sanity checks, not for claims.

    Parameters
    ----------
    p_features : [N_p, d] features of the model texts.
    q_features : [N_q, d] features of the reference texts.
    num_buckets : histogram size, or ``"auto"`` (see :func:`mauve_buckets`).
    seed : k-means / PCA seed (mauve-text's default 25).
    """
    import mauve as mauve_lib

    p, q = np.asarray(p_features, dtype=np.float32), np.asarray(q_features, dtype=np.float32)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise UserError(f"features must be [N, d] with the same d, got {p.shape} and {q.shape}")
    k = mauve_buckets(len(p), len(q), num_buckets)
    if min(len(p), len(q)) < k:
        raise UserError(f"MAUVE with {k} buckets needs at least {k} samples per side, got {len(p)} and {len(q)} "
                        "(lower num_buckets or score more samples; MAUVE is only stable with hundreds)")
    out = mauve_lib.compute_mauve(p_features=p, q_features=q, num_buckets=k, seed=seed,
                                  kmeans_num_redo=kmeans_num_redo, kmeans_max_iter=kmeans_max_iter)
    if np.array_equal(out.p_hist, out.q_hist):
        # Equal histograms collapse the divergence curve onto the point (1, 1); mauve-text then
        # integrates ties in argsort order and can return 0.75 instead of the frontier's area, 1.
        return 100.0
    return 100.0 * float(out.mauve)


def mauve(p_texts: Sequence[str], q_texts: Sequence[str], featurizer: str | MauveFeaturizer = "gpt2-large",
          num_buckets: int | str = "auto", seed: int = 25, device: str | torch.device | None = None) -> float:
    """MAUVE in percent between model texts ``p_texts`` and reference texts ``q_texts``.

    ``featurizer`` is a :class:`MauveFeaturizer` or a model name for one (see
    :func:`mauve_from_features` for the sample-size minimum).
    """
    if isinstance(featurizer, str):
        featurizer = MauveFeaturizer(featurizer, device=device)
    return mauve_from_features(featurizer.features(p_texts), featurizer.features(q_texts), num_buckets, seed)
