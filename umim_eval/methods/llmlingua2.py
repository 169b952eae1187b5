"""LLMLingua-2 (Pan et al., 2024): a token classifier says which words of the prompt to keep.

A bidirectional encoder fine-tuned for token classification (label 1 = keep) gives every one of
its tokens a keep probability ``p(keep)``; tokens are grouped into words and a word's probability
is the mean over its tokens (the package's ``token_to_word="mean"``); the most probable words are
kept, in their original order, and the kept text is re-encoded by the target tokenizer. The output
is therefore text-level: :attr:`CompressedPrompt.kept` is ``None``.

What follows the ``llmlingua`` package (``compress_prompt_llmlingua2``):

* texts longer than the encoder's window (512 with [CLS]/[SEP] around each chunk) are cut into chunks that end at a
  "." or newline token where possible, each classified on its own;
* word grouping is the package's rule for the multilingual BERT checkpoint: a token opens a new
  word unless it continues the previous one (WordPiece ``##``); we read "continues" from character
  offsets (no space before it, and neither it nor the previous token is punctuation), which gives
  the same words for WordPiece and also works for SentencePiece / byte-level tokenizers;
* ``force_tokens``: words that are always kept (probability 1).

What differs: the package keeps the words whose probability is above a percentile of the
probabilities weighted by GPT-3.5 (tiktoken) tokens, at ``rate`` measured in those tokens; here the
knob is the fraction of words kept (most probable first, earlier on ties), bisected to the requested
TR in the TARGET LM's tokens. The package is not called: its constructor downloads a tiktoken
vocabulary and its word rules are keyed on the two checkpoint names. Kept words are joined by the
original text between them when adjacent, else by one space (or nothing, when no whitespace
separated them), instead of the tokenizer's ``convert_tokens_to_string``.
"""

from __future__ import annotations

import math
import string
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import torch

from umim.errors import UserError
from umim_eval.methods.base import CompressedPrompt, PromptCompressor, check_ratio
from umim_eval.methods.llmlingua1 import leading_specials
from umim_eval.methods.match_tr import match_tr

DEFAULT_MODEL = "microsoft/llmlingua-2-bert-base-multilingual-cased-meetingbank"
"""The paper's "small model variant" (App. F.2); the large one is
``microsoft/llmlingua-2-xlm-roberta-large-meetingbank``."""


@lru_cache(maxsize=2)
def load_classifier(name_or_path: str):
    """``(model, tokenizer)`` of a token-classification checkpoint (hub id or local folder), eval mode."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if not getattr(tok, "is_fast", False):
        raise UserError(f"{name_or_path}: LLMLingua-2 needs a fast tokenizer (character offsets)")
    model = AutoModelForTokenClassification.from_pretrained(name_or_path).eval()
    model.requires_grad_(False)
    if model.config.num_labels != 2:
        raise UserError(f"{name_or_path}: expected 2 labels (drop, keep), got {model.config.num_labels}")
    return model, tok


def _is_punct(s: str) -> bool:
    return bool(s) and all(c in string.punctuation for c in s)


@dataclass
class Words:
    """The words of a text with their keep probabilities."""

    spans: list[tuple[int, int]]
    """[W] character spans ``(start, end)`` of the words in the text, ascending."""
    probs: torch.Tensor
    """[W] float64 mean keep probability of each word's tokens."""


def chunk_bounds(tokens: list[str], max_len: int, ends: tuple[str, ...] = (".", "\n")) -> list[tuple[int, int]]:
    """Cut ``tokens`` into chunks of at most ``max_len``, each ending at a token in ``ends`` when
    one lies in the window (else at the window's end). Returns half-open ``(start, end)`` spans."""
    out, st, n = [], 0, len(tokens)
    while st < n:
        ed = min(st + max_len, n)
        if ed < n:
            cut = next((j + 1 for j in range(ed - 1, st, -1) if tokens[j].lstrip("#▁Ġ") in ends), ed)
            ed = cut
        out.append((st, ed))
        st = ed
    return out


