"""Model-probability merge rules (paper App. G.4, Table 16; the chunk criterion of CD-LM).

Instead of counting frequent n-grams, the frozen LM itself says which spans are predictable: a
token is *confident* when the LM, given everything before it in its document, gives it a
probability above ``threshold``. A maximal run of consecutive confident tokens is a candidate
span; every span of ``min_n .. max_n`` tokens found this way is counted over the corpus and kept
when it occurs ``min_count`` times or more. The result is an ordinary :class:`MergeRules`, so the
shared matcher, :class:`~umim.inference.generation.MergedLM`, perplexity and the lm-eval model use it
unchanged.

Decisions (the appendix leaves them open):

* **Which tokens must be confident.** ``head="confident"`` (default, the appendix read literally:
  "consecutive spans of tokens whose probabilities exceed a threshold") requires EVERY token of the
  span, the first included, to have ``p > threshold``. ``head="free"`` lets the span start one token
  earlier: a head token of any probability followed by a run of confident tokens (the span is then
  "a token and the continuation it makes predictable"; it gives more and longer rules).
* **Runs longer than max_n.** ``long_runs="split"`` (default) cuts a run left to right into pieces
  of ``max_n`` tokens, as the longest-match segmenter would walk it, and keeps the last piece if it
  still has ``min_n`` tokens (a run of 5 with max_n=4 gives one 4-gram; a run of 7 gives 4 + 3).
  ``long_runs="discard"`` drops the whole run, as the appendix does ("we discard any candidate
  chunk longer than four tokens"); it yields far fewer rules.
* **Context.** The first token of a document has no context, so it is never confident. Documents
  longer than ``block_size`` are cut into chunks of ``block_size`` tokens, each scored on its own:
  a chunk's first token is treated like a document start, so no span crosses a cut, a document
  boundary or padding.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from umim.fingerprint import tokenizer_fingerprint
from umim.rules.mining import FILTER_STAGES, MiningError, apply_filters
from umim.rules.store import MergeRules

HEADS = ("confident", "free")
LONG_RUNS = ("split", "discard")


def _chunks(offsets: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut every document into chunks of at most ``block_size`` tokens.

    Returns
    -------
    starts, lengths : int64 arrays [C], chunk start in the flat corpus and its length.
    """
    doc_start, doc_len = offsets[:-1], np.diff(offsets)
    doc_start, doc_len = doc_start[doc_len > 0], doc_len[doc_len > 0]
    per_doc = -(-doc_len // block_size)
    first = np.repeat(doc_start, per_doc)
    k = np.arange(per_doc.sum()) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)  # chunk index in its doc
    starts = first + k * block_size
    ends = np.minimum(starts + block_size, np.repeat(doc_start + doc_len, per_doc))
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


