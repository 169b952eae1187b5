"""GPU decode benchmark: UMIM dynamic merging vs HF ``generate`` vs the memory-bound ideal (one GPU,
no downloads, about 5 minutes on an H200).

Everything is built in-process: a random-weight model with Llama-3.2-1B's configuration (d 2048,
16 layers, GQA 32/8 heads, vocab 128,256, tied embeddings), a word-level tokenizer naming every id,
a rule set of 2-, 3- and 4-grams, and an untrained merge module. Random weights make mined rules
fire at no controlled rate, so the token stream is *forced*: each row's prompt and its new tokens
are fixed sequences in which rule n-grams sit at a fixed schedule, so merging saves ``--tr`` of the
positions (4-grams save 3 each, one 2- or 3-gram takes the remainder). Every rule token belongs to
one rule only and filler tokens to none, so merging fires exactly at the planted n-grams. Each row's
schedule has its own phase, so rows merge at different steps (rows of different lengths in a batch).

Methods, per batch size, on the same model and prompts:

* ``hf``: HF ``model.generate`` (greedy, a logits processor forcing the scheduled token each step),
* ``none``: UMIM's decode loop without merging (the loop's own overhead),
* ``dynamic``: UMIM prompt merging + online merging with KV rollback.

UMIM's loop applies ``SamplingConfig.processors()`` before its argmax, so :class:`ForcedSampling`
(a ``SamplingConfig`` subclass defined here) hands it the same forcing processor; ``umim`` itself is
not changed. Every timed run is verified: the emitted tokens must equal the forced stream for all
three methods, and each dynamic row's final KV length must equal the schedule's (1 - TR) share.

Timing: ``--warmup`` full-length rounds run first, verified but not timed (kernel and attention-plan
choices are made once per new KV length: a first round on an H200 took 4x the second). Then the
methods run in a rotated order per round. Each run is split at the first forced token
(a device sync there): what precedes is the prefill, what follows is decoding, and the decode rate
(B tokens per forward step) is compared with the memory-bound ideal of one step,
``(weight bytes + mean KV bytes read per step) / bandwidth``, the bandwidth measured by a large
device-to-device copy (bytes read + written). The KV bytes read per step are the unmerged cache's
for ``hf``/``none`` and the merged cache's for ``dynamic`` (each row's own entries, no padding or
copies: the ideal). Weight bytes count the tied embedding once (the LM head reads it each step).

Output: one ``GPUDECODE {json}`` line per batch size, then a table; ``--json`` also writes them.
``--max-seconds`` guards the total, model building included: a case runs a second round only when
it and the warm-up and first round of every later case (guessed as long) still fit, and a case whose
warm-up and first round would not fit is skipped, each with a message. A case whose run fails
verification prints why and gives no figures; the others still run, and the exit code is 1.

    python benchmarks/gpu_decode.py [--batch 32,1] [--prompt 2000] [--new 2000] [--tr 0.35]
        [--dtype bfloat16] [--device cuda] [--warmup 1] [--repeat 2] [--max-seconds 270] [--json OUT]
    python benchmarks/gpu_decode.py --tiny --device cpu --dtype float32 --prompt 64 --new 32 --batch 1,3
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):  # run as a script where umim is not installed; loaded by file in tests
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from umim.errors import UserError, cli_entry  # noqa: E402
from umim.fingerprint import tokenizer_fingerprint  # noqa: E402
from umim.inference import kv_cache  # noqa: E402
from umim.inference.generation import MergedLM, SamplingConfig  # noqa: E402
from umim.lm import output_cache  # noqa: E402
from umim.merging.merger import MergeModule, MergerConfig  # noqa: E402
from umim.rules.store import MergeRules  # noqa: E402
from umim.safe_io import write_text_atomic  # noqa: E402

METHODS = ("hf", "none", "dynamic")
RULE_NS = (2, 3, 4)


# -- model, tokenizer, rules, merger ---------------------------------------------------------------
def build_lm(tiny: bool, context: int, dtype: torch.dtype, device: str):
    """A seeded random-weight Llama: Llama-3.2-1B's configuration, or a 2-layer d-64 one with ``tiny``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             max_position_embeddings=max(256, context), tie_word_embeddings=True,
                             bos_token_id=1, eos_token_id=2)
    else:
        from gpu_check import llama32_1b_config  # the training check's model: one definition

        config = llama32_1b_config()
    if context > config.max_position_embeddings:
        raise UserError(f"--prompt + --new = {context} positions exceed the model's {config.max_position_embeddings}")
    torch.manual_seed(0)
    with torch.device(device):
        lm = LlamaForCausalLM(config)
    return lm.to(dtype).eval()


