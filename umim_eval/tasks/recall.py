"""Every method at a matched token reduction, scored on an answer that may lie ANYWHERE in the context.

Why a second comparison: ``compare`` scores the continuation right after the context, which mostly
needs the context's last tokens, so a method that keeps a recent window (StreamingLLM) looks good
there whatever it drops early on. Here the answer is a sentence of the context drawn in turn from
its beginning, middle and end third, so a method that loses early context loses early answers.

Protocol ("sentence recall"). The split's documents are cut into sentences; consecutive sentences
are packed into passages of at most ``context_tokens`` tokens (at least three quarters of it). The
PASSAGE is the context, what every method reduces. After it come the QUERY, an instruction and the
first ``cue_tokens`` tokens of one of the passage's sentences (its "cue"), and then an ANSWER of
``answer_tokens`` tokens: the gold answer is that sentence's next tokens; the other candidates are
the same tokens of ``n_choices - 1`` other sentences of the passage (text the passage holds too,
so copying any passage text does not pick the gold answer; binding the cue to what followed it does). Query
and answer are fed unreduced, as the method contract's target, and only the answer tokens are
scored. Scores:

* answer NLL: mean NLL per gold-answer token (nats);
* accuracy: share of examples whose gold answer has a lower summed NLL than every other candidate
  (chance: ``1 / n_choices``), overall and by the third of the passage the gold sentence starts in.
  The cue alone already favours the gold answer (on the embedded model the base LM with no passage
  picks it in 5 of 6 questions, at 4.0 nats per answer token against 0.14 with the passage), so the
  answer NLL is the finer measure; the per-example summed NLLs are in the result (``scores``).

Every sentence of a passage shares its token ids with the passage (the passage IS the concatenation
of its sentences' ids, each tokenized with a leading space), so the cue and the answers repeat the
passage's own tokens. Reference rows: the base LM with the full passage and with no passage (the
query alone as context); the task measures recall only where the first is clearly better.

Matching (``targets``) and TR are those of :mod:`umim_eval.tasks.compare`: TR = removed passage
positions (or evicted entries) / passage tokens, per example at UMIM's TR (``"umim"``) or at a
fixed level; KV policies read passage + query + answer under the ``prompt`` budget schedule.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from umim.errors import UserError
from umim.inference.generation import MergedLM
from umim.rules.corpus import load_documents
from umim_eval.methods.registry import check_methods, label
from umim_eval.results import Journal, fmt, markdown_table, pct
from umim_eval.tasks.compare import aimed_tr, build_methods, check_targets
from umim_eval.tasks.config import TaskConfig

REGIONS = ("beginning", "middle", "end")
"""The thirds of a passage a gold sentence is drawn from, in turn (example ``i``: ``REGIONS[i % 3]``)."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


