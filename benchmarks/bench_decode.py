"""Decode throughput and KV-cache bytes: UMIM dynamic merging vs HF ``generate``, side by side.

For each (prompt length W_tok, new tokens N, batch B) it runs on the same model and prompts:

* HF ``model.generate`` (greedy, ``max_new_tokens=N``, ``min_new_tokens=N`` so every run decodes N),
* UMIM ``none`` (our loop without merging: the loop's own overhead),
* UMIM ``dynamic`` (prompt merging + online merging with KV rollback),

and prints tokens/s, the ratio to HF, the final KV-cache bytes, the TR reached, and the ideal
memory-bound speedup ``(Wb + K) / (Wb + (1 - TR) K)``, where Wb = bytes of weights read per step and
K = mean bytes of the unmerged KV cache read per step (B rows, prompt + N/2 tokens on average).
Decoding a 135M model on CPU is compute-bound rather than memory-bound, so the ideal is an upper
bound there; on a GPU with a large batch, K dominates and the ratio approaches the ideal.

Prompts are held-out Python-docs paragraphs (the embedded default's domain), concatenated and cut
to W_tok tokens; the merger and rules come from the default run (``runs/default``).

Usage::

    python benchmarks/bench_decode.py [--model embedded] [--run-dir runs/default]
        [--cases 128+64x1,128+64x8] [--repeat 4] [--json OUT]

The defaults finish in a few minutes on 2 CPU cores. Outputs are verified before any timing: ``none``
must decode HF ``generate``'s tokens (dynamic merging equals recomputing its merged sequence; the
test suite checks that). Each round runs the three methods in a rotated order, and the ratios
(speed of one method over another) are reported per round as min / median / max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from umim.inference import kv_cache
from umim.inference.generation import MergedLM, SamplingConfig
from umim.lm import LMSpec, output_cache
from umim.rules.corpus import load_documents


def _prompts(tok, n_tokens: int, batch: int) -> list[list[int]]:
    docs = load_documents("pydoc", "test") + load_documents("pydoc", "validation")
    ids = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens * batch:
        ids = ids * (n_tokens * batch // len(ids) + 1)
    return [ids[b * n_tokens : (b + 1) * n_tokens] for b in range(batch)]


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def run_case(m: MergedLM, w: int, n: int, batch: int, repeat: int = 4) -> dict:
    """One case: outputs verified first (``none`` decodes HF ``generate``'s tokens), then ``repeat``
    rounds that run the three methods in a rotated order (drift of a loaded machine hits each method
    in every position); the ratios are per round, reported as min / median / max."""
    lm, tok = m.lm, m.tokenizer
    prompts = _prompts(tok, w, batch)
    ids = torch.tensor(prompts, device=lm.device)
    cfg = SamplingConfig(max_new_tokens=n, eos_token_id=-1)  # never stop early: every run decodes n
    runs = {
        "hf": lambda: lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, return_dict_in_generate=True, pad_token_id=tok.eos_token_id),
        "none": lambda: m.generate(prompts, "none", cfg),
        "dynamic": lambda: m.generate(prompts, "dynamic", cfg),
    }
    hf_out, none = runs["hf"](), runs["none"]()
    if [r.generated_ids for r in none] != hf_out.sequences[:, w:].tolist():
        raise SystemExit(f"case {w}+{n}x{batch}: `none` did not decode HF generate's tokens; no timing")
    names, times, kv = list(runs), {k: [] for k in runs}, {}
    for r in range(repeat):
        for name in names[r % 3 :] + names[: r % 3]:
            out, t = _timed(runs[name])
            times[name].append(t)
            kv[name] = kv_cache.cache_bytes(output_cache(out) if name == "hf" else m.last_cache)
            if name == "dynamic":
                dyn = out

    def spread(a: str, b: str) -> list[float]:  # speed of a over b per round: t_b / t_a
        x = sorted(tb / ta for ta, tb in zip(times[a], times[b]))
        return [x[0], statistics.median(x), x[-1]]

    tr = 1 - sum(r.kv_len_final for r in dyn) / sum(r.kv_len_unmerged for r in dyn)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    per_token = kv["none"] / sum(r.kv_len_final for r in none)  # KV bytes per cached token (all layers)
    k_mean = per_token * batch * (w + n / 2)
    ideal = (weight_bytes + k_mean) / (weight_bytes + (1 - tr) * k_mean)
    tokens = batch * n
    return {
        "prompt_tokens": w, "new_tokens": n, "batch": batch, "rounds": repeat,
        **{f"{k}_tok_s": tokens / statistics.median(v) for k, v in times.items()},
        "none_vs_hf": spread("none", "hf"), "dynamic_vs_hf": spread("dynamic", "hf"),
        "dynamic_vs_none": spread("dynamic", "none"),
        "hf_kv_bytes": kv["hf"], "dynamic_kv_bytes": kv["dynamic"], "kv_ratio": kv["dynamic"] / kv["hf"],
        "tr": tr, "ideal_speedup": ideal, "weight_bytes": weight_bytes, "mean_unmerged_kv_bytes": k_mean,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--run-dir", default="runs/default")
    ap.add_argument("--cases", default="128+64x1,128+64x8", help="comma list of PROMPT+NEWxBATCH")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=4, help="rounds, each in a rotated order of the methods")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    m = MergedLM.load(LMSpec(a.model, dtype=a.dtype), run_dir=a.run_dir)
    if torch.cuda.is_available():
        m = MergedLM(m.lm.cuda(), m.tokenizer, m.merger, m.rules)
    m.generate("warm up", "dynamic", SamplingConfig(max_new_tokens=4))
    rows = []
    print(f"{'case':<14}{'HF tok/s':>9}{'none':>7}{'dyn':>7}  {'none/HF min-med-max':<21}"
          f"{'dyn/HF min-med-max':<21}{'dyn/none min-med-max':<22}{'TR %':>6}{'ideal':>7}{'KV ratio':>9}")
    for case in a.cases.split(","):
        wn, b = case.split("x")
        w, n = map(int, wn.split("+"))
        r = run_case(m, w, n, int(b), a.repeat)
        rows.append(r)
        fmt = "{:.3f}/{:.3f}/{:.3f}".format
        print(f"{case:<14}{r['hf_tok_s']:>9.1f}{r['none_tok_s']:>7.1f}{r['dynamic_tok_s']:>7.1f}  "
              f"{fmt(*r['none_vs_hf']):<21}{fmt(*r['dynamic_vs_hf']):<21}{fmt(*r['dynamic_vs_none']):<22}"
              f"{100 * r['tr']:>6.1f}{r['ideal_speedup']:>7.3f}{r['kv_ratio']:>9.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": str(m.lm.device), "threads": torch.get_num_threads(), "cases": rows}, f, indent=2)


if __name__ == "__main__":
    main()
