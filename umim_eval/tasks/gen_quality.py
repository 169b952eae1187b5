"""Generation quality of the base vs the merged model (paper App. F.1, Tables 10 and 11).

Protocol
--------
1. Tokenize the documents of ``data``/``split`` with the LM tokenizer (no special tokens) and keep
   those with at least ``prompt_tokens + ref_tokens`` tokens; draw ``n_samples`` of them with
   ``seed``. Tokens ``[0, prompt_tokens)`` are the prompt, the next ``ref_tokens`` the reference.
2. For each decoding (``greedy``; ``top_p``: p = 0.7, T = 0.8; ``sampling``: pure, T = 1, no top-k),
   generate ``new_tokens`` tokens per prompt with :meth:`umim.inference.generation.MergedLM.generate`, mode
   ``"none"`` (base model) and ``merge_mode`` (merged model). EOS does not stop generation unless
   ``stop_at_eos`` (the paper generates a fixed 100 tokens). Sampled decodings run ``runs`` times
   with seeds ``seed + run``; greedy runs once. Base and merged use the same seeds.
3. Score every run against the references (:mod:`umim_eval.scoring.generation_metrics`): Rep-n and Dist-n
   (n = 2, 3, 4) on the generated LM token ids, ROUGE-2/L/Lsum, BERTScore F1, chrF and MAUVE on
   the decoded continuations (without the prompt). Metrics are averaged over runs (with the
   standard deviation across runs). The merged rows also carry the token reduction
   ``TR = 1 - sum(final KV length) / sum(prompt + generated tokens)`` and the prompt-only TR.

Every number is in percent. The reference continuations' own Rep-n / Dist-n are reported too, as
the human anchor.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from umim.errors import UserError
from umim.inference.generation import MergedLM, SamplingConfig
from umim_eval.results import markdown_table
from umim_eval.scoring import generation_metrics as gm
from umim_eval.tasks.config import TaskConfig

DECODINGS: dict[str, dict] = {
    "greedy": {"do_sample": False},
    "top_p": {"do_sample": True, "top_p": 0.7, "temperature": 0.8},
    "sampling": {"do_sample": True, "top_p": 1.0, "temperature": 1.0},
}
"""Decoding name -> :class:`SamplingConfig` settings (App. F.1.1)."""

LABELS = {"greedy": "Greedy", "top_p": "Top-p", "sampling": "Sampling"}
NS = (2, 3, 4)
REP_DIST = [f"{k}-{n}" for n in NS for k in ("rep", "dist")]
SIMILARITY = ["rouge2", "rougeL", "rougeLsum", "bertscore", "chrf", "mauve"]


@dataclass
class GenQualityConfig(TaskConfig):
    """Settings of one generation-quality run (App. F.1)."""

    data: str = "hf:Salesforce/wikitext:wikitext-103-raw-v1"
    """Corpus spec (see :mod:`umim.rules.corpus`); the paper uses the WikiText-103 test split."""
    split: str = "test"
    """Corpus split."""
    n_samples: int = 1000
    """Prompts scored; documents with too few tokens are skipped, and fewer usable ones is an error."""
    prompt_tokens: int = 100
    """Prompt length in LM tokens."""
    ref_tokens: int = 100
    """Reference continuation length in LM tokens (the tokens right after the prompt)."""
    new_tokens: int = 100
    """Tokens generated per prompt."""
    decodings: list[str] = field(default_factory=lambda: ["greedy", "top_p", "sampling"])
    """Decodings to run, from ``greedy``, ``top_p`` (p 0.7, T 0.8), ``sampling`` (pure, T 1)."""
    runs: int = 5
    """Independent runs (seeds ``seed + run``) of each sampled decoding; greedy runs once."""
    merge_mode: str = "dynamic"
    """MergedLM mode of the merged model: ``prompt`` or ``dynamic``."""
    stop_at_eos: bool = False
    """Stop a row at EOS; off by default so every continuation has ``new_tokens`` tokens as in the paper."""
    batch_size: int = 8
    """Prompts per generate call (and texts per encoder forward)."""
    bertscore_model: str = "roberta-large"
    """BERTScore encoder: hub id, local folder or "embedded"."""
    bertscore_layers: int | None = None
    """BERTScore layer; None = bert_score's tuned default (roberta-large: 17), required for other models."""
    mauve_featurizer: str = "gpt2-large"
    """MAUVE feature model: hub id, local folder or "embedded"."""
    mauve_buckets: int | str = "auto"
    """MAUVE histogram size; "auto" = max(2, n/10). Needs at least this many samples."""
    seed: int = 0
    """Seed of the prompt draw and of the sampling runs."""


