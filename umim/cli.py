"""The ``umim`` command: ``fit``/``validate``/``test`` (LightningCLI), ``mine``, ``generate``, and
``score-rules``/``select-rules`` (:mod:`umim.rules.cost`).

One mechanism for all of them: jsonargparse (LightningCLI's parser; :mod:`umim.settings` for the
settings dataclasses of ``mine`` and ``generate``), so every command takes ``--config FILE.yaml``
and ``--field value`` overrides.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lightning.pytorch.cli import LightningCLI

from umim.errors import UserError, cli_entry
from umim.inference.loading import ModelArgs
from umim.rules.mining import FILTER_STAGES
from umim.settings import parse_settings
from umim.training.datamodule import UMIMDataModule
from umim.training.distillation import UMIMDistillation


class UMIMCLI(LightningCLI):
    """LightningCLI with the LM spec shared between model and data (one place in the config)."""

    def add_arguments_to_parser(self, parser) -> None:
        if self.subclass_mode_model:  # model and data picked by class_path (e.g. conf/ktoken.yaml)
            parser.link_arguments("model.init_args.lm", "data.init_args.lm", apply_on="parse")
        else:
            parser.link_arguments("model.lm", "data.lm", apply_on="parse")


def names_model_class(args: list[str]) -> bool:
    """True when the command line or one of its ``--config`` files picks the LightningModule by
    ``class_path`` (e.g. ``conf/ktoken.yaml``); UMIM's own configs give UMIMDistillation's settings."""
    import yaml

    configs = []
    for i, a in enumerate(args):
        if a in ("--model", "--model.class_path") or a.startswith(("--model=", "--model.class_path=")):
            return True
        if a in ("--config", "-c") and i + 1 < len(args):
            configs.append(args[i + 1])
        elif a.startswith("--config="):
            configs.append(a.partition("=")[2])
    for path in configs:
        try:
            cfg = yaml.safe_load(Path(path).read_text())
        except OSError:
            continue  # LightningCLI reports the missing file itself
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and "class_path" in cfg["model"]:
            return True
    return False


def build_cli(args: list[str] | None, cli_class: type[UMIMCLI] = UMIMCLI, **kwargs) -> UMIMCLI:
    """The ``umim fit/validate/test`` CLI for ``args`` (None: ``sys.argv``).

    Configs without a model ``class_path`` train UMIM (:class:`UMIMDistillation` +
    :class:`UMIMDataModule`, their settings given directly). A config that names its model and data
    by ``class_path`` (another compressor, e.g. ``umim.ktoken.training.KTokenDistillation``) is parsed
    in subclass mode.
    """
    argv = sys.argv[1:] if args is None else list(args)
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    with warnings.catch_warnings():
        # `umim` hands LightningCLI the argv it dispatched on; Lightning warns whenever both are set.
        # LightningCLI runs the whole command inside its constructor, so this filter (of that one
        # message) spans the fit
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        if names_model_class(argv):
            return cli_class(None, None, subclass_mode_model=True, subclass_mode_data=True, args=args, **kwargs)
        return cli_class(UMIMDistillation, UMIMDataModule, args=args, **kwargs)


COMMANDS = {
    "fit": "train a merger (distillation; LightningCLI: umim fit --config conf/default.yaml)",
    "validate": "validation loss and alignment of a trained checkpoint (LightningCLI)",
    "test": "test-split alignment of a trained checkpoint (LightningCLI)",
    "mine": "mine frequent n-gram merge rules from a corpus",
    "generate": "generate text with no, prompt or dynamic merging",
    "score-rules": "measure each rule's firing rate and the KL its merges cause (costs.json beside the rules)",
    "select-rules": "keep the cheapest rules by measured cost up to a target TR (a new rules folder)",
}
"""Subcommand -> one line of help (``umim --help``)."""


@dataclass
class MineConfig:
    """Mine frequent n-gram merge rules from a corpus."""

    tokenizer: str
    """Hub id, local folder, or "embedded" (offline SmolLM2)."""
    data: str
    """Corpus spec: hf:PATH[:CONFIG], pydoc, fortunes, file/dir/glob."""
    out: str
    """Output folder (rules.json + rules.safetensors)."""
    gguf_file: str | None = None
    """GGUF file inside ``tokenizer``."""
    split: str = "train"
    """Split of ``data``."""
    min_count: int | None = None
    """Frequency threshold tau (default 5, the paper's; 1 with ``model_prob``)."""
    min_n: int = 2
    """Shortest rule n-gram."""
    max_n: int = 4
    """Longest rule n-gram."""
    filters: list[Literal["intra", "inter"]] | None = None
    """Overlap filter stages (default: intra inter, as in the paper; none with ``model_prob``)."""
    no_filter: bool = False
    """Keep every candidate (same as an empty ``filters``)."""
    model_prob: float | None = None
    """Mine model-probability (CD-LM, App. G.4) rules instead: spans whose tokens the LM predicts with
    p > THRESHOLD (paper: 0.5); ``tokenizer`` names the LM."""
    max_tokens: int = 0
    """Use only the whole documents within the first N corpus tokens (0 = all)."""

    def __post_init__(self):
        if self.max_tokens < 0:
            raise UserError(f"--max_tokens {self.max_tokens}: give 0 (all tokens) or a positive count")
        if not self.out.strip():
            raise UserError("--out: give the folder to write the rules to")
        if self.min_count is None:
            self.min_count = 1 if self.model_prob is not None else 5
        if self.no_filter or self.filters is None:
            self.filters = [] if self.no_filter or self.model_prob is not None else list(FILTER_STAGES)


@dataclass
class GenerateConfig(ModelArgs):
    """Generate text with UMIM merging."""

    prompt: str | None = None
    """The prompt text (required)."""
    run_dir: str | None = "runs/default"
    """A ``umim fit`` output folder holding ``merger/`` and ``rules/`` (default: the default run)."""
    merge: Literal["none", "prompt", "dynamic"] = "dynamic"
    """Merging: none, prompt (merged prompt) or dynamic (prompt + online merging with KV rollback)."""
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    """Stop strings; \\n, \\t, \\r and \\\\ are read as escapes, so --stop '\\n\\n' works."""
    json: bool = False
    """Print one JSON object."""

    def __post_init__(self):
        if self.prompt is None:
            raise UserError("--prompt: give the text to continue")


def mine_main(argv: list[str]) -> int:
    """``umim mine``: mine merge rules from a corpus and save them (user errors: one line, exit 2)."""
    return cli_entry(_mine, argv)


def _mine(argv: list[str]) -> int:
    import tempfile

    from .fingerprint import tokenizer_fingerprint
    from .lm import LMSpec, load_tokenizer
    from .rules.corpus import tokenized_shards
    from .rules.mining import mine_rules_sharded
    from .rules.store import is_rules_dir
    from .safe_io import check_replaceable

    a = parse_settings(MineConfig, argv, "umim mine", legacy=True)
    check_replaceable(a.out, is_rules_dir, "rules")  # before any work
    if a.model_prob is not None:
        return _mine_model_prob(a)

    t0 = time.perf_counter()
    tok = load_tokenizer(LMSpec(a.tokenizer, a.gguf_file))
    with tempfile.TemporaryDirectory(prefix="umim-mine-") as tmp:  # token shards: the corpus need not fit in memory
        shards, num_docs = tokenized_shards(a.data, a.split, tok, Path(tmp), a.max_tokens)
        t1 = time.perf_counter()
        rules = mine_rules_sharded(shards, tokenizer_fingerprint(tok), a.min_count, a.min_n, a.max_n, a.filters,
                                   corpus=f"{a.data}:{a.split}")
    t2 = time.perf_counter()
    rules.save(a.out)
    print(f"tokens scanned: {rules.tokens_scanned:,} ({num_docs:,} documents, {len(shards)} shard(s))")
    print(f"filters: {rules.filters or 'none'}; tau = {rules.min_count}")
    for n, k in rules.num_rules().items():
        # what each stage changed: rules the final set would hold without it but does not (0 if subsumed)
        removed = ", ".join(f"-{d.get(n, 0):,} by {s}" for s, d in rules.marginal_by_filter.items())
        print(f"  {n}-grams: {k:,}" + (f" ({removed})" if removed else ""))
    print(f"wall time: tokenize {t1 - t0:.1f} s, count+filter {t2 - t1:.2f} s; saved to {a.out}")
    return 0


def _head(ids, offsets, max_tokens: int):
    """The whole documents within the first ``max_tokens`` tokens (at least one document; 0 = all)."""
    import numpy as np

    if not max_tokens:
        return ids, offsets
    keep = int(np.searchsorted(offsets, max_tokens, side="right"))
    offsets = offsets[: max(keep, 2)]
    return ids[: offsets[-1]], offsets


def _mine_model_prob(a: MineConfig) -> int:
    """``umim mine --model_prob T``: one batched forward per block of the corpus."""
    from .lm import LMSpec, load_lm, load_tokenizer
    from .rules.corpus import load_documents, tokenize_documents
    from .rules.prob_rules import mine_model_prob_rules

    spec = LMSpec(a.tokenizer, a.gguf_file)
    t0 = time.perf_counter()
    tok, lm = load_tokenizer(spec), load_lm(spec)
    ids, offsets = _head(*tokenize_documents(load_documents(a.data, a.split), tok), a.max_tokens)
    rules = mine_model_prob_rules(lm, tok, ids, offsets, threshold=a.model_prob, min_n=a.min_n, max_n=a.max_n,
                                  min_count=a.min_count, filters=a.filters, corpus=f"{a.data}:{a.split}")
    rules.save(a.out)
    print(f"model-probability rules (p > {a.model_prob}) from {len(ids):,} tokens: "
          + ", ".join(f"{n}-grams {k:,}" for n, k in rules.num_rules().items()))
    print(f"wall time {time.perf_counter() - t0:.1f} s; saved to {a.out}")
    return 0


def _unescape(text: str) -> str:
    """Shell arguments cannot carry a newline conveniently: read \\n, \\t, \\r and \\\\ as escapes."""
    import re

    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def generate_main(argv: list[str]) -> int:
    """``umim generate``: decode with no, prompt or dynamic merging (user errors: one line, exit 2)."""
    return cli_entry(_generate, argv)


def _generate(argv: list[str]) -> int:
    import json

    from .hub import is_local
    from .inference.generation import SamplingConfig

    a = parse_settings(GenerateConfig, argv, "umim generate", aliases={"model": "lm"}, legacy=True)
    if a.merge != "none":  # a missing local run is named before the LM loads (hub ids are fetched by the loader)
        hint = " Run `umim fit --config conf/default.yaml` first." if a.run_dir == "runs/default" else ""
        for what, path in zip(("merger", "rules"), a.merging_paths()):
            if path is None or (is_local(path) and not Path(path).exists()):
                raise UserError(f"no {what} at {path}.{hint} (or pass --{what}, or --merge none)")
    model = a.load(merging=a.merge != "none")
    cfg = SamplingConfig(max_new_tokens=a.max_new_tokens, do_sample=a.do_sample, temperature=a.temperature,
                         top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop_strings=[_unescape(s) for s in a.stop])
    r = model.generate(a.prompt, a.merge, cfg)[0]
    if a.json:
        print(json.dumps(r.to_json()))
        return 0
    seq = r.prompt_ids + r.generated_ids
    pieces = []
    for s, n in r.segments:
        text = model.tokenizer.decode(seq[s : s + n])
        pieces.append(f"[{text}]" if n > 1 else text)
        if s + n == r.prompt_len:
            pieces.append(" ||| ")
    print("".join(pieces))
    print(f"\n[merged spans in brackets; ||| ends the prompt] prompt {r.prompt_len} -> {r.prompt_len_merged} "
          f"positions; KV cache {r.kv_len_final} of {r.kv_len_unmerged} entries "
          f"(TR {100 * r.token_reduction:.1f}%); stop: {r.stop_reason}")
    return 0


def _check_ckpt_path(args: list[str]) -> None:
    """A ``--ckpt_path FILE`` that is missing or not a checkpoint is named in one line, before any work
    (torch would report a truncated file as "OSError: Invalid argument" after the model has loaded)."""
    import zipfile

    for i, a in enumerate(args):
        path = a.partition("=")[2] if a.startswith("--ckpt_path=") else (args[i + 1] if a == "--ckpt_path" and
                                                                           i + 1 < len(args) else None)
        if path is None or path in ("last", "best", "hpc", "registry") or path.startswith("registry:"):
            continue
        if not Path(path).is_file():
            raise UserError(f"--ckpt_path {path}: no such checkpoint file (or use --ckpt_path last)")
        if not zipfile.is_zipfile(path):
            raise UserError(f"--ckpt_path {path}: truncated or not a checkpoint written by umim fit")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, help_ in COMMANDS.items()]
    return "usage: umim COMMAND [--config FILE.yaml] [--field value ...]\n\ncommands:\n" + "\n".join(lines) + (
        "\n\n`umim COMMAND --help` lists the settings of a command.")


def _dispatch(args: list[str]) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] not in COMMANDS:
        raise UserError(f"unknown command {args[0]!r}; choose from {', '.join(COMMANDS)}")
    if args[0] == "mine":
        return mine_main(args[1:])
    if args[0] == "generate":
        return generate_main(args[1:])
    if args[0] in ("score-rules", "select-rules"):
        from .rules.cost import score_rules_main, select_rules_main

        return (score_rules_main if args[0] == "score-rules" else select_rules_main)(args[1:])
    _check_ckpt_path(args)
    try:
        build_cli(args)
    except SIGTERMException:
        return 143  # interrupted (SIGTERM or Ctrl+C): last.ckpt was saved, resume with --ckpt_path last
    return 0


def main(argv: list[str] | None = None) -> int:
    """``umim fit|validate|test|mine|generate``; user errors are one line and exit code 2 (see ``umim.errors``)."""
    return cli_entry(_dispatch, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
