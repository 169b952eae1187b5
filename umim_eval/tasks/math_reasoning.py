"""AIME 2024 / AMC 2023 with a reasoning model at a matched token reduction (paper Table 6, App. F.2).

Protocol. Each problem goes into a prompt that asks for the final answer in ``\\boxed{}`` (through
the tokenizer's chat template when it has one). A method reduces the PROMPT only (the paper merges
the input only; the chain of thought is generated unmerged). Each problem gets ``n`` sampled
solutions (temperature 0.6, top-p 0.95, up to ``max_new_tokens``); a solution is correct when its
last ``\\boxed{...}`` answer is equivalent to the reference (:func:`answers_match`).

Scores per dataset and method:

* ``pass@1`` and ``pass@k``: the unbiased estimator of Chen et al. (2021) from ``c`` correct of
  ``n`` samples, :func:`pass_at_k`, averaged over problems;
* ``solved``: problems with at least one correct answer among their first ``k`` samples, as
  ``"c/total"`` (Table 6's "15/30"), a single draw of what pass@k estimates;
* ``tr``: mean achieved TR of the prompts.

TR matching and method handling are those of :mod:`umim_eval.tasks.summarize` (per-example UMIM TR
by default; KV policies may be listed too, see :func:`umim_eval.scoring.matched_generation.generate_matched`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from tqdm.auto import tqdm

from umim.errors import UserError
from umim.inference.generation import SamplingConfig
from umim_eval.methods.base import model_context
from umim_eval.methods.registry import label, method_class
from umim_eval.results import markdown_table, pct
from umim_eval.scoring.matched_generation import (
    check_matched_run,
    generate_matched,
    load_records,
    match_targets,
    needs_merging,
)
from umim_eval.tasks.config import TaskConfig

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# -- pass@k -------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct of ``n`` samples: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (Chen et al., 2021), which never forms the
    huge binomials.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise UserError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# -- answers ------------------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)\b")


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces kept), or of a
    brace-less ``\\boxed 42``; ``None`` when there is none or the last one is never closed."""
    starts = [mt.end() for mt in _BOX.finditer(text)]
    for j in reversed(starts):
        rest = text[j:]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            i, depth = j + (len(rest) - len(stripped)), 0
            for e in range(i, len(text)):
                ch = text[e]
                if ch == "{" and text[e - 1] != "\\":
                    depth += 1
                elif ch == "}" and text[e - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : e].strip()
            continue  # unclosed: try an earlier box
        if rest[:1] == " ":  # "\boxed 42": the argument runs to whitespace or a closing "$"
            token = re.match(r"\s*([^\s$]+)", rest)
            if token:
                return token.group(1)
    return None


def _strip_wrapper(s: str, name: str) -> str:
    """``\\name{x}`` -> ``x`` for every occurrence (nested braces inside ``x`` kept)."""
    key = "\\" + name + "{"
    while key in s:
        i = s.index(key)
        depth, e = 0, i + len(key) - 1
        for e in range(i + len(key) - 1, len(s)):
            depth += {"{": 1, "}": -1}.get(s[e], 0)
            if depth == 0:
                break
        else:
            return s.replace(key, "", 1)  # unbalanced: drop the command only
        s = s[:i] + s[i + len(key) : e] + s[e + 1 :]
    return s


_FRAC = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")