def build_tokenizer(vocab_size: int, bos: int, eos: int):
    """A word-level tokenizer with one entry per id (``t<id>``), so every forced id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {0: "<unk>", bos: "<bos>", eos: "<eos>"}
    vocab = {names.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<eos>")
    fast.name_or_path = f"gpu-decode-wordlevel-{vocab_size}"
    return fast


def build_rules(rng: np.random.Generator, usable: np.ndarray, per_n: int, fp: dict
                ) -> tuple[MergeRules, np.ndarray]:
    """``per_n`` rules of each n in ``RULE_NS`` over distinct ids of ``usable`` (each rule token in ONE
    rule), and the ids left over as fillers [F] (in no rule, so they never complete one)."""
    need = per_n * sum(RULE_NS)
    if need + 64 > len(usable):  # the rest are fillers: keep some
        raise UserError(f"--rules-per-n {per_n} needs {need} distinct ids + 64 fillers; the vocabulary has "
                        f"{len(usable)} usable: give fewer rules")
    ids = rng.permutation(usable)
    grams, at = {}, 0
    for n in RULE_NS:
        grams[n], at = ids[at : at + per_n * n].reshape(per_n, n), at + per_n * n
    counts = {n: np.full(per_n, 100, dtype=np.int64) for n in RULE_NS}
    rules = MergeRules(ngrams=grams, counts=counts, tokenizer=fp, min_count=100, n_range=(min(RULE_NS), max(RULE_NS)),
                       corpus="gpu_decode: planted rules")
    return rules, np.sort(ids[at:])


# -- the forced token streams ----------------------------------------------------------------------
@dataclass
class Stream:
    """Rows of a forced sequence with rule n-grams at a fixed schedule."""

    ids: np.ndarray
    """[B, L] token ids."""
    saved: np.ndarray
    """[B, L] positions saved by the n-gram ending at each index (n - 1 there, 0 elsewhere)."""


def plant(rng: np.random.Generator, rules: MergeRules, fillers: np.ndarray, rows: int, length: int, tr: float,
          what: str = "--new") -> Stream:
    """``rows`` sequences of ``length`` filler tokens with rule n-grams planted so that merging saves
    ``round(tr * length)`` positions per row: as many 4-grams as fit the count, one 2- or 3-gram for
    the remainder. Gram g of row b starts at ``floor(g * L / G + phase_b)``; the phases spread the rows'
    merges over the gap between grams. ``what`` names the length's option in errors."""
    save = round(tr * length)
    ns = [4] * (save // 3) + ([save % 3 + 1] if save % 3 else [])
    G = len(ns)
    if G == 0 or 4 * G > length:
        raise UserError(f"{what} {length}: too short to plant --tr {tr} of rule n-grams at 4 tokens apart; "
                        "give more tokens")
    spacing = length / G
    ids = rng.choice(fillers, size=(rows, length))
    saved = np.zeros((rows, length), dtype=np.int64)
    for b in range(rows):  # setup only: G grams per row
        starts = np.floor(np.arange(G) * spacing + b / rows * (spacing - 4)).astype(np.int64)
        for s, n in zip(starts, rng.permutation(ns)):
            ids[b, s : s + n] = rules.ngrams[n][rng.integers(len(rules.ngrams[n]))]
            saved[b, s + n - 1] = n - 1
    return Stream(ids, saved)


class ForceTokens(LogitsProcessor):
    """Makes greedy decoding emit ``tokens`` [B, N]: call t keeps only ``tokens[:, t]``. The first call
    (right after the prefill) syncs the device and records the time, splitting prefill from decode."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.step, self.t_first = tokens, 0, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.step == 0:
            _sync(scores.device)
            self.t_first = time.perf_counter()
        forced = self.tokens[:, self.step, None]  # [B, 1]
        self.step += 1
        return torch.full_like(scores, float("-inf")).scatter_(1, forced, 0.0)


@dataclass
class ForcedSampling(SamplingConfig):
    """Greedy UMIM decoding that emits ``force``'s tokens (UMIM's picker applies ``processors()``)."""

    force: ForceTokens | None = None

    def processors(self) -> LogitsProcessorList:
        return LogitsProcessorList([self.force])


# -- runs ------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Run:
    """One timed run's figures and outputs."""

    seconds: float
    decode_seconds: float
    steps: int
    """Forward steps after the first forced token (decoding proper)."""
    tokens: list[list[int]]
    kv_bytes: int
    kv_slots: int
    kv_len_final: list[int] | None
    peak_bytes: int | None


