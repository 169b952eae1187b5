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
        [--cases 256+256x1,256+256x8] [--repeat 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from umim import kv_cache
from umim.inference.generation import MergedLM, SamplingConfig
from umim.lm import LMSpec
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


def run_case(m: MergedLM, w: int, n: int, batch: int, repeat: int = 1) -> dict:
    lm, tok = m.lm, m.tokenizer
    prompts = _prompts(tok, w, batch)
    ids = torch.tensor(prompts, device=lm.device)
    cfg = SamplingConfig(max_new_tokens=n, eos_token_id=-1)  # never stop early: every run decodes n
    t_hf = t_none = t_dyn = float("inf")
    for _ in range(repeat):  # interleaved, best of `repeat`: machine noise hits all three alike
        hf_out, t = _timed(lambda: lm.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            return_dict_in_generate=True, pad_token_id=tok.eos_token_id))
        t_hf, hf_kv = min(t_hf, t), kv_cache.cache_bytes(hf_out.past_key_values)
        none, t = _timed(lambda: m.generate(prompts, "none", cfg))
        t_none, none_kv = min(t_none, t), kv_cache.cache_bytes(m.last_cache)
        dyn, t = _timed(lambda: m.generate(prompts, "dynamic", cfg))
        t_dyn, dyn_kv = min(t_dyn, t), kv_cache.cache_bytes(m.last_cache)

    tr = 1 - sum(r.kv_len_final for r in dyn) / sum(r.kv_len_unmerged for r in dyn)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    per_token = none_kv / sum(r.kv_len_final for r in none)  # KV bytes per cached token (all layers)
    k_mean = per_token * batch * (w + n / 2)
    ideal = (weight_bytes + k_mean) / (weight_bytes + (1 - tr) * k_mean)
    tokens = batch * n
    return {
        "prompt_tokens": w, "new_tokens": n, "batch": batch,
        "hf_tok_s": tokens / t_hf, "none_tok_s": tokens / t_none, "dynamic_tok_s": tokens / t_dyn,
        "none_vs_hf": t_hf / t_none, "dynamic_vs_hf": t_hf / t_dyn,
        "hf_kv_bytes": hf_kv, "dynamic_kv_bytes": dyn_kv, "kv_ratio": dyn_kv / hf_kv,
        "tr": tr, "ideal_speedup": ideal, "weight_bytes": weight_bytes, "mean_unmerged_kv_bytes": k_mean,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--run-dir", default="runs/default")
    ap.add_argument("--cases", default="256+256x1,256+256x8", help="comma list of PROMPT+NEWxBATCH")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions, best time kept")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    m = MergedLM.load(LMSpec(a.model, dtype=a.dtype), run_dir=a.run_dir)
    if torch.cuda.is_available():
        m = MergedLM(m.lm.cuda(), m.tokenizer, m.merger, m.rules)
    m.generate("warm up", "dynamic", SamplingConfig(max_new_tokens=4))
    rows = []
    print(f"{'case':<16}{'HF tok/s':>10}{'none':>9}{'dynamic':>9}{'dyn/HF':>8}{'ideal':>7}{'TR %':>7}"
          f"{'KV HF MB':>10}{'KV dyn MB':>10}{'KV ratio':>9}")
    for case in a.cases.split(","):
        wn, b = case.split("x")
        w, n = map(int, wn.split("+"))
        r = run_case(m, w, n, int(b), a.repeat)
        rows.append(r)
        print(f"{case:<16}{r['hf_tok_s']:>10.1f}{r['none_tok_s']:>9.1f}{r['dynamic_tok_s']:>9.1f}"
              f"{r['dynamic_vs_hf']:>8.3f}{r['ideal_speedup']:>7.3f}{100 * r['tr']:>7.1f}"
              f"{r['hf_kv_bytes'] / 2**20:>10.1f}{r['dynamic_kv_bytes'] / 2**20:>10.1f}{r['kv_ratio']:>9.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": str(m.lm.device), "threads": torch.get_num_threads(), "cases": rows}, f, indent=2)


if __name__ == "__main__":
    main()
