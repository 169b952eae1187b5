"""Decode throughput, KV-cache bytes and time to first token: UMIM merging vs HF, side by side.

For each (prompt length W_tok, new tokens N, batch B) it runs on the same model and prompts:

* HF ``model.generate`` (greedy, ``max_new_tokens=N``, ``min_new_tokens=N`` so every run decodes N),
* UMIM ``none`` (our loop without merging: the loop's own overhead),
* UMIM ``dynamic`` (prompt merging + online merging with KV rollback),

and prints tokens/s, the ratio to HF, the final KV-cache bytes (allocated storage: for ``dynamic``
the ragged pool after the decode; ``peak`` is its largest allocation during the decode) over HF's,
next to ``1 - TR``, the TR reached, and the ideal memory-bound speedup
``(Wb + K) / (Wb + (1 - TR) K)``, where Wb = bytes of weights read per step and
K = mean bytes of the unmerged KV cache read per step (B rows, prompt + N/2 tokens on average).
Decoding a 135M model on CPU is compute-bound rather than memory-bound, so the ideal is an upper
bound there; on a GPU with a large batch, K dominates and the ratio approaches the ideal.

Time to first token (TTFT), per case: the merged prompt (matcher + merger + prefill forward, all
included: :meth:`MergedLM.prefill`) vs the unmerged prefill (one forward of the token ids, as HF
``generate`` starts). Verified first: the merged prefill's greedy token is the dynamic decode's first
token, the unmerged one HF ``generate``'s. Ratio = t_unmerged / t_merged per round (alternating
order), against the goal ``0.9 / (1 - TR_prompt)``.

TTFT-only cases (``--ttft-cases``, PROMPTxBATCH: longer prompts, no decode): the same timing
(:func:`ttft`), verified first: the unmerged prefill's greedy token must be HF ``generate``'s first
token (``max_new_tokens=1``), the merged prefill's the greedy token of one plain forward over each
row's merged sequence (built by ``MergedLM.segment_embeds``, as the timed path is: no cache, no
padding, no ragged KV; the test suite checks the surrogates themselves).

Prompts are held-out Python-docs paragraphs (the embedded default's domain), concatenated and cut
to W_tok tokens; the merger and rules come from the default run (``runs/default``).

Usage::

    python benchmarks/bench_decode.py [--model embedded] [--run-dir runs/default]
        [--cases 128+64x1,128+64x8] [--ttft-cases 512x1,1024x1] [--repeat 4] [--threads N] [--json OUT]
    python benchmarks/bench_decode.py --cases 128+64x32 --repeat 2   # batch 32
    python benchmarks/bench_decode.py --cases "" --ttft-cases 512x1,512x8   # time to first token only
    python benchmarks/bench_decode.py --threads 1   # steadier ratios on a shared machine

The defaults (two decode cases, two TTFT-only cases) finish in a few minutes on 2 CPU cores.
Outputs are verified before any timing: ``none`` must decode HF ``generate``'s tokens (dynamic
merging equals recomputing its merged sequence; the test suite checks that). Each round runs the
methods in a rotated order, and the ratios (speed of one method over another) are reported per
round as min / median / max.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import torch

from umim.inference import kv_cache
from umim.inference.generation import MergedLM, SamplingConfig
from umim.lm import LMSpec, output_cache
from umim.rules.corpus import load_documents
from umim.safe_io import write_text_atomic


def _prompts(tok, n_tokens: int, batch: int) -> list[list[int]]:
    docs = load_documents("pydoc", "test") + load_documents("pydoc", "validation")
    ids = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens * batch:
        ids = ids * (n_tokens * batch // len(ids) + 1)
    return [ids[b * n_tokens : (b + 1) * n_tokens] for b in range(batch)]


def timed(fn):
    """``(fn(), seconds)``, with the device synchronized around the call."""
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
            out, t = timed(runs[name])
            times[name].append(t)
            kv[name] = kv_cache.cache_bytes(output_cache(out) if name == "hf" else m.last_cache)
            if name == "dynamic":
                dyn, peak = out, (m.last_cache.peak + 1) * m.last_cache.slot_bytes()

    def spread(a: str, b: str) -> list[float]:  # speed of a over b per round: t_b / t_a
        x = sorted(tb / ta for ta, tb in zip(times[a], times[b]))
        return [x[0], statistics.median(x), x[-1]]

    tr = 1 - sum(r.kv_len_final for r in dyn) / sum(r.kv_len_unmerged for r in dyn)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    per_token = kv["none"] / sum(r.kv_len_final + 1 for r in none)  # KV bytes per cached token (+1: scratch slot)
    k_mean = per_token * batch * (w + n / 2)
    ideal = (weight_bytes + k_mean) / (weight_bytes + (1 - tr) * k_mean)
    tokens = batch * n
    return {
        "prompt_tokens": w, "new_tokens": n, "batch": batch, "rounds": repeat,
        **{f"{k}_tok_s": tokens / statistics.median(v) for k, v in times.items()},
        "none_vs_hf": spread("none", "hf"), "dynamic_vs_hf": spread("dynamic", "hf"),
        "dynamic_vs_none": spread("dynamic", "none"),
        "hf_kv_bytes": kv["hf"], "dynamic_kv_bytes": kv["dynamic"], "kv_ratio": kv["dynamic"] / kv["hf"],
        "dynamic_peak_kv_bytes": peak, "peak_kv_ratio": peak / kv["hf"],
        "tr": tr, "ideal_speedup": ideal, "weight_bytes": weight_bytes, "mean_unmerged_kv_bytes": k_mean,
        **ttft(m, prompts, hf_out.sequences[:, w].tolist(), [r.generated_ids[0] for r in dyn], repeat),
    }


def cold(m: MergedLM) -> MergedLM:
    """``m`` without its cache of surrogates, so a timed prefill includes the merger's work."""
    m._surrogates.clear()
    return m