@dataclass
class RecallConfig(TaskConfig):
    """Settings of ``umim-eval recall``."""

    data: str = "pydoc"
    """Corpus spec of the passages' documents (``pydoc``, ``fortunes``, ``hf:PATH[:CONFIG]``, a local file)."""
    split: str = "test"
    """Split of ``data``."""
    n_samples: int = 30
    """Passages (= questions) used: the first ones of the split."""
    context_tokens: int = 128
    """Largest passage length P (what the methods reduce); passages hold at least 3/4 of it."""
    cue_tokens: int = 4
    """Tokens of the asked sentence repeated in the query (the cue)."""
    answer_tokens: int = 8
    """Tokens of each candidate answer (the gold sentence's, and the other sentences', after their cue)."""
    n_choices: int = 4
    """Candidate answers per question (the gold one + sentences of the same passage); chance = 1 / n_choices."""
    instruction: str = "\n\nRepeat the sentence of the text above that begins with these words:"
    """Text between the passage and the cue (fed unreduced, not scored)."""
    methods: list[str] = field(default_factory=lambda: ["umim", "select_context", "streaming_llm", "h2o"])
    """Method names of :data:`umim_eval.methods.registry.METHODS`; ``base`` (no reduction) is always included."""
    method_options: dict[str, dict] = field(default_factory=dict)
    """Extra constructor options per method, e.g. ``{ktoken: {path: runs/ktoken/ktoken}}``."""
    targets: list = field(default_factory=lambda: ["umim"])
    """TR levels: ``"umim"`` (per-example match to UMIM's TR) and/or numbers in [0, 1)."""
    seed: int = 0
    """Seed of the choice of asked sentence and of the other candidates."""

    def check(self) -> None:
        """Refuse impossible settings before any model is loaded (one line each)."""
        for name in ("n_samples", "context_tokens", "cue_tokens", "answer_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_choices < 2:
            raise UserError(f"n_choices must be >= 2 (the gold answer and at least one other), got {self.n_choices}")
        if self.n_choices * (self.cue_tokens + self.answer_tokens) > self.context_tokens:
            raise UserError(f"{self.n_choices} sentences of >= cue_tokens + answer_tokens = "
                            f"{self.cue_tokens + self.answer_tokens} tokens do not fit in context_tokens "
                            f"{self.context_tokens}: raise context_tokens or lower n_choices/cue_tokens/answer_tokens")
        check_targets(self.targets)


@dataclass
class RecallExample:
    """One question: a passage (the context), a query and its candidate answers."""

    context: list[int]
    """[P] passage ids (reduced by the methods)."""
    query: list[int]
    """Instruction + cue ids (fed unreduced, not scored)."""
    answers: list[list[int]]
    """[n_choices][A] candidate answer ids, the gold one first."""
    position: float
    """Where the gold sentence starts, as a share of the passage (0: its first token)."""
    region: int
    """Index into :data:`REGIONS` of that position's third."""


def split_sentences(doc: str) -> list[str]:
    """A document's sentences (whitespace collapsed; a sentence ends at ``.!?`` before a capital or quote)."""
    return [s for s in _SENTENCE_END.split(" ".join(doc.split())) if s]


def _passages(docs: list[str], tokenizer, max_tokens: int) -> list[list[list[int]]]:
    """Consecutive sentences of ``docs`` packed into passages of ``3/4 max_tokens .. max_tokens`` ids.

    Returns one list of sentence id lists per passage (each sentence tokenized with a leading space,
    so that their concatenation reads like the joined text). A sentence longer than a whole passage
    is skipped, and the passage it interrupts is closed."""
    sents = [s for d in docs for s in split_sentences(d)]
    ids = tokenizer([" " + s for s in sents], add_special_tokens=False)["input_ids"] if sents else []
    out, cur, n = [], [], 0
    for s in ids:
        if n + len(s) > max_tokens:
            if n >= 0.75 * max_tokens:
                out.append(cur)
            cur, n = [], 0
            if len(s) > max_tokens:
                continue
        cur, n = cur + [list(s)], n + len(s)
    if n >= 0.75 * max_tokens:
        out.append(cur)
    return out


def make_example(sentences: list[list[int]], instruction: list[int], cfg: RecallConfig, i: int,
                 rng: np.random.Generator) -> RecallExample | None:
    """The ``i``-th question from one passage's sentences, or None when the passage holds fewer than
    ``n_choices`` usable sentences (long enough, with a cue that no other sentence starts with, and
    pairwise distinct answers)."""
    k, a = cfg.cue_tokens, cfg.answer_tokens
    starts = np.cumsum([0] + [len(s) for s in sentences])
    P = int(starts[-1])
    cues = [tuple(s[:k]) for s in sentences]
    usable, seen_answers = [], set()
    for j, s in enumerate(sentences):
        answer = tuple(s[k : k + a])
        if len(s) >= k + a and cues.count(cues[j]) == 1 and answer not in seen_answers:
            usable.append(j)
            seen_answers.add(answer)
    if len(usable) < cfg.n_choices:
        return None
    region = i % len(REGIONS)
    where = np.minimum((3 * starts[usable] // P), 2)  # [U] third of each usable sentence's first token
    in_region = [j for j, r in zip(usable, where) if r == region]
    # a passage without a usable sentence in that third asks the one nearest to it
    pool = in_region or [min(usable, key=lambda j: abs(3 * starts[j] / P - (region + 0.5)))]
    gold = int(rng.choice(pool))
    others = [int(j) for j in rng.choice([j for j in usable if j != gold], cfg.n_choices - 1, replace=False)]
    answers = [sentences[j][k : k + a] for j in [gold, *others]]
    return RecallExample(context=[t for s in sentences for t in s], query=instruction + sentences[gold][:k],
                         answers=answers, position=float(starts[gold] / P),
                         region=int(min(3 * starts[gold] // P, 2)))


def load_examples(cfg: RecallConfig, tokenizer) -> list[RecallExample]:
    """The first ``n_samples`` questions of the split (one per usable passage, in order).

    Raises :class:`UserError` when the split holds fewer (no silent shortfall)."""
    passages = _passages(load_documents(cfg.data, cfg.split), tokenizer, cfg.context_tokens)
    instruction = tokenizer(cfg.instruction, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(cfg.seed)
    out = []
    for sentences in passages:
        ex = make_example(sentences, instruction, cfg, len(out), rng)
        if ex is not None:
            out.append(ex)
            if len(out) == cfg.n_samples:
                return out
    raise UserError(f"{cfg.data}:{cfg.split} gives {len(out)} passages of {cfg.context_tokens} tokens with "
                    f"{cfg.n_choices} usable sentences; {cfg.n_samples} requested: lower n_samples or n_choices, "
                    "or use a larger split")


def _score(method, m: MergedLM, ex: RecallExample, context: list[int] | None = None) -> tuple[list[float], float]:
    """(summed NLL of each candidate answer [n_choices], achieved TR on the context) of one question;
    ``context`` replaces the passage (the no-passage reference)."""
    sums, tr = [], 0.0
    ctx = ex.context if context is None else context
    query = ex.query if context is None else ex.query[len(context):]
    with torch.no_grad():  # scoring only: no graph through the LM
        for ans in ex.answers:
            s = method.score_continuation(m, ctx, query + ans)
            sums.append(float(s.nll[-len(ans):].sum()))
            tr = s.tr
    return sums, tr


def _accuracy(correct: np.ndarray, regions: np.ndarray) -> tuple[float, dict]:
    """Share of True in ``correct`` [N], overall and per region (None for a region without questions)."""
    return float(correct.mean()), {r: (float(correct[regions == i].mean()) if (regions == i).any() else None)
                                   for i, r in enumerate(REGIONS)}


def _summary(scores: list[list[float]], examples: list[RecallExample]) -> dict:
    """Answer NLL per gold token, accuracy overall and per region, from [N][n_choices] summed NLLs (gold first)."""
    s = np.asarray(scores)  # [N, n_choices]
    regions = np.asarray([ex.region for ex in examples])
    correct = s[:, 0] < s[:, 1:].min(axis=1)
    acc, by_region = _accuracy(correct, regions)
    return {"nll": float(s[:, 0].sum() / sum(len(ex.answers[0]) for ex in examples)), "acc": acc,
            "acc_by_region": by_region, "correct": correct.tolist(), "scores": s.tolist()}


def run_recall(cfg: RecallConfig, progress: bool = True, merged_lm: MergedLM | None = None,
               journal: Journal | None = None) -> dict:
    """Score every method at every target level; see the module docstring for the protocol.

    Returns
    -------
    ``{"config", "base", "no_context", "rows": [{target, method, target_tr, achieved_tr, max_tr_gap, nll,
    acc, acc_by_region, n}], "n_examples", "mean_context_tokens", "wall_s"}`` (TRs are means over examples).
    """
    t0 = time.perf_counter()
    cfg.check()
    check_methods(cfg.methods, cfg.method_options)
    m = cfg.load_run(merged_lm, need_merging="targets 'umim'" if "umim" in cfg.targets else None)
    examples = load_examples(cfg, m.tokenizer)
    umim_tr = [m.token_reduction(ex.context) if "umim" in cfg.targets else None for ex in examples]
    built = build_methods(cfg, m)
    get = journal.get_or if journal is not None else (lambda key, compute: compute())
    n_instr = len(examples[0].query) - cfg.cue_tokens

    def reference(key, context_of):
        scores = [get(f"{key}|{i}", lambda: _score(built["base"], m, ex, context_of(ex)))[0]
                  for i, ex in enumerate(examples)]
        return {"method": "base", **_summary(scores, examples), "achieved_tr": 0.0}

    base = reference("base", lambda ex: None)
    no_context = reference("no_context", lambda ex: ex.query[:n_instr])  # the instruction becomes the context
    rows = []
    jobs = [(t, name) for t in cfg.targets for name in cfg.methods if name != "base"]
    for target, name in tqdm(jobs, desc="recall", disable=not progress):
        method = built[name]
        if target != "umim" and method.fixed_tr:
            continue  # a fixed TR (UMIM's rules) has no knob: the umim_budget method covers fixed levels
        scores, trs, asked = [], [], []
        for i, ex in enumerate(examples):
            want = aimed_tr(target, umim_tr[i])
            method.aim(want)
            s, tr = get(f"{target}|{name}|{i}", lambda: _score(method, m, ex))
            scores, trs, asked = scores + [s], trs + [tr], asked + [want]
        rows.append({"target": target, "method": name, "target_tr": sum(asked) / len(asked),
                     "achieved_tr": sum(trs) / len(trs), "max_tr_gap": max(abs(a - b) for a, b in zip(trs, asked)),
                     **_summary(scores, examples), "n": len(examples)})
    return {"config": asdict(cfg), "base": base, "no_context": no_context, "rows": rows,
            "n_examples": len(examples), "mean_context_tokens": float(np.mean([len(ex.context) for ex in examples])),
            "regions": [REGIONS[ex.region] for ex in examples], "wall_s": time.perf_counter() - t0}


def recall_table(result: dict) -> str:
    """Method | matched to | target TR (%) | achieved TR (%) | answer NLL | accuracy (%), overall and by the
    third of the passage the answer lies in, under a line giving the examples, passage length and chance."""
    def scores(r):
        return [fmt(r["nll"], 3), pct(r["acc"], 1), *(pct(r["acc_by_region"][k], 1) for k in REGIONS)]

    rows = [["Base LM", "–", "–", "–", *scores(result["base"])],
            ["Base LM, no passage", "–", "–", "–", *scores(result["no_context"])]]
    for r in result["rows"]:
        level = "UMIM's TR" if r["target"] == "umim" else pct(float(r["target"]), 0) + "%"
        rows.append([label(r["method"]), level, pct(r["target_tr"]), pct(r["achieved_tr"]), *scores(r)])
    counts = {k: result["regions"].count(k) for k in REGIONS}
    n_choices = result["config"]["n_choices"]
    head = (f"{result['n_examples']} questions ({', '.join(f'{v} {k}' for k, v in counts.items())}), passages of "
            f"{result['mean_context_tokens']:.0f} tokens on average, {n_choices} candidate answers "
            f"(chance {100 / n_choices:.0f} %)\n\n")
    return head + markdown_table(["Method", "Matched to", "Target TR (%)", "Achieved TR (%)", "Answer NLL",
                                  "Acc (%)", *(f"Acc {k} (%)" for k in REGIONS)], rows)


NAME = "recall"
"""Result file stem: the command writes ``out_dir/recall.json`` and ``out_dir/recall.md``."""
Config, run, table = RecallConfig, run_recall, recall_table  # the names every runner exposes (umim_eval.cli)