def normalize_answer(ans: str | None) -> str | None:
    """A canonical string for comparing final answers.

    Drops ``$``, spaces, ``\\left``/``\\right``, ``\\!``/``\\,``, a trailing period, degree signs and
    ``\\%``; unwraps ``\\text{}``, ``\\textbf{}``, ``\\mathrm{}``, ``\\mbox{}`` and an outer
    ``\\boxed{}``; ``\\dfrac``/``\\tfrac`` -> ``\\frac``; ``\\frac{a}{b}`` and ``\\frac12`` -> ``a/b``;
    ``1,000`` -> ``1000``; numbers lose leading zeros and a zero fraction (``007`` and ``7.00`` -> ``7``).
    """
    if ans is None:
        return None
    s = str(ans).strip()
    for name in ("boxed", "text", "textbf", "mathrm", "mbox"):
        s = _strip_wrapper(s, name)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for junk in ("$", "\\!", "\\,", "\\;", "\\ ", "^\\circ", "^{\\circ}", "\\%", "%", "\\displaystyle"):
        s = s.replace(junk, "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = _FRAC_SHORT.sub(r"\1/\2", s)
    while _FRAC.search(s):
        s = _FRAC.sub(lambda mt: f"{_paren(mt.group(1))}/{_paren(mt.group(2))}", s)
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators, not a tuple
        s = s.replace(",", "")
    if _NUMBER.match(s):
        s = _canonical_number(s)
    return s


def _paren(x: str) -> str:
    """Keep ``\\frac{a+b}{c}`` unambiguous as ``(a+b)/c``; plain atoms stay bare."""
    return x if re.fullmatch(r"[+-]?[\w.]+", x) else f"({x})"


def _canonical_number(s: str) -> str:
    sign = "-" if s.startswith("-") else ""
    s = s.lstrip("+-")
    whole, _, frac = s.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    out = whole + ("." + frac if frac else "")
    return "0" if out == "0" else sign + out


def _as_fraction(s: str) -> Fraction | None:
    """A rational value of a normalized answer (``"3/4"``, ``"-0.75"``, ``"12"``), else None."""
    try:
        if re.fullmatch(r"[+-]?\d+(\.\d+)?(/[+-]?\d+(\.\d+)?)?", s):
            num, _, den = s.partition("/")
            return Fraction(num) / Fraction(den) if den else Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answers_match(pred: str | None, ref: str | None) -> bool:
    """True when two answers are the same after :func:`normalize_answer`, equal as rationals
    (``\\frac{1}{2}`` = ``0.5`` = ``1/2``), or equivalent for ``math-verify`` (the checker of
    Hugging Face's math evaluations: symbolic equality, e.g. ``\\sqrt{2}/2`` = ``\\frac{\\sqrt{2}}{2}``,
    ``x^2+2x+1`` = ``(x+1)^2``). A missing answer never matches."""
    a, b = normalize_answer(pred), normalize_answer(ref)
    if not a or not b:
        return False
    if a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    return _math_verify(pred, ref)


def _math_verify(pred: str, ref: str) -> bool:
    import threading

    from math_verify import parse, verify

    # its time limits use SIGALRM, which only the main thread may set
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold, target = parse(f"${ref}$", parsing_timeout=limit), parse(f"${pred}$", parsing_timeout=limit)
    return bool(gold and target and verify(gold, target, timeout_seconds=limit))


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class MathDataset:
    """Where one benchmark's problems come from."""

    data: str
    """``hf:PATH[:CONFIG]`` (a hub dataset) or a local ``.jsonl`` file."""
    split: str = "train"
    """Split of a hub dataset (ignored for local files)."""
    question_field: str = "problem"
    """Record field holding the problem statement."""
    answer_field: str = "answer"
    """Record field holding the reference final answer."""


def _default_datasets() -> dict[str, MathDataset]:
    return {"aime2024": MathDataset("hf:HuggingFaceH4/aime_2024", "train", "problem", "answer"),
            "amc2023": MathDataset("hf:math-ai/amc23", "test", "question", "answer")}


@dataclass
class MathConfig(TaskConfig):
    """Settings of the AIME 2024 / AMC 2023 run (Table 6)."""

    lm: str = "agentica-org/DeepScaleR-1.5B-Preview"
    """Target reasoning LM: hub id, local folder, or "embedded"."""
    dtype: str = "bfloat16"
    """LM weights dtype: float32, bfloat16 or float16."""
    datasets: dict[str, MathDataset] = field(default_factory=_default_datasets)
    """Table column name -> dataset; the table shows ``aime2024`` and ``amc2023`` first."""
    n_problems: int | None = None
    """Problems per dataset, in order; None = all (AIME 2024: 30, AMC 2023: 40)."""
    k: int = 16
    """k of pass@k and of the solved count (the paper: 16)."""
    n: int = 16
    """Samples per problem, >= k (more samples lower the variance of pass@k)."""
    temperature: float = 0.6
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    max_new_tokens: int = 15000
    """Generation limit per solution (the paper: 15K); prompt + this must fit the model's context."""
    prompt_template: str = "{problem}\n\n" + INSTRUCTION.replace("{}", "{{}}")
    """Prompt with one ``{problem}`` field (literal braces doubled: ``\\boxed{{}}``)."""
    chat_template: bool = True
    """Wrap the prompt as one user turn of the tokenizer's chat template, when it has one."""
    methods: list[str] = field(default_factory=lambda: ["base", "umim", "select_context"])
    """Method names of :data:`umim_eval.methods.registry.METHODS`, plus ``base`` (the plain LM)."""
    method_options: dict[str, dict] = field(default_factory=dict)
    """Extra constructor options per method name."""
    match: str = "per_example"
    """TR matching: "per_example" (UMIM's TR on each prompt), "mean", or "fixed" (``ratio``)."""
    ratio: float | None = None
    """Target TR for ``match="fixed"``."""
    batch_size: int = 16
    """Solutions per ``generate`` call (prompt methods)."""
    seed: int = 0
    """Base seed; each batch reseeds from it, so every method sees the same random stream."""
    keep_texts: bool = False
    """Store every decoded solution in the result (large: up to n x max_new_tokens tokens per problem)."""

    def __post_init__(self):
        # YAML / command-line configs give each dataset as a mapping
        self.datasets = {k: MathDataset(**v) if isinstance(v, dict) else v for k, v in self.datasets.items()}


def problem_prompt_ids(tokenizer, problem: str, template: str, chat_template: bool = True) -> list[int]:
    """[P] prompt ids of one problem (one user turn of the chat template when used and available)."""
    if "{problem}" not in template:
        raise UserError(f"prompt_template needs a {{problem}} field, got {template!r}")
    text = template.format(problem=problem.strip())
    if chat_template and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return list(tokenizer(text)["input_ids"])


def _check(cfg: MathConfig) -> None:
    if not cfg.methods or not cfg.datasets:
        raise UserError("methods and datasets must not be empty")
    if not 1 <= cfg.k <= cfg.n:
        raise UserError(f"need 1 <= k <= n, got k={cfg.k}, n={cfg.n}")
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise UserError("max_new_tokens and batch_size must be >= 1")
    check_matched_run(cfg, "problem")


def run_math(cfg: MathConfig, progress: bool = True, merged_lm=None) -> dict:
    """Sample ``n`` solutions per problem with every method at the matched TR and grade them.

    Parameters
    ----------
    cfg : the run's settings.
    progress : show tqdm bars.
    merged_lm : an already loaded :class:`umim.inference.generation.MergedLM`; ``cfg.lm``, ``run_dir``,
        ``merger``, ``rules``, ``dtype`` and ``device`` are then ignored.

    Returns
    -------
    ``{"config", "results": {dataset: {method: {pass@1, pass@k, solved, n_solved, n_problems,
    target_tr, tr}}}, "problems": {dataset: [{answer, target_tr, per method: {correct, answers, tr}}]},
    "wall_s"}``; pass rates as fractions.
    """
    _check(cfg)
    t0 = time.perf_counter()
    m = cfg.load_run(merged_lm, need_merging=needs_merging(cfg.methods, cfg.match))
    tok = m.tokenizer
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                              top_p=cfg.top_p, seed=cfg.seed, eos_token_id=tok.eos_token_id)
    context = model_context(m.lm)
    results, problems = {}, {}
    for ds_name, ds in cfg.datasets.items():
        records = load_records(ds.data, ds.split, [ds.question_field, ds.answer_field], cfg.n_problems)
        prompts = [problem_prompt_ids(tok, r[ds.question_field], cfg.prompt_template, cfg.chat_template)
                   for r in records]
        longest = max(map(len, prompts))
        if context and longest + cfg.max_new_tokens > context:
            raise UserError(f"{ds_name}: a {longest}-token prompt + max_new_tokens={cfg.max_new_tokens} exceeds the "
                            f"model's context of {context}; lower max_new_tokens")
        refs = [r[ds.answer_field] for r in records]
        targets = match_targets(cfg.match, cfg.ratio, m, prompts)
        results[ds_name], rows = {}, [{"answer": a, "target_tr": t, "prompt_tokens": len(p)}
                                       for a, t, p in zip(refs, targets, prompts)]
        for name in tqdm(cfg.methods, desc=f"math {ds_name}", disable=not progress):
            gens = generate_matched(name, m, prompts, targets, sampling, n_samples=cfg.n, batch_size=cfg.batch_size,
                                    options=cfg.method_options.get(name), progress=progress)
            correct, trs = [], []
            for row, ref, g in zip(rows, refs, gens):
                texts = [tok.decode(s.ids, skip_special_tokens=True) for s in g]
                answers = [extract_boxed(t) for t in texts]
                ok = [answers_match(a, ref) for a in answers]
                row[name] = {"correct": ok, "answers": answers, "tr": g[0].tr, "new_tokens": [len(s.ids) for s in g]}
                if cfg.keep_texts:
                    row[name]["texts"] = texts
                correct.append(ok)
                trs.append(g[0].tr)
            asked = trs if method_class(name).fixed_tr else targets
            solved = sum(any(ok[: cfg.k]) for ok in correct)
            results[ds_name][name] = {
                "pass@1": sum(pass_at_k(cfg.n, sum(ok), 1) for ok in correct) / len(correct),
                f"pass@{cfg.k}": sum(pass_at_k(cfg.n, sum(ok), cfg.k) for ok in correct) / len(correct),
                "solved": f"{solved}/{len(correct)}", "n_solved": solved, "n_problems": len(correct),
                "target_tr": sum(asked) / len(asked), "tr": sum(trs) / len(trs)}
        problems[ds_name] = rows
    result = {"config": asdict(cfg), "results": results, "problems": problems, "wall_s": time.perf_counter() - t0}
    return result


def math_table(result: dict) -> str:
    """Table 6's shape: Methods | <dataset> Accuracy | TR (%) | ... (accuracy = solved count c/total;
    TR "–" for the uncompressed base LM)."""
    order = {"aime2024": 0, "amc2023": 1}
    names = sorted(result["results"], key=lambda d: (order.get(d, 2), d))
    shown = {"aime2024": "AIME 2024", "amc2023": "AMC 2023"}
    headers = ["Methods"] + [h for d in names for h in (f"{shown.get(d, d)} Accuracy", "TR (%)")]
    methods = list(dict.fromkeys(mn for d in names for mn in result["results"][d]))
    rows = []
    for mn in methods:
        row = [label(mn)]
        for d in names:
            r = result["results"][d].get(mn)
            row += ["–", "–"] if r is None else [r["solved"], "–" if mn == "base" else pct(r["tr"])]
        rows.append(row)
    return markdown_table(headers, rows)


NAME = "math"
"""Result file stem: the command writes ``out_dir/math.json`` and ``out_dir/math.md``."""
Config, run, table = MathConfig, run_math, math_table  # the names every runner exposes (umim_eval.cli)