def ttft(m: MergedLM, prompts: list[list[int]], hf_first: list[int], dyn_first: list[int], repeat: int) -> dict:
    """Time to first token, merged (matcher + merger + prefill) vs unmerged prefill, verified first
    (the unmerged prefill's greedy tokens [B] must be ``hf_first``, the merged one's ``dyn_first``);
    ``repeat`` rounds in alternating order."""
    lm = m.lm
    ids = torch.tensor(prompts, device=lm.device)
    runs = {
        "unmerged": lambda: lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                               logits_to_keep=1).logits[:, -1].argmax(-1),
        "merged": lambda: cold(m).prefill(prompts, "dynamic")[0].argmax(-1),
    }
    with torch.no_grad():
        if runs["unmerged"]().tolist() != hf_first or runs["merged"]().tolist() != dyn_first:
            raise SystemExit("time to first token: a prefill's first token differs from its reference's; no timing")
        times = {k: [] for k in runs}
        for r in range(repeat):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                times[name].append(timed(runs[name])[1])
    ratios = sorted(tu / tm for tu, tm in zip(times["unmerged"], times["merged"]))
    merged_len = sum(len(m.rules.segment(p)) for p in prompts)
    tr_prompt = 1 - merged_len / sum(map(len, prompts))
    return {"ttft_unmerged_s": statistics.median(times["unmerged"]),
            "ttft_merged_s": statistics.median(times["merged"]),
            "ttft_ratio": [ratios[0], statistics.median(ratios), ratios[-1]], "tr_prompt": tr_prompt,
            "ttft_goal": 0.9 / (1 - tr_prompt)}


def reference_first_tokens(m: MergedLM, prompts: list[list[int]]) -> tuple[list[int], list[int]]:
    """[B] first new tokens of ``prompts`` by paths :func:`ttft` does not time: HF ``generate``
    (greedy, ``max_new_tokens=1``) on the token ids, and one plain forward per row over its merged
    sequence (the rules' segmentation, surrogates from the merger; no cache, no padding)."""
    lm, tok = m.lm, m.tokenizer
    ids = torch.tensor(prompts, device=lm.device)
    hf = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                     pad_token_id=tok.eos_token_id)[:, -1].tolist()
    with torch.no_grad():
        merged = [int(lm(inputs_embeds=m.segment_embeds(p, m.rules.segment(p))[None], use_cache=False,
                         logits_to_keep=1).logits[0, -1].argmax()) for p in prompts]
    return hf, merged


def ttft_case(m: MergedLM, w: int, batch: int, repeat: int = 4) -> dict:
    """A TTFT-only case: ``batch`` held-out prompts of ``w`` tokens, no decode; see :func:`ttft`."""
    prompts = _prompts(m.tokenizer, w, batch)
    hf_first, merged_first = reference_first_tokens(m, prompts)
    return {"prompt_tokens": w, "batch": batch, "rounds": repeat, **ttft(m, prompts, hf_first, merged_first, repeat)}