def run_method(m: MergedLM, method: str, prompts: np.ndarray, forced: np.ndarray) -> Run:
    """One timed run of ``method`` on ``prompts`` [B, W] that must emit ``forced`` [B, N]."""
    lm, dev = m.lm, m.lm.device
    force = ForceTokens(torch.as_tensor(forced, device=dev))
    n = forced.shape[1]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()
    if method == "hf":
        ids = torch.as_tensor(prompts, device=dev)
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, logits_processor=LogitsProcessorList([force]),
                          return_dict_in_generate=True, pad_token_id=m.tokenizer.eos_token_id)
        _sync(dev)
        t1 = time.perf_counter()
        cache, tokens, kv_final, steps = output_cache(out), out.sequences[:, prompts.shape[1]:].tolist(), None, n - 1
    else:
        cfg = ForcedSampling(max_new_tokens=n, eos_token_id=-1, force=force)  # EOS -1: never stop early
        res = m.generate(prompts.tolist(), method, cfg)
        _sync(dev)
        t1 = time.perf_counter()
        # UMIM feeds the last token too, so the final cache holds the whole text: n forwards after the first pick
        cache, tokens, kv_final, steps = m.last_cache, [r.generated_ids for r in res], [r.kv_len_final for r in res], n
        m.last_cache = None  # free the cache before the next run: peaks are per run
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    t_first = t0 if force.t_first is None else force.t_first  # None: the processor never ran (verify() says so)
    return Run(t1 - t0, t1 - t_first, steps, tokens, kv_cache.cache_bytes(cache), kv_cache.cache_length(cache),
               kv_final, peak)


class VerifyError(Exception):
    """A run's output is not the forced one: the case reports no figures."""