@torch.no_grad()
def word_keep_probs(model, tok, text: str, force_tokens: tuple[str, ...] = (), max_seq_len: int = 512,
                    batch_size: int = 50) -> Words:
    """Keep probability of every word of ``text`` under a 2-label token classifier (label 1 = keep).

    Parameters
    ----------
    model, tok : the classifier and its fast tokenizer.
    text : the prompt as text.
    force_tokens : words whose probability is set to 1.
    max_seq_len : encoder window, special tokens included (capped by the model's positions).
    batch_size : chunks per forward.
    """
    max_seq_len = min(max_seq_len, getattr(model.config, "max_position_embeddings", max_seq_len))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    pieces = tok.convert_ids_to_tokens(ids)
    # per-token keep probability, chunk by chunk; each chunk framed by [CLS] ... [SEP]
    probs = torch.zeros(len(ids), dtype=torch.float64)
    # the package frames every chunk as [CLS] ... [SEP] (<s> ... </s> for XLM-R)
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    head, tail = [cls_id] if cls_id is not None else [], [sep_id] if sep_id is not None else []
    chunks = chunk_bounds(pieces, max_seq_len - 2)
    for b in range(0, len(chunks), batch_size):
        rows = [head + ids[a:e] + tail for a, e in chunks[b : b + batch_size]]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        x = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=model.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
        p = torch.softmax(model(input_ids=x, attention_mask=mask).logits.float(), -1)[..., 1].double().cpu()
        for (a, e), row in zip(chunks[b : b + batch_size], p):
            probs[a:e] = row[len(head) : len(head) + e - a]
    # tokens -> words: a token continues the previous word when nothing separates them in the text
    spans, groups = [], []
    for i, (s, e) in enumerate(offs):
        if e <= s:
            continue  # tokens with no text of their own
        piece = text[s:e]
        cont = (spans and s == spans[-1][1] and not _is_punct(piece) and not _is_punct(text[spans[-1][0]:spans[-1][1]])
                and piece not in force_tokens)
        if cont:
            spans[-1] = (spans[-1][0], e)
            groups[-1].append(i)
        else:
            spans.append((s, e))
            groups.append([i])
    wp = torch.tensor([float(probs[g].mean()) for g in groups], dtype=torch.float64)
    for w, (s, e) in enumerate(spans):
        if text[s:e] in force_tokens:
            wp[w] = 1.0
    return Words(spans=spans, probs=wp)


def keep_words(words: Words, keep: float) -> list[int]:
    """Indices of the ``round(keep * W)`` most probable words (at least one), ascending; ties go to
    the earlier word."""
    W = len(words.spans)
    k = max(1, min(W, math.floor(keep * W + 0.5)))
    return sorted(torch.sort(-words.probs, stable=True).indices[:k].tolist())


def join_words(text: str, spans: list[tuple[int, int]], kept: list[int]) -> str:
    """The kept words in order: original text between adjacent words, else one space (or nothing
    when no whitespace separated them)."""
    out = []
    for j, w in enumerate(kept):
        if j:
            prev = kept[j - 1]
            gap = text[spans[prev][1] : spans[w][0]]
            out.append(gap if w == prev + 1 else (" " if any(c.isspace() for c in gap) else ""))
        out.append(text[spans[w][0] : spans[w][1]])
    return "".join(out)


@dataclass
class LLMLingua2(PromptCompressor):
    """LLMLingua-2 at a target token reduction.

    Parameters
    ----------
    ratio : target token reduction, in the target LM's tokens.
    model : token-classification checkpoint, hub id or local folder (loaded once and cached).
    force_tokens : words always kept.
    tr_tolerance : largest accepted ``|achieved TR - ratio|``; beyond it ``compress`` raises (or, with
        ``strict=False``, warns and returns the closest compression found).
    """

    ratio: float = 0.0
    model: str = DEFAULT_MODEL
    force_tokens: tuple[str, ...] = field(default_factory=tuple)
    tr_tolerance: float = 0.02
    strict: bool = True
    name: ClassVar[str] = "llmlingua2"
    label: ClassVar[str] = "LLMLingua2"

    def __post_init__(self):
        self.ratio = check_ratio(self.ratio)
        self.force_tokens = tuple(self.force_tokens)

    def compress(self, lm, tokenizer, prompt_ids: list[int]) -> CompressedPrompt:
        ids = list(prompt_ids)
        n = len(ids)
        if n == 0:
            raise UserError("empty prompt: LLMLingua-2 needs at least one token")
        if self.ratio == 0.0:
            return CompressedPrompt(ids=ids, kept=list(range(n)), n_original=n)
        h = leading_specials(tokenizer, ids)
        text = tokenizer.decode(ids[h:])
        if not text.strip():
            raise UserError("the prompt has no text besides special tokens: nothing to compress")
        clf, clf_tok = load_classifier(self.model)
        words = word_keep_probs(clf, clf_tok, text, self.force_tokens)

        def run(keep: float) -> CompressedPrompt:
            kept_text = join_words(text, words.spans, keep_words(words, keep))
            return CompressedPrompt(ids=ids[:h] + tokenizer(kept_text, add_special_tokens=False)["input_ids"],
                                    kept=None, n_original=n)

        _, out, _ = match_tr(run, self.ratio, lambda c: c.tr, max_iter=40)
        miss = abs(out.tr - self.ratio)
        if miss > self.tr_tolerance:
            msg = (f"{self.name}: achieved TR {out.tr:.4f} is {miss:.4f} from the requested {self.ratio} on a "
                   f"{n}-token prompt (whole words are kept or dropped, so the TR moves in steps of a word's tokens)")
            if self.strict:
                raise RuntimeError(msg)
            warnings.warn(msg, stacklevel=2)
        return out
