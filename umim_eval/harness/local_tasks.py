"""Offline multiple-choice tasks for lm-eval, built from real local text.

No QA benchmark ships with a package here (PIQA, ARC, ... load from the hub), so the offline QA
run uses a *sentence cloze* task made from any corpus spec: the context is the opening sentences
of a document, the correct choice is the sentence that follows, and the distractors are
sentences drawn from other documents (seeded). It exercises the same lm-eval path as the paper's
QA tasks (``multiple_choice``, lowest loss wins) on real English.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from umim.errors import UserError
from umim.rules.corpus import load_documents

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def cloze_examples(spec: str, split: str = "test", n: int = 200, n_choices: int = 4, min_context_words: int = 20,
                   seed: int = 0) -> list[dict]:
    """Up to ``n`` examples ``{"question", "choices", "label"}`` from ``spec``'s documents."""
    rng = random.Random(seed)
    docs = [[s.strip() for s in _SENT.split(" ".join(d.split())) if s.strip()] for d in load_documents(spec, split)]
    pool = [(i, s) for i, d in enumerate(docs) for s in d if 4 <= len(s.split()) <= 40]
    out = []
    for i, sents in enumerate(docs):
        for k in range(1, len(sents)):
            context = " ".join(sents[:k])
            if len(context.split()) >= min_context_words and 4 <= len(sents[k].split()) <= 40:
                break
        else:
            continue
        others = [s for j, s in rng.sample(pool, min(len(pool), 8 * n_choices)) if j != i and s != sents[k]]
        if len(others) < n_choices - 1:
            continue
        choices = others[: n_choices - 1]
        label = rng.randrange(n_choices)
        choices.insert(label, sents[k])
        out.append({"question": context, "choices": choices, "label": label})
        if len(out) == n:
            break
    if not out:
        raise UserError(f"{spec}:{split} has no document with {min_context_words}+ words before a next sentence")
    return out


def write_cloze_task(out_dir: str | Path, spec: str, split: str = "test", n: int = 200, seed: int = 0) -> str:
    """Write ``cloze_<name>.yaml`` + its jsonl under ``out_dir``; returns the task name.

    Pass ``out_dir`` to lm-eval as ``--include_path`` (or :class:`lm_eval.tasks.TaskManager`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "cloze_" + re.sub(r"[^a-z0-9]+", "_", Path(spec).stem.lower()).strip("_")
    data = out / f"{name}.jsonl"
    rows = cloze_examples(spec, split, n, seed=seed)
    if len(rows) < n:  # said, not silent: the table's accuracy is over fewer questions than asked
        print(f"warning: {spec}:{split} yields {len(rows)} cloze questions, {n} were asked", file=sys.stderr)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data.resolve()}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
""")
    return name


# -- offline stand-ins for CNN/DM and AIME/AMC (``data: local:NAME`` in the runner configs) -------------
def pydoc_lead_summaries(n: int | None = None) -> list[dict]:
    """Lead-sentence summarization from Python's help topics: ``highlights`` is a topic's first
    sentence, ``article`` the rest of the topic (the "lead" baseline turned into a reference, as
    CNN/DM highlights restate an article's lead)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        body = [ln for ln in topics[key].splitlines()[1:] if set(ln.strip()) - set("*=-")]  # drop the title
        sents = _SENT.split(" ".join(" ".join(body).split()))
        if len(sents) >= 4 and 6 <= len(sents[0].split()) <= 60:
            out.append({"article": " ".join(sents[1:]), "highlights": sents[0]})
    return out[:n] if n is not None else out


def arithmetic_problems(n: int | None = 30, seed: int = 0) -> list[dict]:
    """Small word problems with integer answers (``problem``, ``answer``): exercises the math
    runner's prompting, sampling, ``\\boxed{}`` extraction and pass@k offline."""
    rng = random.Random(seed)
    out = []
    for _ in range(30 if n is None else n):
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        kind = rng.randrange(3)
        if kind == 0:
            q, ans = f"A shelf holds {a} books and {b} more are added. How many books are on the shelf?", a + b
        elif kind == 1:
            q, ans = f"Each of {c} boxes holds {a} pens. How many pens are there in all?", a * c
        else:
            q, ans = f"Sam had {a + b} marbles and gave away {b}. How many marbles does Sam have left?", a
        out.append({"problem": q, "answer": str(ans)})
    return out


LOCAL_SETS = {"pydoc_lead": pydoc_lead_summaries, "arithmetic": arithmetic_problems}
"""``local:NAME`` data specs of the summarization and math runners."""