def verify(method: str, run: Run, forced: np.ndarray, expected_kv: np.ndarray) -> None:
    """Raise :class:`VerifyError` when ``run`` did not emit the forced stream [B, N], or a dynamic row's
    final KV length is not the schedule's ``expected_kv`` [B]."""
    if run.tokens != forced.tolist():
        bad = next(b for b, row in enumerate(forced.tolist()) if run.tokens[b] != row)
        raise VerifyError(f"{method} did not emit the forced tokens (row {bad} first)")
    if method == "dynamic" and run.kv_len_final != expected_kv.tolist():
        raise VerifyError(f"dynamic's final KV lengths {run.kv_len_final[:4]}... differ from the schedule's "
                          f"{expected_kv[:4].tolist()}...")


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted), best of 5 after a warm-up."""
    nbytes = 2 * 2**30 if device.type == "cuda" else 64 * 2**20
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = math.inf
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    del x, y
    return 2 * nbytes / best


# -- one batch size --------------------------------------------------------------------------------
def run_case(m: MergedLM, rules: MergeRules, fillers: np.ndarray, a, batch: int, bandwidth: float,
             deadline: float, later_cases: int) -> dict:
    """Verified, timed rounds of the three methods for ``batch`` rows: at least one, more while they and
    a first round of each of the ``later_cases`` (guessed as long as this case's) fit before ``deadline``.
    Raises :class:`VerifyError` when a run's output is not the forced one."""
    rng = np.random.default_rng(a.seed + batch)
    prompt = plant(rng, rules, fillers, batch, a.prompt, a.tr, "--prompt")
    new = plant(rng, rules, fillers, batch, a.new, a.tr, "--new")
    saved_prompt, saved_new = prompt.saved.sum(1), new.saved.sum(1)
    expected_kv = a.prompt + a.new - saved_prompt - saved_new  # [B]
    # warm-up rounds at full length, verified, not timed: kernels are chosen (and on an H200 the attention
    # plans built) once per new KV length, which made a first round 4x slower there (82 s vs 21 s)
    runs: dict[str, list[Run]] = {k: [] for k in METHODS}
    round_seconds, warm_seconds = [], []
    for r in range(a.warmup + a.repeat):
        timed = r >= a.warmup
        # another round here, then a warm-up and a round for each later case (guessed as long as this one's)
        if (timed and round_seconds and time.perf_counter() + statistics.mean(round_seconds)
                + later_cases * (sum(warm_seconds) + statistics.mean(round_seconds)) > deadline):
            print(f"gpu_decode: batch {batch}: {len(round_seconds)} round(s) of {a.repeat}, the rest would pass "
                  "--max-seconds", flush=True)
            break
        t_round = time.perf_counter()
        for method in METHODS[r % 3 :] + METHODS[: r % 3]:  # rotated: drift hits each method in every position
            run = run_method(m, method, prompt.ids, new.ids)
            verify(method, run, new.ids, expected_kv)
            if timed:
                runs[method].append(run)
        (round_seconds if timed else warm_seconds).append(time.perf_counter() - t_round)
    return figures(m, runs, batch, a, bandwidth, prompt, new, expected_kv, round_seconds, warm_seconds)


def figures(m: MergedLM, runs: dict[str, list[Run]], batch: int, a, bandwidth: float, prompt: Stream, new: Stream,
            expected_kv: np.ndarray, round_seconds: list[float], warm_seconds: list[float]) -> dict:
    """The case's JSON record (medians over rounds; per-round ratios as min / median / max)."""
    W, N = a.prompt, a.new
    decode = {k: [batch * x.steps / x.decode_seconds for x in v] for k, v in runs.items()}  # tokens/s per round

    def spread(x: str, y: str) -> list[float]:
        q = sorted(p / s for p, s in zip(decode[x], decode[y]))
        return [round(q[0], 4), round(statistics.median(q), 4), round(q[-1], 4)]

    hf, dyn = runs["hf"][0], runs["dynamic"][0]
    weight_bytes = sum(p.numel() * p.element_size() for p in m.lm.parameters())  # tied embeddings counted once
    c = m.lm.config  # K and V of all layers, one row, one position:
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * m.lm.dtype.itemsize
    t = np.arange(1, N + 1)
    unmerged_len = W + t  # [N] cache length read by the forward of new token t
    merged_len = (W - prompt.saved.sum(1))[:, None] + t[None] - np.cumsum(new.saved, 1)  # [B, N]
    kv_read_unmerged = per_token * batch * unmerged_len.mean()
    kv_read_dynamic = per_token * merged_len.sum(0).mean()
    ideal_unmerged = batch * bandwidth / (weight_bytes + kv_read_unmerged)
    ideal_dynamic = batch * bandwidth / (weight_bytes + kv_read_dynamic)
    med = {k: statistics.median(v) for k, v in decode.items()}
    tr = 1 - sum(dyn.kv_len_final) / (batch * (W + N))  # measured (verify() checked it is the schedule's)
    return {
        "model": "tiny llama" if a.tiny else "llama-3.2-1b config, random weights",
        "batch": batch, "prompt": W, "new": N, "dtype": a.dtype, "device": str(m.lm.device),
        "rounds": len(runs["hf"]), "round_seconds": [round(s, 2) for s in round_seconds],
        "warmup_seconds": [round(s, 2) for s in warm_seconds],
        **{f"{k}_tok_s": round(v, 1) for k, v in med.items()},
        **{f"{k}_e2e_tok_s": round(batch * N / statistics.median(x.seconds for x in v), 1) for k, v in runs.items()},
        "dynamic_vs_hf": spread("dynamic", "hf"), "dynamic_vs_none": spread("dynamic", "none"),
        "none_vs_hf": spread("none", "hf"),
        "ideal_unmerged_tok_s": round(ideal_unmerged, 1), "ideal_dynamic_tok_s": round(ideal_dynamic, 1),
        "dynamic_vs_ideal": round(med["dynamic"] / ideal_dynamic, 4),
        "hf_vs_ideal": round(med["hf"] / ideal_unmerged, 4), "none_vs_ideal": round(med["none"] / ideal_unmerged, 4),
        "ideal_speedup": round((weight_bytes + kv_read_unmerged) / (weight_bytes + kv_read_dynamic), 4),
        "tokens_equal": True,  # verify() fails the case otherwise
        "tr_target": a.tr, "tr": round(float(tr), 4),
        "tr_prompt": round(float(prompt.saved.sum() / (batch * W)), 4),
        "tr_new": round(float(new.saved.sum() / (batch * N)), 4),
        "kv_len_final": dyn.kv_len_final, "expected_kv_len": expected_kv.tolist(),
        "hf_kv_slots": hf.kv_slots, "dynamic_kv_slots": dyn.kv_slots,
        "hf_kv_bytes": hf.kv_bytes, "dynamic_kv_bytes": dyn.kv_bytes, "kv_ratio": round(dyn.kv_bytes / hf.kv_bytes, 4),
        "kv_bytes_per_token": per_token, "weight_bytes": weight_bytes, "bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "mean_kv_read_unmerged": round(kv_read_unmerged), "mean_kv_read_dynamic": round(kv_read_dynamic),
        **{f"{k}_peak_gib": (round(max(x.peak_bytes for x in v) / 2**30, 2) if v[0].peak_bytes is not None else None)
           for k, v in runs.items()},
    }


def table(rows: list[dict]) -> str:
    head = ("| batch | HF tok/s | none tok/s | dynamic tok/s | dyn/HF (min/med/max) | dyn/ideal | HF/ideal | "
            "ideal speedup | KV ratio | TR % | peak GiB HF/none/dyn | dtype |\n" + "|---" * 12 + "|")
    lines = [head]
    for r in rows:
        peaks = "/".join("-" if r[f"{k}_peak_gib"] is None else f"{r[f'{k}_peak_gib']:.1f}" for k in METHODS)
        lines.append(f"| {r['batch']} | {r['hf_tok_s']:,.0f} | {r['none_tok_s']:,.0f} | {r['dynamic_tok_s']:,.0f} | "
                     f"{'/'.join(f'{x:.2f}' for x in r['dynamic_vs_hf'])} | {r['dynamic_vs_ideal']:.3f} | "
                     f"{r['hf_vs_ideal']:.3f} | {r['ideal_speedup']:.3f} | {r['kv_ratio']:.3f} | "
                     f"{100 * r['tr']:.1f} | {peaks} | {r['dtype']} |")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------
def parse(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="32,1", help="comma list of batch sizes, run in this order (the goal case first, "
                   "so the time guard never skips it)")
    p.add_argument("--prompt", type=int, default=2000, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=2000, help="new tokens per row")
    p.add_argument("--tr", type=float, default=0.35, help="token reduction the planted rules give (prompt and new)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer d-64 Llama with a 1,024-token vocabulary (CPU tests)")
    p.add_argument("--repeat", type=int, default=2, help="timed rounds per batch size, each in a rotated method order")
    p.add_argument("--warmup", type=int, default=1, help="untimed full-length rounds first (verified too)")
    p.add_argument("--max-seconds", type=float, default=270.0, help="total time guard, model building included")
    p.add_argument("--rules-per-n", type=int, default=None, help="distinct planted rules of each n (2, 3, 4); "
                   "default 64, 16 with --tiny")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="memory bandwidth for the ideal, GB/s (default: measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write all cases to this JSON file")
    a = p.parse_args(argv)
    a.rules_per_n = a.rules_per_n or (16 if a.tiny else 64)
    try:
        a.batches = [int(x) for x in a.batch.split(",")]
    except ValueError:
        raise UserError(f"--batch {a.batch!r}: give a comma list of positive integers, e.g. 32,1") from None
    bad = next((f"--{k.replace('_', '-')} {getattr(a, k)}" for k in ("prompt", "new", "repeat", "rules_per_n")
                if getattr(a, k) < 1), None)
    if a.warmup < 0:
        raise UserError(f"--warmup {a.warmup}: give 0 or more rounds")
    if bad or min(a.batches) < 1:
        raise UserError(f"{bad or '--batch ' + a.batch}: give a positive integer")
    if not 0.0 < a.tr <= 0.7:
        raise UserError(f"--tr {a.tr}: give a token reduction in (0, 0.7] (4-grams planted at most every 4 tokens)")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {a.device}: no CUDA device here; pass --device cpu (with --tiny for a quick run)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    deadline = t_start + a.max_seconds
    dtype = getattr(torch, a.dtype)
    lm = build_lm(a.tiny, a.prompt + a.new + 1, dtype, a.device)
    V, bos, eos = lm.config.vocab_size, lm.config.bos_token_id, lm.config.eos_token_id
    tok = build_tokenizer(V, bos, eos)
    fp = tokenizer_fingerprint(tok)
    rng = np.random.default_rng(a.seed)
    rules, fillers = build_rules(rng, np.setdiff1d(np.arange(V), [0, bos, eos]), a.rules_per_n, fp)
    torch.manual_seed(a.seed)
    merger = MergeModule(MergerConfig(hidden_size=lm.config.hidden_size, lm_name="random llama", tokenizer=fp))
    m = MergedLM(lm, tok, merger, rules)
    for grams in rules.ngrams.values():  # a deployed model has its surrogates cached after first use
        for g in grams.tolist():
            m.surrogate(tuple(g))
    device = lm.device
    bandwidth = a.bandwidth_gbs * 1e9 if a.bandwidth_gbs else measure_bandwidth(device)
    print(f"gpu_decode: model ({sum(p.numel() for p in lm.parameters()) / 1e6:.1f} M parameters, {a.dtype}, {device}) "
          f"and rules built in {time.perf_counter() - t_start:.1f} s; bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows, estimate, failed = [], 0.0, 0  # estimate: the last case's round, a guess for the next one
    for i, batch in enumerate(a.batches):
        if time.perf_counter() + estimate > deadline:
            print(f"gpu_decode: skipped batch {batch}: a round (~{estimate:.0f} s) would pass --max-seconds",
                  flush=True)
            continue
        try:
            r = run_case(m, rules, fillers, a, batch, bandwidth, deadline, len(a.batches) - i - 1)
        except VerifyError as e:  # the other cases still run: one device session, every figure counts
            print(f"gpu_decode: batch {batch} FAILED verification, no figures: {e}", flush=True)
            failed += 1
            continue
        estimate = sum(r["warmup_seconds"]) + statistics.mean(r["round_seconds"])
        rows.append(r)
        print("GPUDECODE " + json.dumps(r), flush=True)
    if rows:
        print("\n" + table(rows))
    if a.json:
        write_text_atomic(a.json, json.dumps({"cases": rows, "seconds": time.perf_counter() - t_start}, indent=2))
    print(f"gpu_decode: {len(rows)} of {len(a.batches)} case(s) in {time.perf_counter() - t_start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli_entry(main, sys.argv[1:]))