def _check(cfg: GenQualityConfig) -> None:
    unknown = [d for d in cfg.decodings if d not in DECODINGS]
    if unknown or not cfg.decodings:
        raise UserError(f"unknown decoding(s) {unknown or cfg.decodings}; choose from {list(DECODINGS)}")
    if cfg.merge_mode not in ("prompt", "dynamic"):
        raise UserError(f"merge_mode must be 'prompt' or 'dynamic', got {cfg.merge_mode!r}")
    for name in ("n_samples", "prompt_tokens", "ref_tokens", "new_tokens", "runs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def select_samples(cfg: GenQualityConfig, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and references: ``n_samples`` pairs of id lists (``prompt_tokens``, ``ref_tokens`` long)."""
    from umim.rules.corpus import CorpusError, load_documents

    docs = load_documents(cfg.data, cfg.split)
    need = cfg.prompt_tokens + cfg.ref_tokens
    ids = [d for d in tokenizer(docs, add_special_tokens=False)["input_ids"] if len(d) >= need]
    if len(ids) < cfg.n_samples:
        raise CorpusError(f"corpus {cfg.data!r} split {cfg.split!r}: {len(ids)} of {len(docs)} documents have >= "
                          f"{need} tokens (prompt {cfg.prompt_tokens} + reference {cfg.ref_tokens}), "
                          f"{cfg.n_samples} needed; lower n_samples or the token counts")
    pick = sorted(random.Random(cfg.seed).sample(range(len(ids)), cfg.n_samples))
    return [ids[i][: cfg.prompt_tokens] for i in pick], [ids[i][cfg.prompt_tokens : need] for i in pick]


def _generate(model: MergedLM, prompts, mode: str, decoding: str, seed: int, cfg: GenQualityConfig, bar) -> list:
    out = []
    for b in range(0, len(prompts), cfg.batch_size):
        sampling = SamplingConfig(max_new_tokens=cfg.new_tokens, seed=seed * 100_003 + b, **DECODINGS[decoding],
                                  eos_token_id=None if cfg.stop_at_eos else [])  # [] = no stop token
        out += model.generate(prompts[b : b + cfg.batch_size], mode, sampling)
        bar.update(1)
    return out


class _Scorer:
    """All metrics of one run against the fixed references (encoders loaded once)."""

    def __init__(self, cfg: GenQualityConfig, ref_ids: list[list[int]], ref_texts: list[str]):
        self.cfg, self.ref_texts = cfg, ref_texts
        self.bert = gm.BertScorer(cfg.bertscore_model, cfg.bertscore_layers, cfg.batch_size, cfg.device)
        self.featurizer = gm.MauveFeaturizer(cfg.mauve_featurizer, cfg.batch_size, device=cfg.device)
        self.ref_features = self.featurizer.features(ref_texts)
        self.reference = self.rep_dist(ref_ids)

    @staticmethod
    def rep_dist(token_lists) -> dict[str, float]:
        return {f"{k}-{n}": (gm.rep_n if k == "rep" else gm.dist_n)(token_lists, n)
                for n in NS for k in ("rep", "dist")}

    def __call__(self, gen_ids: list[list[int]], texts: list[str]) -> dict[str, float]:
        m = self.rep_dist(gen_ids)
        r = gm.rouge(texts, self.ref_texts)
        m.update(rouge2=r["rouge2"], rougeL=r["rougeL"], rougeLsum=r["rougeLsum"])
        m["bertscore"] = self.bert.f1(texts, self.ref_texts)
        m["chrf"] = gm.chrf(texts, self.ref_texts)
        m["mauve"] = gm.mauve_from_features(self.featurizer.features(texts), self.ref_features, self.cfg.mauve_buckets,
                                            seed=25 + self.cfg.seed)
        return m


def _mean_std(runs: list[dict[str, float]]) -> tuple[dict, dict]:
    keys = runs[0].keys()
    mean = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    std = {k: float(np.std([r[k] for r in runs])) if len(runs) > 1 else 0.0 for k in keys}
    return mean, std


def _tr(results) -> dict[str, float]:
    kv, full = sum(r.kv_len_final for r in results), sum(r.kv_len_unmerged for r in results)
    pm, p = sum(r.prompt_len_merged for r in results), sum(r.prompt_len for r in results)
    return {"tr": 100.0 * (1 - kv / full), "tr_prompt": 100.0 * (1 - pm / p)}


def run_gen_quality(cfg: GenQualityConfig, progress: bool = True, model: MergedLM | None = None) -> dict:
    """Run the App. F.1 protocol (module docstring); returns a JSON-able dict.

    Parameters
    ----------
    cfg : the settings.
    progress : show tqdm bars.
    model : an already built :class:`MergedLM` with merger and rules; default: loaded from ``cfg``.

    Returns
    -------
    dict with ``config``, ``n_samples``, ``reference`` (Rep/Dist of the references), ``decodings``
    (per decoding: ``base`` and ``merged``, each with ``metrics`` (mean over runs), ``std``,
    ``runs`` (per-run metrics) and for ``merged`` also ``tr`` / ``tr_prompt`` (percent, mean over
    runs)), ``examples`` (the first prompt's texts per decoding, first run) and ``wall_s``.
    """
    _check(cfg)
    t0 = time.perf_counter()
    model = cfg.load_run(model, need_merging="the merged model")
    tok = model.tokenizer
    prompts, refs = select_samples(cfg, tok)
    ref_texts = tok.batch_decode(refs, skip_special_tokens=True)
    scorer = _Scorer(cfg, refs, ref_texts)

    n_batches = math.ceil(len(prompts) / cfg.batch_size)
    total = sum(2 * (1 if d == "greedy" else cfg.runs) * n_batches for d in cfg.decodings)
    result = {"config": asdict(cfg), "n_samples": len(prompts), "reference": scorer.reference, "decodings": {},
              "examples": {"prompt": tok.decode(prompts[0]), "reference": ref_texts[0]}}
    with tqdm(total=total, desc="generating", disable=not progress) as bar:
        for dec in cfg.decodings:
            entry = {}
            for label, mode in (("base", "none"), ("merged", cfg.merge_mode)):
                bar.set_postfix_str(f"{dec} {label}")
                runs, trs = [], []
                for run in range(1 if dec == "greedy" else cfg.runs):
                    res = _generate(model, prompts, mode, dec, cfg.seed + run, cfg, bar)
                    gen_ids = [r.generated_ids for r in res]
                    texts = tok.batch_decode(gen_ids, skip_special_tokens=True)
                    runs.append(scorer(gen_ids, texts))
                    trs.append(_tr(res))
                    if run == 0:
                        result["examples"][f"{dec}/{label}"] = texts[0]
                mean, std = _mean_std(runs)
                entry[label] = {"metrics": mean, "std": std, "runs": runs}
                if label == "merged":
                    entry[label].update(_mean_std(trs)[0])
            result["decodings"][dec] = entry
    result["wall_s"] = time.perf_counter() - t0
    return result


def gen_quality_tables(result: dict) -> str:
    """Two markdown tables shaped like the paper's Tables 10 (repetition/diversity) and 11 (similarity)."""
    rows10, rows11 = [], []
    for dec, entry in result["decodings"].items():
        for label, name in (("base", "Base model"), ("merged", "Merge model")):
            e = entry[label]
            row = f"{LABELS.get(dec, dec)} ({name})"
            tr = e.get("tr")
            rows10.append([row] + [e["metrics"][k] for k in REP_DIST] + [tr])
            rows11.append([row] + [e["metrics"][k] for k in SIMILARITY] + [tr])
    rows10.append(["Reference (human)"] + [result["reference"][k] for k in REP_DIST] + [None])
    h10 = ["Method", "Rep-2", "Dist-2", "Rep-3", "Dist-3", "Rep-4", "Dist-4", "TR (%)"]
    h11 = ["Method", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "BERTScore", "chrF", "MAUVE", "TR (%)"]
    n = result["n_samples"]
    return (f"Table 10: n-gram repetition and diversity ({n} samples, LM tokens)\n\n" + markdown_table(h10, rows10)
            + f"\nTable 11: similarity to the reference continuation ({n} samples)\n\n" + markdown_table(h11, rows11))


NAME = "gen_quality"
"""Result file stem: the command writes ``out_dir/gen_quality.json`` and ``out_dir/gen_quality.md``."""
# the names every runner exposes (umim_eval.cli)
Config, run, table = GenQualityConfig, run_gen_quality, gen_quality_tables
