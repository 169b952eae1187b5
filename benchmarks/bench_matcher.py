"""Benchmark the span matcher (``umim.merging.matcher.SpanMatcher``) against the paper's Pseudocode 3 loop.

Rule set
--------
Mined with ``umim.rules.mining.mine_rules(..., min_count=2, filters=())`` (no filters) from the tiled
benchmark corpus (``--mine-tokens``, default 5M tokens; see ``benchmarks/_corpus.py``: pydoc topics +
FreeBSD fortunes, SmolLM2 tokenizer, base corpus repeated with random document order). Because the
base corpus is repeated >= 2 times, this is every distinct 2-, 3- and 4-gram of the ~0.57M-token
base corpus. If that is fewer than ``--rules`` (default 1,000,000) n-grams, uniformly random
n-grams (n = 2..4, equal thirds, over the 49152-token vocabulary, distinct from the mined ones) are
added to reach it; the output says how many.

Texts
-----
``--texts`` (50) windows of ``--length`` (2000) tokens, evenly spaced over the ~110K held-out tokens
(documents that are *not* in the mining corpus), concatenated in the held-out order.

What is measured (one thread: ``OMP_NUM_THREADS=1`` etc. and ``os.sched_setaffinity(0, {0})``)
-----------------------------------------------------------------------------------------------
* matcher build time (``SpanMatcher(ngrams, vocab_size)``);
* ``SpanMatcher.segment`` called once per text, and ``segment_batch`` on all texts as one [B, L]
  array (best of ``--repeat``), plus ``match_lengths`` alone (the vectorized trie lookups) to
  show how the batch time splits between lookups and the Python greedy walk;
* Pseudocode 3 (paper App. D): ``for n in [4, 3, 2]: while True:`` scan ``i`` over
  ``range(len(z) - n + 1)``; if ``tuple(z[i:i+n]) in R[n]`` (Python set of tuples), replace the
  window by the tuple and restart the scan; stop when a full scan finds nothing. It is quadratic
  in the text length; it runs on the first ``--p3-texts`` texts (default: all of them, ~0.05-0.1 s
  per 2000-token text here), once; building the Python sets is timed apart.

The two algorithms segment differently (Pseudocode 3 merges every 4-gram anywhere before any
3-gram; the matcher takes the longest match left to right), so their token reductions
``TR = 1 - segments / tokens`` are printed for information. The matcher is additionally checked
against a plain-Python greedy longest-match reference (same Python sets) on every text.

Usage::

    python benchmarks/bench_matcher.py --json matcher.json
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"
if hasattr(os, "sched_setaffinity"):
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    except OSError:
        pass

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _corpus  # noqa: E402

from umim.merging.matcher import SpanMatcher  # noqa: E402
from umim.rules.mining import mine_rules  # noqa: E402


def pseudocode3(z, R) -> list:
    """Paper App. D, Pseudocode 3: merge every n-gram of R[n] for n = 4, 3, 2, restarting after each merge."""
    z = list(z)
    for n in (4, 3, 2):
        Rn = R.get(n, ())
        while True:
            for i in range(len(z) - n + 1):
                if tuple(z[i : i + n]) in Rn:
                    z = z[:i] + [tuple(z[i : i + n])] + z[i + n :]
                    break
            else:
                break
    return z


def greedy_reference(z, R, max_n=4) -> list[tuple[int, int]]:
    """Plain-Python left-to-right longest match: the semantics SpanMatcher promises."""
    out, i = [], 0
    while i < len(z):
        step = 1
        for n in range(min(max_n, len(z) - i), 1, -1):
            if tuple(z[i : i + n]) in R.get(n, ()):
                step = n
                break
        out.append((i, step))
        i += step
    return out


def ngram_keys(g: np.ndarray, V: int) -> np.ndarray:
    k = np.zeros(len(g), dtype=np.int64)
    for j in range(g.shape[1]):
        k = k * V + g[:, j]
    return k


def fill_random(ngrams: dict, target: int, V: int, seed: int = 0) -> tuple[dict, dict]:
    """Add distinct random n-grams (n = 2..4, equal thirds) until there are ``target`` rules."""
    total = sum(len(g) for g in ngrams.values())
    added = {n: 0 for n in (2, 3, 4)}
    if total >= target:
        return ngrams, added
    rng = np.random.default_rng(seed)
    ngrams = dict(ngrams)
    need = target - total
    share = {2: need // 3, 3: need // 3, 4: need - 2 * (need // 3)}
    for n in (2, 3, 4):
        have = np.asarray(ngrams.get(n, np.zeros((0, n), np.int64)), dtype=np.int64)
        taken = ngram_keys(have, V)
        new: list[np.ndarray] = []
        missing = share[n]
        while missing > 0:
            cand = rng.integers(0, V, size=(2 * missing + 16, n), dtype=np.int64)
            ck = ngram_keys(cand, V)
            _, first = np.unique(ck, return_index=True)
            first = np.sort(first)
            cand, ck = cand[first], ck[first]
            ok = ~np.isin(ck, taken)
            cand, ck = cand[ok][:missing], ck[ok][:missing]
            new.append(cand)
            taken = np.concatenate([taken, ck])
            missing -= len(cand)
        ngrams[n] = np.concatenate([have, *new])
        added[n] = share[n]
    return ngrams, added


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mine-tokens", type=int, default=5_000_000, help="size of the tiled mining corpus")
    ap.add_argument("--min-count", type=int, default=2)
    ap.add_argument("--rules", type=int, default=1_000_000, help="minimum rule-set size (random fill)")
    ap.add_argument("--texts", type=int, default=50)
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--p3-texts", type=int, default=0,
                    help="texts given to the (slow) Pseudocode 3 loop; 0 = all --texts")
    ap.add_argument("--repeat", type=int, default=10, help="runs of each matcher timing (best is reported)")
    ap.add_argument("--json", metavar="OUT", help="write all results as JSON")
    args = ap.parse_args()

    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"python {platform.python_version()}, numpy {np.__version__}, CPU affinity {affinity}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    V = _corpus.VOCAB_SIZE
    res: dict = {"config": vars(args), "numpy": np.__version__, "cpu_affinity": affinity}

    # ---- rule set ----------------------------------------------------------------------------
    ids, off = _corpus.tiled_corpus(args.mine_tokens)
    fp = {"name": "SmolLM2-135M-Instruct (GGUF)", "vocab_size": V, "vocab_sha256": ""}
    t0 = time.perf_counter()
    rules = mine_rules(ids, off, fp, min_count=args.min_count, filters=(), progress=False)
    t_mine = time.perf_counter() - t0
    mined = rules.num_rules()
    ngrams, added = fill_random(rules.ngrams, args.rules, V)
    n_rules = sum(len(g) for g in ngrams.values())
    print(f"rule set: mined {sum(mined.values()):,} n-grams with min_count={args.min_count}, no filters, from "
          f"{len(ids):,} tiled tokens in {t_mine:.1f} s ({', '.join(f'n={n}: {k:,}' for n, k in mined.items())})")
    if sum(added.values()):
        print(f"          + {sum(added.values()):,} RANDOM n-grams added to reach {args.rules:,} "
              f"({', '.join(f'n={n}: {k:,}' for n, k in added.items())})")
    else:
        print(f"          no random fill needed (>= {args.rules:,})")
    print(f"          total {n_rules:,} rules")
    res["rules"] = {"mined": mined, "random_added": added, "total": n_rules, "mine_seconds": t_mine}
    del ids, off

    t_build, matcher = best_time(lambda: SpanMatcher(ngrams, V), 3)
    print(f"matcher build: {t_build:.2f} s (best of 3); trie nodes per level: "
          + ", ".join(f"{lv}: {len(k):,}" for lv, k in matcher.keys.items()))
    res["build_seconds"] = t_build

    # ---- texts -------------------------------------------------------------------------------
    held = _corpus.base_corpus()["heldout_ids"].astype(np.int64)
    L, B = args.length, args.texts
    if len(held) < L:
        raise SystemExit(f"held-out text has only {len(held)} tokens < --length {L}")
    starts = np.linspace(0, len(held) - L, B).astype(np.int64)
    batch = np.stack([held[s : s + L] for s in starts])
    texts = [row.tolist() for row in batch]
    n_tok = B * L
    print(f"texts: {B} windows x {L} tokens of held-out text ({n_tok:,} tokens)")

    # ---- matcher -----------------------------------------------------------------------------
    t_seg, segs = best_time(lambda: [matcher.segment(t) for t in texts], args.repeat)
    t_batch, (bstarts, blens) = best_time(lambda: matcher.segment_batch(batch), args.repeat)
    t_ml, _ = best_time(lambda: matcher.match_lengths(batch), args.repeat)
    for b in range(B):  # segment and segment_batch agree, and segments tile the text
        k = int((blens[b] > 0).sum())
        assert segs[b] == list(zip(bstarts[b, :k].tolist(), blens[b, :k].tolist())), b
        assert sum(length for _, length in segs[b]) == L and segs[b][0][0] == 0
    tr_matcher = 1 - sum(len(s) for s in segs) / n_tok

    # ---- Pseudocode 3 ------------------------------------------------------------------------
    t0 = time.perf_counter()
    R = {n: set(map(tuple, g.tolist())) for n, g in ngrams.items()}
    t_sets = time.perf_counter() - t0
    k3 = min(args.p3_texts or B, B)
    print(f"Pseudocode 3 on {k3} texts (Python sets of tuples built in {t_sets:.1f} s) ...", flush=True)
    p3_out, p3_times = [], []
    for t in texts[:k3]:
        t0 = time.perf_counter()
        p3_out.append(pseudocode3(t, R))
        p3_times.append(time.perf_counter() - t0)
    t_p3 = sum(p3_times)
    tr_p3 = 1 - sum(len(z) for z in p3_out) / (k3 * L)
    tr_matcher_k3 = 1 - sum(len(s) for s in segs[:k3]) / (k3 * L)
    # P3 output must be a re-bracketing of the input
    for z, t in zip(p3_out, texts):
        assert [x for e in z for x in (e if isinstance(e, tuple) else (e,))] == t

    # ---- reference check of longest-match semantics ------------------------------------------
    n_ref = B
    for b in range(n_ref):
        assert greedy_reference(texts[b], R, matcher.max_n) == segs[b], f"matcher != greedy reference on text {b}"
    print(f"verified: segment == segment_batch on {B} texts; == plain-Python greedy longest match on {n_ref} texts")

    # ---- report ------------------------------------------------------------------------------
    p3_tps = k3 * L / t_p3
    rows = [
        ("Pseudocode 3 (Python sets)", k3, k3 * L, t_p3, tr_p3),
        ("SpanMatcher.segment x B", B, n_tok, t_seg, tr_matcher),
        ("SpanMatcher.segment_batch", B, n_tok, t_batch, tr_matcher),
        ("  of which match_lengths", B, n_tok, t_ml, None),
    ]
    print(f"\n== segmentation throughput, one core, {n_rules:,} rules, texts of {L} tokens ==")
    hdr = f"{'method':<30}{'texts':>6}{'tokens':>9}{'seconds':>10}{'tokens/s':>14}{'vs P3':>9}{'TR':>8}"
    print(hdr)
    print("-" * len(hdr))
    res["results"] = []
    for name, nt, tok, sec, tr in rows:
        tps = tok / sec
        print(f"{name:<30}{nt:>6}{tok:>9,}{sec:>10.4f}{tps:>14,.0f}{tps / p3_tps:>8.0f}x"
              f"{'' if tr is None else f'{tr:.3f}':>8}")
        res["results"].append({"method": name.strip(), "texts": nt, "tokens": tok, "seconds": sec,
                               "tokens_per_s": tps, "speedup_vs_p3": tps / p3_tps, "token_reduction": tr})
    print(f"(TR of the matcher on the same {k3} texts as Pseudocode 3: {tr_matcher_k3:.3f}; "
          f"Pseudocode 3 per text: min {min(p3_times):.3f} s, mean {np.mean(p3_times):.3f} s, "
          f"max {max(p3_times):.3f} s)")
    best_tps = n_tok / min(t_seg, t_batch)
    print(f"goals: >= 100x vs Pseudocode 3: segment {n_tok / t_seg / p3_tps:.0f}x, "
          f"batch {n_tok / t_batch / p3_tps:.0f}x; "
          f">= 2M tokens/s on one core: best {best_tps / 1e6:.2f}M -> {'OK' if best_tps >= 2e6 else 'MISSED'}")
    res.update(p3_seconds_per_text=p3_times, p3_sets_seconds=t_sets, tr_p3=tr_p3, tr_matcher=tr_matcher,
               tr_matcher_same_texts=tr_matcher_k3)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
