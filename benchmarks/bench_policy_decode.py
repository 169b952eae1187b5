"""KV-policy decoding (StreamingLLM, H2O) row by row vs batched, side by side.

For each policy, the same N prompts of different lengths (random token ids) are decoded under the
``prompt`` budget schedule at target TR ``--ratio`` (what the matched-TR runners use) two ways:

* ``rows``: one :func:`~umim_eval.scoring.policy_generate.policy_generate_batch` call per prompt
  (a batch of one: how the runners decoded before batching),
* ``batched``: ``--batch`` prompts per call (left-padded, each row evicting to its own budget).

Outputs are verified first (every row's tokens, cache size and stop reason must be equal, else no
timing). Then ``--repeat`` rounds run the two in alternating order (drift of a loaded machine hits
both in every position); the speed ratio ``t_rows / t_batched`` is per round, reported as
min / median / max, next to rows/s of each.

The model is a random Llama built from a config (``--model tiny-llama``: 4 layers, hidden 256, GQA
8/4 heads) or the embedded SmolLM2-135M (``--model embedded``). Both run with eager attention (H2O
reads attention weights; StreamingLLM runs eager too so the two compare on one kernel).

Usage::

    python benchmarks/bench_policy_decode.py [--model tiny-llama] [--n 16] [--batch 8] [--new 32]
        [--ratio 0.5] [--repeat 3] [--threads 1] [--json OUT]

The defaults take about two minutes on one loaded CPU core.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from bench_decode import timed  # benchmarks/ is this script's folder

from umim.inference.generation import SamplingConfig
from umim.safe_io import write_text_atomic
from umim_eval.methods import H2O, StreamingLLM
from umim_eval.scoring.policy_generate import policy_generate_batch


def load_lm(name: str):
    if name == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                          tie_word_embeddings=True, attn_implementation="eager")
        return LlamaForCausalLM(cfg).eval()
    from umim.inference.loading import ModelArgs

    lm = ModelArgs(lm=name).load().lm
    lm.set_attn_implementation("eager")
    return lm


def run_policy(lm, cls, prompts: list[list[int]], batch: int, ratio: float, cfg: SamplingConfig,
               repeat: int) -> dict:
    runs = {
        "rows": lambda: [policy_generate_batch(lm, [p], cls(ratio), cfg, schedule="prompt")[0] for p in prompts],
        "batched": lambda: [r for k in range(0, len(prompts), batch)
                            for r in policy_generate_batch(lm, prompts[k : k + batch], cls(ratio), cfg,
                                                           schedule="prompt")],
    }
    got = {k: [(r.generated_ids, r.cache_len, r.stop_reason) for r in f()] for k, f in runs.items()}
    if got["rows"] != got["batched"]:
        bad = sum(a != b for a, b in zip(got["rows"], got["batched"]))
        raise SystemExit(f"{cls.name}: {bad} of {len(prompts)} rows differ between row-by-row and batched; no timing")
    times = {k: [] for k in runs}
    for r in range(repeat):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[name].append(timed(runs[name])[1])
    ratios = sorted(tr / tb for tr, tb in zip(times["rows"], times["batched"]))
    return {"policy": cls.name, **{f"{k}_rows_per_s": len(prompts) / statistics.median(v) for k, v in times.items()},
            "speedup": [ratios[0], statistics.median(ratios), ratios[-1]], "rounds": repeat,
            "tr": sum(len(p) + len(g) + (s == "eos") - c for p, (g, c, s) in zip(prompts, got["rows"]))
            / sum(map(len, prompts))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama", help="tiny-llama (random, from a config) or an LM spec")
    ap.add_argument("--n", type=int, default=16, help="prompts")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--min-len", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=160)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3, help="rounds, alternating the order of the two")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: a tiny model gains nothing from more, and they spin-wait on a busy machine)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if min(a.n, a.batch, a.new, a.repeat, a.min_len, a.threads) < 1 or a.max_len < a.min_len:
        raise SystemExit("--n, --batch, --new, --repeat, --min-len, --threads must be >= 1 and --max-len >= --min-len")

    torch.set_num_threads(a.threads)
    lm = load_lm(a.model)
    if torch.cuda.is_available():
        lm = lm.cuda()
    g = torch.Generator().manual_seed(0)
    V = lm.get_input_embeddings().num_embeddings
    lens = torch.randint(a.min_len, a.max_len + 1, (a.n,), generator=g).tolist()
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]
    cfg = SamplingConfig(max_new_tokens=a.new, eos_token_id=None)
    fmt = "{:.2f}/{:.2f}/{:.2f}".format
    print(f"model {a.model}, {a.n} prompts of {min(lens)}-{max(lens)} tokens, {a.new} new, batch {a.batch}, "
          f"ratio {a.ratio}, threads {torch.get_num_threads()}, device {lm.device}")
    print(f"{'policy':<15}{'rows/s per-row':>15}{'rows/s batched':>15}  {'speedup min/med/max':<20}{'TR':>6}")
    out = []
    for cls in (StreamingLLM, H2O):
        r = run_policy(lm, cls, prompts, a.batch, a.ratio, cfg, a.repeat)
        out.append(r)
        print(f"{r['policy']:<15}{r['rows_rows_per_s']:>15.2f}{r['batched_rows_per_s']:>15.2f}  "
              f"{fmt(*r['speedup']):<20}{r['tr']:>6.3f}", flush=True)
    if a.json:
        write_text_atomic(a.json, json.dumps({"args": vars(a), "device": str(lm.device),
                                              "threads": torch.get_num_threads(), "policies": out}, indent=2))


if __name__ == "__main__":
    main()
