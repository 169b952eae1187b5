"""CNN/DailyMail summarization at a matched token reduction (paper Sec. 4.4, Table 5, App. F.2).

Protocol. Each article is cut to ``max_article_tokens`` LM tokens and put into a prompt template
(default ``"Article: {article}\\n\\nSummary:"``, a plain completion prompt: the paper does not
give its template). Every method reduces the PROMPT only; the summary is generated unmerged,
greedily, for a fixed ``max_new_tokens = 80`` tokens (EOS does not stop it unless
``stop_at_eos``), decoded, and scored against the reference highlights with ROUGE-1/2/L/Lsum F1,
their average, and BERTScore F1 (:mod:`umim_eval.scoring.generation_metrics`).

Methods are names of :mod:`umim_eval.methods.registry`:

* prompt methods (``base``, ``umim``, ``select_context``, and any registered compressor or
  merger): the prompt becomes ``[S, d]`` input embeddings (:func:`prompt_inputs`) and Hugging Face
  ``generate`` decodes from them (:func:`generate_from`); TR = ``1 - S / prompt tokens``;
* KV policies (``streaming_llm``, ``h2o``): the LM reads the whole prompt and evicts its cache
  while decoding (:func:`policy_generate`, ``prompt`` budget schedule): ``round(t P)`` entries are
  evicted once the prompt is read and every generated token then adds one, so at every step the
  cache holds as many entries as after a prompt reduced by ``t`` (the summary is never reduced,
  for any method), and the TR is
  reported on the prompt scale: evicted entries / P. H2O reads attention weights, so the model is
  switched to eager attention for it (:func:`eager_attention`) and back afterwards.

Matching (``match``): ``"per_example"`` drives every method to the TR that UMIM's rules give on
THAT example's prompt (the paper: "TR controlled to be the same as our approach"); ``"mean"`` to
UMIM's mean TR over all examples; ``"fixed"`` to ``ratio``. Fixed-rule UMIM has no knob: it is
always at its own TR.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from umim.errors import UserError
from umim.inference.generation import MergedLM, SamplingConfig
from umim_eval.methods.registry import label, method_class
from umim_eval.results import Journal, fmt, markdown_table, pct
from umim_eval.scoring.matched_generation import (
    check_matched_run,
    generate_matched,
    load_records,
    match_targets,
    needs_merging,
)
from umim_eval.tasks.config import TaskConfig


@dataclass
class SummarizeConfig(TaskConfig):
    """Settings of the CNN/DailyMail summarization run (Table 5)."""

    data: str = "hf:abisee/cnn_dailymail:3.0.0"
    """``hf:PATH[:CONFIG]`` (a hub dataset) or a local ``.jsonl`` file with one record per line."""
    split: str = "test"
    """Split of a hub dataset (ignored for local files)."""
    article_field: str = "article"
    """Record field holding the article."""
    reference_field: str = "highlights"
    """Record field holding the reference summary (newlines separate its sentences)."""
    n_samples: int = 100
    """Articles used, in dataset order."""
    max_article_tokens: int = 512
    """Articles are cut to this many LM tokens before they go into the template."""
    prompt_template: str = "Article: {article}\n\nSummary:"
    """Prompt with one ``{article}`` field; the generated text continues it."""
    add_special_tokens: bool = True
    """Let the tokenizer add its special tokens (e.g. Llama's BOS) to the prompt."""
    max_new_tokens: int = 80
    """Summary length in LM tokens (the paper: a fixed 80)."""
    stop_at_eos: bool = False
    """Stop a summary at the tokenizer's EOS; False generates exactly ``max_new_tokens`` (the paper's
    fixed length, which also keeps KV policies exactly at their target TR)."""
    greedy: bool = True
    """Greedy decoding (the paper); False samples with ``temperature`` and ``top_p``."""
    temperature: float = 1.0
    """Sampling temperature (``greedy=False`` only)."""
    top_p: float = 1.0
    """Nucleus sampling mass (``greedy=False`` only)."""
    seed: int = 0
    """Seed of the sampling RNG (``greedy=False`` only)."""
    methods: list[str] = field(default_factory=lambda: ["base", "umim", "select_context", "streaming_llm", "h2o"])
    """Method names of :data:`umim_eval.methods.registry.METHODS`, plus ``base`` (the plain LM)."""
    method_options: dict[str, dict] = field(default_factory=dict)
    """Extra constructor options per method name, e.g. ``{streaming_llm: {n_sink: 4}}``."""
    match: str = "per_example"
    """TR matching: "per_example" (UMIM's TR on each prompt), "mean" (UMIM's mean TR), "fixed" (``ratio``)."""
    ratio: float | None = None
    """Target TR for ``match="fixed"``."""
    kv_prefill: str = "full"
    """KV policies: "full" (one forward over the prompt, then evict) or "step" (evict after every prompt token)."""
    batch_size: int = 8
    """Prompts per ``generate`` call (left-padded; KV policies evict per row within the batch)."""
    bertscore_model: str | None = "roberta-large"
    """BERTScore encoder: hub id, local folder, or "embedded"; None skips BERTScore."""
    bertscore_layers: int | None = 17
    """Encoder layer of BERTScore (roberta-large: 17); None = bert_score's default for known hub models."""
    bertscore_batch_size: int = 32
    """Texts per BERTScore forward."""


# -- data ---------------------------------------------------------------------------------------------


def article_prompt_ids(tokenizer, article: str, template: str, max_article_tokens: int,
                       add_special_tokens: bool = True) -> list[int]:
    """[P] prompt ids: ``template`` around ``article`` cut to ``max_article_tokens`` tokens."""
    if "{article}" not in template:
        raise UserError(f"prompt_template needs an {{article}} field, got {template!r}")
    ids = tokenizer(article, add_special_tokens=False)["input_ids"][:max_article_tokens]
    text = template.format(article=tokenizer.decode(ids).strip())
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


# -- matched generation (shared with the math runner) -------------------------------------------------


# -- the run ------------------------------------------------------------------------------------------


def _check(cfg: SummarizeConfig) -> None:
    if not cfg.methods:
        raise UserError("methods is empty")
    if cfg.n_samples < 1 or cfg.max_new_tokens < 1 or cfg.max_article_tokens < 1 or cfg.batch_size < 1:
        raise UserError("n_samples, max_new_tokens, max_article_tokens and batch_size must be >= 1")
    check_matched_run(cfg, "article")


def run_summarize(cfg: SummarizeConfig, progress: bool = True, merged_lm: MergedLM | None = None,
                  journal: Journal | None = None) -> dict:
    """Summarize with every method at the matched TR and score the summaries.

    Parameters
    ----------
    cfg : the run's settings.
    progress : show tqdm bars.
    merged_lm : an already loaded LM (+ merger and rules); ``cfg.lm``, ``run_dir``, ``merger``,
        ``rules``, ``dtype`` and ``device`` are then ignored.

    Returns
    -------
    ``{"config", "methods": {name: {target_tr, tr, max_tr_gap, rouge1, rouge2, rougeL, rougeLsum,
    avg, bertscore}}, "examples": [{reference, target_tr, predictions: {name: text}, tr: {name: tr}}],
    "wall_s"}``; scores in percent, TRs as fractions (means over examples).
    """
    from umim_eval.scoring.generation_metrics import BertScorer, rouge

    _check(cfg)
    t0 = time.perf_counter()
    m = cfg.load_run(merged_lm, need_merging=needs_merging(cfg.methods, cfg.match))
    tok = m.tokenizer
    records = load_records(cfg.data, cfg.split, [cfg.article_field, cfg.reference_field], cfg.n_samples)
    prompts = [article_prompt_ids(tok, r[cfg.article_field], cfg.prompt_template, cfg.max_article_tokens,
                                  cfg.add_special_tokens) for r in records]
    refs = [r[cfg.reference_field].strip() for r in records]
    targets = match_targets(cfg.match, cfg.ratio, m, prompts)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, do_sample=not cfg.greedy, temperature=cfg.temperature,
                              top_p=cfg.top_p, seed=cfg.seed,
                              eos_token_id=tok.eos_token_id if cfg.stop_at_eos else None)

    preds: dict[str, list[str]] = {}
    trs: dict[str, list[float]] = {}
    get = journal.get_or if journal is not None else (lambda key, compute: compute())
    for name in tqdm(cfg.methods, desc="summarization", disable=not progress):
        def summarize():
            gens = generate_matched(name, m, prompts, targets, sampling, batch_size=cfg.batch_size,
                                    options=cfg.method_options.get(name), kv_prefill=cfg.kv_prefill, progress=progress)
            return {"preds": [tok.decode(g[0].ids, skip_special_tokens=True).strip() for g in gens],
                    "trs": [g[0].tr for g in gens]}

        done = get(f"method|{name}", summarize)
        preds[name], trs[name] = done["preds"], done["trs"]

    scorer = (BertScorer(cfg.bertscore_model, cfg.bertscore_layers, cfg.bertscore_batch_size, m.lm.device)
              if cfg.bertscore_model else None)
    methods = {}
    for name in cfg.methods:
        # methods without a TR knob (base, fixed-rule UMIM): their target is what they achieve
        asked = trs[name] if method_class(name).fixed_tr else targets
        row = {"target_tr": sum(asked) / len(asked), "tr": sum(trs[name]) / len(trs[name]),
               "max_tr_gap": max(abs(a - b) for a, b in zip(trs[name], asked))}
        row.update(rouge(preds[name], refs))
        row["avg"] = sum(row[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")) / 4
        row["bertscore"] = scorer.f1(preds[name], refs) if scorer else math.nan
        methods[name] = row
    examples = [{"reference": refs[i], "prompt_tokens": len(prompts[i]), "target_tr": targets[i],
                 "predictions": {n: preds[n][i] for n in cfg.methods}, "tr": {n: trs[n][i] for n in cfg.methods}}
                for i in range(len(records))]
    result = {"config": asdict(cfg), "methods": methods, "examples": examples, "wall_s": time.perf_counter() - t0}
    return result


def summarize_table(result: dict) -> str:
    """Table 5's shape: Methods | TR (%) | Rouge-1 | Rouge-2 | Rouge-L | Rouge-Lsum | Avg | BERTScore
    (TR = achieved mean; ROUGE and BERTScore F1 in percent)."""
    rows = []
    for name, r in result["methods"].items():
        rows.append([label(name), pct(r["tr"], 1), fmt(r["rouge1"]), fmt(r["rouge2"]), fmt(r["rougeL"]),
                     fmt(r["rougeLsum"]), fmt(r["avg"]), fmt(r["bertscore"])])
    return markdown_table(["Methods", "TR (%)", "Rouge-1", "Rouge-2", "Rouge-L", "Rouge-Lsum", "Avg", "BERTScore"],
                          rows)


NAME = "summarization"
"""Result file stem: the command writes ``out_dir/summarization.json`` and ``out_dir/summarization.md``."""
Config, run, table = SummarizeConfig, run_summarize, summarize_table  # the names every runner exposes (umim_eval.cli)