@torch.no_grad()
def token_probs(lm, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Probability the LM gives each token given the tokens before it in its row.

    Parameters
    ----------
    lm : causal LM returning ``.logits`` [B, L, V].
    ids : long [B, L], right-padded rows.
    lengths : long [B], valid length of each row.

    Returns
    -------
    float32 [B, L]; column 0 (no context) and padding are 0.
    """
    B, L = ids.shape
    mask = (torch.arange(L, device=ids.device)[None] < lengths[:, None]).long()
    logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1]  # [B, L-1, V] predicts 1..L-1
    logp = logits.float().gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.float().logsumexp(-1)
    out = torch.zeros(B, L, dtype=torch.float32, device=ids.device)
    out[:, 1:] = logp.exp() * mask[:, 1:]
    return out


def span_starts(confident: np.ndarray, head: str = "confident", min_n: int = 2, max_n: int = 4,
                long_runs: str = "split") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spans made of confident tokens, cut to at most ``max_n`` tokens.

    Parameters
    ----------
    confident : bool [B, L]; False at every position that must not be in a span's tail (column 0,
        padding). Rows are independent.
    head, long_runs : see the module docstring.

    Returns
    -------
    rows, starts, lens : int64 arrays [K]; span k covers ``[starts[k], starts[k] + lens[k])`` of
    row ``rows[k]``, with ``min_n <= lens[k] <= max_n``.
    """
    B, L = confident.shape
    # a False column between rows keeps runs inside their row once flattened
    flat = np.zeros((B, L + 1), dtype=np.int8)
    flat[:, :L] = confident
    edges = np.diff(np.concatenate([[0], flat.ravel()]))
    run_start = np.flatnonzero(edges == 1)
    run_end = np.flatnonzero(edges == -1)  # exclusive
    if head == "free":
        # the token before a maximal run is not confident (or is column 0): it becomes the head
        run_start = run_start - 1
    run_len = run_end - run_start
    if long_runs == "discard":
        keep = (run_len >= min_n) & (run_len <= max_n)
        starts, lens = run_start[keep], run_len[keep]
    else:
        pieces = -(-run_len // max_n)
        k = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece index in its run
        starts = np.repeat(run_start, pieces) + k * max_n
        lens = np.minimum(max_n, np.repeat(run_end, pieces) - starts)
        keep = lens >= min_n
        starts, lens = starts[keep], lens[keep]
    rows, cols = np.divmod(starts, L + 1)
    return rows.astype(np.int64), cols.astype(np.int64), lens.astype(np.int64)


def mine_model_prob_rules(
    lm,
    tokenizer,
    ids: np.ndarray,
    offsets: np.ndarray,
    threshold: float = 0.5,
    min_n: int = 2,
    max_n: int = 4,
    min_count: int = 1,
    batch_size: int = 8,
    block_size: int = 256,
    head: str = "confident",
    long_runs: str = "split",
    filters: tuple[str, ...] | list[str] = (),
    corpus: str = "",
    progress: bool = True,
) -> MergeRules:
    """Mine merge rules from the LM's own confidence on a tokenized corpus.

    Parameters
    ----------
    lm : the frozen causal LM (any ``AutoModelForCausalLM``); one batched forward per batch of
        ``batch_size`` chunks, chunks grouped by length so little is padded.
    tokenizer : the tokenizer of ``lm`` that produced ``ids`` (its fingerprint goes into the rules).
    ids : int array [N], all documents concatenated.
    offsets : int array [D + 1], document d is ``ids[offsets[d]:offsets[d+1]]``.
    threshold : a token is confident when ``p(token | context) > threshold``.
    min_n, max_n : span lengths kept (2 <= min_n <= max_n).
    min_count : keep spans counted at least this many times.
    batch_size : chunks per forward.
    block_size : longest chunk scored at once (longer documents are cut).
    head : ``"confident"`` or ``"free"`` (module docstring).
    long_runs : ``"split"`` or ``"discard"`` (module docstring).
    filters : optional overlap filters of :mod:`umim.rules.mining` (``"intra"``, ``"inter"``); none by
        default, as in the appendix.
    corpus : description of the corpus (e.g. ``"pydoc:train"``), stored with the rule provenance.

    Returns
    -------
    :class:`MergeRules` with rows sorted by descending count; ``corpus`` records the LM, threshold
    and options, ``tokens_scanned`` the tokens scored.
    """
    if not 0.0 < threshold < 1.0:
        raise MiningError(f"threshold must be a probability in (0, 1), got {threshold}")
    if not 2 <= min_n <= max_n:
        raise MiningError(f"need 2 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
    if min_count < 1 or batch_size < 1 or block_size < 2:
        raise MiningError("need min_count >= 1, batch_size >= 1, block_size >= 2; "
                          f"got {min_count}, {batch_size}, {block_size}")
    if head not in HEADS:
        raise MiningError(f"unknown head rule {head!r}; choose from {HEADS}")
    if long_runs not in LONG_RUNS:
        raise MiningError(f"unknown long-run rule {long_runs!r}; choose from {LONG_RUNS}")
    filters = list(filters)
    if set(filters) - set(FILTER_STAGES):
        raise MiningError(f"unknown filter stage(s) {sorted(set(filters) - set(FILTER_STAGES))}; "
                          f"choose from {FILTER_STAGES}")
    ids = np.asarray(ids, dtype=np.int64)
    off = np.asarray(offsets, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise MiningError("the corpus is empty: no tokens to score")
    if off.ndim != 1 or len(off) < 2 or off[0] != 0 or off[-1] != ids.size or (np.diff(off) < 0).any():
        raise MiningError(f"offsets must rise from 0 to len(ids) = {ids.size}")
    fp = tokenizer_fingerprint(tokenizer)
    vocab = min(fp["vocab_size"], lm.get_input_embeddings().num_embeddings)
    if ids.min() < 0 or ids.max() >= vocab:
        raise MiningError(f"corpus token ids outside [0, {vocab}): not tokenized with this LM's tokenizer?")

    c_start, c_len = _chunks(off, block_size)
    order = np.argsort(-c_len, kind="stable")  # long chunks first: similar lengths share a batch
    c_start, c_len = c_start[order], c_len[order]
    found: dict[int, list[np.ndarray]] = {n: [] for n in range(min_n, max_n + 1)}
    dev = lm.device
    for i in tqdm(range(0, len(c_start), batch_size), desc="model-prob rules", disable=not progress, leave=False):
        s, n = c_start[i : i + batch_size], c_len[i : i + batch_size]
        L = int(n.max())
        col = np.arange(L)
        valid = col[None] < n[:, None]
        batch = np.where(valid, ids[np.minimum(s[:, None] + col[None], ids.size - 1)], 0)  # [b, L]
        probs = token_probs(lm, torch.from_numpy(batch).to(dev), torch.from_numpy(n).to(dev)).cpu().numpy()
        confident = (probs > threshold) & valid
        confident[:, 0] = False
        rows, starts, lens = span_starts(confident, head, min_n, max_n, long_runs)
        for m in found:
            sel = lens == m
            if sel.any():
                found[m].append(batch[rows[sel, None], starts[sel, None] + np.arange(m)[None]])

    ngrams, counts = {}, {}
    for m, parts in found.items():
        grams = np.concatenate(parts) if parts else np.zeros((0, m), dtype=np.int64)
        if len(grams):
            uniq, cnt = np.unique(grams, axis=0, return_counts=True)  # lexicographic order
        else:
            uniq, cnt = grams, np.zeros(0, dtype=np.int64)
        keep = cnt >= min_count
        uniq, cnt = uniq[keep], cnt[keep].astype(np.int64)
        by_count = np.argsort(-cnt, kind="stable")  # ties keep lexicographic order, as in mining
        ngrams[m], counts[m] = uniq[by_count].astype(np.int64), cnt[by_count]
    if sum(len(g) for g in ngrams.values()) == 0:
        raise MiningError(
            f"no span of {min_n}..{max_n} tokens with p > {threshold} occurs >= {min_count} times in {ids.size} "
            "tokens: lower the threshold or min_count, or use a larger corpus"
        )
    ngrams, counts, removed, marginal = apply_filters(ngrams, counts, filters)
    lm_name = getattr(lm.config, "name_or_path", "") or type(lm).__name__
    provenance = (f"model-prob rules (App. G.4): lm={lm_name}, p>{threshold}, head={head}, "
                  f"long_runs={long_runs}, block_size={block_size}")
    return MergeRules(
        ngrams=ngrams, counts=counts, tokenizer=fp, min_count=min_count, n_range=(min_n, max_n),
        filters=[s for s in FILTER_STAGES if s in filters],
        corpus=f"{corpus} | {provenance}" if corpus else provenance,
        tokens_scanned=int(ids.size), removed_by_filter=removed, marginal_by_filter=marginal,
    )
