"""Generation at matched token reduction, shared by the summarization and math runners.

Every method (``base``, ``umim``, prompt compressors and mergers, KV policies) generates from the
same prompts, driven to per-prompt target TRs (:func:`match_targets`): prompt methods through
:func:`umim_eval.scoring.prompt_inputs.prompt_inputs` and Hugging Face ``generate``
(:func:`umim_eval.scoring.prompt_inputs.generate_from`), KV policies through
:func:`umim_eval.scoring.policy_generate.policy_generate_batch` with the ``prompt`` budget schedule
(only the prompt is reduced; every generated token adds one cache entry; each row at its own
target) — each method's
:meth:`~umim_eval.methods.base.Method.generate`. Also: loading records from the hub, a ``.jsonl``
file or a built-in offline set (:func:`load_records`).
"""

from __future__ import annotations

import json
from pathlib import Path

from umim.errors import UserError
from umim.inference.generation import MergedLM, SamplingConfig
from umim_eval.methods.base import Generated
from umim_eval.methods.registry import check_methods, make_method, method_class

MATCHES = ("per_example", "mean", "fixed")
"""How targets are set: UMIM's TR per prompt, UMIM's mean TR, or a fixed ``ratio``."""


class DataError(UserError):
    """An evaluation data set that is missing, malformed or too small."""


class DataFieldError(DataError, KeyError):
    """A record lacks a field the runner reads."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def load_records(data: str, split: str, fields: list[str], n: int | None = None) -> list[dict]:
    """The first ``n`` records of a hub dataset (``hf:PATH[:CONFIG]``) or a local ``.jsonl`` file,
    each reduced to ``fields`` (values as strings); ``local:NAME`` is a built-in offline set of
    :data:`umim_eval.harness.local_tasks.LOCAL_SETS`."""
    if data.startswith("local:"):
        from umim_eval.harness.local_tasks import LOCAL_SETS

        if data[6:] not in LOCAL_SETS:
            raise DataError(f"unknown local data set {data!r}; choose from {['local:' + k for k in LOCAL_SETS]}")
        rows = LOCAL_SETS[data[6:]](n)
    elif data.startswith("hf:"):
        import datasets

        path, _, config = data[3:].partition(":")
        ds = datasets.load_dataset(path, config or None, split=split)
        rows = ds.select(range(min(n, len(ds)))) if n is not None else ds
    else:
        p = Path(data)
        if not p.is_file():
            raise DataError(f"no data file {data!r} (use hf:PATH[:CONFIG] for hub datasets)")
        rows = []
        with open(p, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{data}:{ln}: not a JSON line ({e.msg})") from e
        rows = rows[:n] if n is not None else rows
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"record {i} of {data} is not a JSON object")
        missing = [k for k in fields if k not in r]
        if missing:
            raise DataFieldError(f"record {i} of {data} has no field(s) {missing}; it has {sorted(r)}")
        out.append({k: str(r[k]) for k in fields})
    if not out:
        raise DataError(f"{data} holds no records")
    if n is not None and len(out) < n:
        raise DataError(f"{data} holds {len(out)} records, {n} were asked for: lower n_samples")
    return out


def needs_merging(methods, match: str) -> str | None:
    """What in a matched run needs UMIM's merger and rules (None: nothing)."""
    uses = [n for n in methods if method_class(n).uses_merging]
    if uses:
        return f"method {uses[0]!r}"
    return f'match="{match}" (or use match="fixed" with ratio)' if match != "fixed" else None


def check_match(match: str, ratio: float | None) -> None:
    if match not in MATCHES:
        raise UserError(f"unknown match {match!r}; choose from {MATCHES}")
    if match == "fixed" and (ratio is None or not 0.0 <= float(ratio) < 1.0):
        raise UserError(f'match="fixed" needs ratio in [0, 1), got {ratio!r}')


def check_matched_run(cfg, field: str) -> None:
    """What every matched-TR generation runner (summarize, math) checks before loading a model: its
    ``match``/``ratio``, that ``prompt_template`` holds ``{field}``, and its methods."""
    check_match(cfg.match, cfg.ratio)
    if "{" + field + "}" not in cfg.prompt_template:
        raise UserError(f"prompt_template needs a {{{field}}} field, got {cfg.prompt_template!r}")
    check_methods(cfg.methods, cfg.method_options)


def match_targets(match: str, ratio: float | None, m: MergedLM, prompts: list[list[int]]) -> list[float]:
    """Per prompt, the TR every method is driven to (see the module docstring)."""
    check_match(match, ratio)
    if match == "fixed":
        return [float(ratio)] * len(prompts)
    m.require_merging(f'match="{match}" (or use match="fixed" with ratio)')
    trs = [m.token_reduction(p) for p in prompts]  # the segmentation UMIMMerge uses, nothing embedded
    return trs if match == "per_example" else [sum(trs) / len(trs)] * len(prompts)


def generate_matched(name: str, m: MergedLM, prompts: list[list[int]], targets: list[float],
                     sampling: SamplingConfig, n_samples: int = 1, batch_size: int = 1, options: dict | None = None,
                     kv_prefill: str = "full", progress: bool = True) -> list[list[Generated]]:
    """Generate ``n_samples`` texts per prompt with method ``name`` driven to ``targets``.

    Parameters
    ----------
    name : a method name of :mod:`umim_eval.methods.registry` or ``"base"``.
    m : the target LM and tokenizer (and merger + rules for ``umim``).
    prompts : N prompts, token ids of ``m.tokenizer``.
    targets : [N] target TR of each prompt (ignored by ``base`` and fixed-rule ``umim``).
    sampling : decoding settings; with ``do_sample`` and a ``seed``, the RNG is reseeded per batch
        (``seed + k`` for the batch starting at text k), so methods see the same random stream.
    n_samples : texts per prompt (pass@k needs several).
    batch_size : texts per ``generate`` call (prompt methods) or per batched decode under eviction
        (KV policies, :meth:`~umim_eval.methods.base.KVPolicy.generate`).
    options : extra constructor options of the method.
    kv_prefill : prefill of KV policies, see :func:`~umim_eval.scoring.policy_generate.policy_generate_batch`.

    Returns
    -------
    [N][n_samples] :class:`Generated`.
    """
    if len(targets) != len(prompts):
        raise UserError(f"{len(prompts)} prompts but {len(targets)} targets")
    # built once (a compressor may load a model), then re-aimed per prompt through its ratio knob
    method = make_method(name, 0.0, merged_lm=m, **dict(options or {}))
    return method.generate(m, prompts, targets, sampling, n_samples=n_samples, batch_size=batch_size,
                           kv_prefill=kv_prefill, progress=progress)