def parse_cases(text: str, option: str, example: str) -> list[tuple[str, list[int]]]:
    """``(case, numbers)`` of each item of a comma list of cases in the form of ``example`` (e.g.
    ``128+64x8``: numbers separated as there); an empty list is allowed."""
    form = re.sub(r"\d+", r"(\\d+)", re.escape(example))
    out = []
    for case in filter(None, (c.strip() for c in text.split(","))):
        match = re.fullmatch(form, case)
        if not match or not all(int(n) > 0 for n in match.groups()):
            raise SystemExit(f"{option} {case!r}: give positive numbers in the form {example}")
        out.append((case, [int(n) for n in match.groups()]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--run-dir", default="runs/default")
    ap.add_argument("--cases", default="128+64x1,128+64x8", help="comma list of PROMPT+NEWxBATCH (may be empty)")
    ap.add_argument("--ttft-cases", default="512x1,1024x1",
                    help="comma list of PROMPTxBATCH: time to first token only, no decode (may be empty)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=4, help="rounds, each in a rotated order of the methods")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 keeps a shared machine's load from stalling "
                         "the threads' barriers, so ratios measured there are steadier")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads is not None:
        if a.threads < 1:
            raise SystemExit(f"--threads {a.threads}: give a positive number of threads")
        torch.set_num_threads(a.threads)
    cases = parse_cases(a.cases, "--cases", "128+64x8")
    ttft_cases = parse_cases(a.ttft_cases, "--ttft-cases", "512x8")

    m = MergedLM.load(LMSpec(a.model, dtype=a.dtype), run_dir=a.run_dir)
    if torch.cuda.is_available():
        m = MergedLM(m.lm.cuda(), m.tokenizer, m.merger, m.rules)
    m.generate("warm up", "dynamic", SamplingConfig(max_new_tokens=4))
    rows, ttft_rows = [], []
    fmt = "{:.3f}/{:.3f}/{:.3f}".format
    if cases:
        print(f"{'case':<14}{'HF tok/s':>9}{'none':>7}{'dyn':>7}  {'none/HF min-med-max':<21}"
              f"{'dyn/HF min-med-max':<21}{'dyn/none min-med-max':<22}{'TR %':>6}{'ideal':>7}{'KV ratio':>9}"
              f"{'1-TR':>7}{'peak':>7}  {'TTFT unm/merged min-med-max':<29}{'goal':>6}{'TR_p %':>7}", flush=True)
    for case, (w, n, b) in cases:
        r = run_case(m, w, n, b, a.repeat)
        rows.append(r)
        print(f"{case:<14}{r['hf_tok_s']:>9.1f}{r['none_tok_s']:>7.1f}{r['dynamic_tok_s']:>7.1f}  "
              f"{fmt(*r['none_vs_hf']):<21}{fmt(*r['dynamic_vs_hf']):<21}{fmt(*r['dynamic_vs_none']):<22}"
              f"{100 * r['tr']:>6.1f}{r['ideal_speedup']:>7.3f}{r['kv_ratio']:>9.3f}{1 - r['tr']:>7.3f}"
              f"{r['peak_kv_ratio']:>7.3f}  {fmt(*r['ttft_ratio']):<29}{r['ttft_goal']:>6.3f}"
              f"{100 * r['tr_prompt']:>7.1f}", flush=True)
    if ttft_cases:
        print(f"{'TTFT case':<14}{'unmerged s':>11}{'merged s':>10}  {'TTFT unm/merged min-med-max':<29}"
              f"{'goal':>6}{'TR_p %':>7}", flush=True)
    for case, (w, b) in ttft_cases:
        r = ttft_case(m, w, b, a.repeat)
        ttft_rows.append(r)
        print(f"{case:<14}{r['ttft_unmerged_s']:>11.3f}{r['ttft_merged_s']:>10.3f}  {fmt(*r['ttft_ratio']):<29}"
              f"{r['ttft_goal']:>6.3f}{100 * r['tr_prompt']:>7.1f}", flush=True)
    if a.json:
        write_text_atomic(a.json, json.dumps({"device": str(m.lm.device), "threads": torch.get_num_threads(),
                                              "cases": rows, "ttft_cases": ttft_rows}, indent=2))


if __name__ == "__main__":
    main()
