"""The ``umim`` command: ``fit``/``validate``/``test`` (LightningCLI), ``mine`` and ``generate``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

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
    if names_model_class(argv):
        return cli_class(None, None, subclass_mode_model=True, subclass_mode_data=True, args=args, **kwargs)
    return cli_class(UMIMDistillation, UMIMDataModule, args=args, **kwargs)


def mine_main(argv: list[str]) -> int:
    """``umim mine``: mine merge rules from a corpus and save them (user errors: one line, exit 2)."""
    from umim.errors import cli_entry

    return cli_entry(_mine, argv)


def _mine(argv: list[str]) -> int:
    from umim.fingerprint import tokenizer_fingerprint
    from umim.lm import LMSpec, load_tokenizer
    from umim.rules.corpus import load_documents, tokenize_documents
    from umim.rules.mining import FILTER_STAGES, mine_rules
    from umim.rules.store import is_rules_dir
    from umim.safe_io import check_replaceable

    p = argparse.ArgumentParser(prog="umim mine", description="Mine frequent n-gram merge rules from a corpus.")
    p.add_argument("--tokenizer", required=True, help='hub id, local folder, or "embedded" (offline SmolLM2)')
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --tokenizer")
    p.add_argument("--data", required=True, help="corpus spec: hf:PATH[:CONFIG], pydoc, fortunes, file/dir/glob")
    p.add_argument("--split", default="train")
    p.add_argument("--min-count", type=int, default=5, help="frequency threshold tau (paper: 5)")
    p.add_argument("--min-n", type=int, default=2)
    p.add_argument("--max-n", type=int, default=4)
    p.add_argument("--filters", nargs="*", default=list(FILTER_STAGES), choices=FILTER_STAGES,
                   help="overlap filter stages (default: intra inter, as in the paper)")
    p.add_argument("--no-filter", action="store_true", help="keep every candidate (same as --filters with none)")
    p.add_argument("--out", required=True, help="output directory (rules.json + rules.safetensors)")
    p.add_argument("--model-prob", type=float, default=None, metavar="THRESHOLD",
                   help="mine model-probability (CD-LM, App. G.4) rules instead: spans whose tokens the LM "
                        "predicts with p > THRESHOLD (paper: 0.5); --tokenizer names the LM. --min-count "
                        "then defaults to 1 and --filters to none")
    p.add_argument("--max-tokens", type=int, default=0, help="use only the first N corpus tokens (0 = all)")
    a = p.parse_args(argv)
    if a.max_tokens < 0:
        p.error(f"--max-tokens {a.max_tokens}: give 0 (all tokens) or a positive count")
    if not a.out.strip():
        p.error("--out: give the folder to write the rules to")
    check_replaceable(a.out, is_rules_dir, "rules")  # before any work
    if a.model_prob is not None:
        return _mine_model_prob(a, argv)

    t0 = time.perf_counter()
    tok = load_tokenizer(LMSpec(a.tokenizer, a.gguf_file))
    ids, offsets = _head(*tokenize_documents(load_documents(a.data, a.split), tok), a.max_tokens)
    t1 = time.perf_counter()
    rules = mine_rules(
        ids, offsets, tokenizer_fingerprint(tok), a.min_count, a.min_n, a.max_n,
        [] if a.no_filter else a.filters, corpus=f"{a.data}:{a.split}",
    )
    t2 = time.perf_counter()
    rules.save(a.out)
    print(f"tokens scanned: {rules.tokens_scanned:,} ({len(offsets) - 1:,} documents)")
    print(f"filters: {rules.filters or 'none'}; tau = {rules.min_count}")
    for n, k in rules.num_rules().items():
        removed = ", ".join(f"-{d.get(n, 0):,} by {s}" for s, d in rules.removed_by_filter.items())
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


def _mine_model_prob(a, argv: list[str]) -> int:
    """``umim mine --model-prob T``: one batched forward per block of the corpus."""
    from umim.lm import LMSpec, load_lm, load_tokenizer
    from umim.rules.corpus import load_documents, tokenize_documents
    from umim.rules.prob_rules import mine_model_prob_rules

    spec = LMSpec(a.tokenizer, a.gguf_file)
    t0 = time.perf_counter()
    tok, lm = load_tokenizer(spec), load_lm(spec)
    ids, offsets = _head(*tokenize_documents(load_documents(a.data, a.split), tok), a.max_tokens)
    min_count = a.min_count if "--min-count" in argv else 1
    filters = a.filters if "--filters" in argv else []
    rules = mine_model_prob_rules(lm, tok, ids, offsets, threshold=a.model_prob, min_n=a.min_n, max_n=a.max_n,
                                  min_count=min_count, filters=[] if a.no_filter else filters,
                                  corpus=f"{a.data}:{a.split}")
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
    from umim.errors import cli_entry

    return cli_entry(_generate, argv)


def _generate(argv: list[str]) -> int:
    import json
    from pathlib import Path

    from umim.inference.generation import MODES, MergedLM, SamplingConfig
    from umim.lm import LMSpec

    p = argparse.ArgumentParser(prog="umim generate", description="Generate text with UMIM merging.")
    p.add_argument("--model", default="embedded", help='hub id, local folder, or "embedded" (default)')
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="LM weights dtype")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when available, else CPU)")
    p.add_argument("--run-dir", default="runs/default", help="training output with merger/ and rules/ (default run)")
    p.add_argument("--merger", default=None, help="merger folder (default: RUN_DIR/merger)")
    p.add_argument("--rules", default=None, help="rules folder (default: RUN_DIR/rules)")
    p.add_argument("--merge", choices=MODES, default="dynamic")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], type=_unescape,
                   help=r"stop string (repeatable); \n, \t, \r and \\ are read as escapes, so --stop '\n\n' works")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)

    merger, rules = a.merger, a.rules
    if a.merge != "none":
        merger = merger or str(Path(a.run_dir) / "merger")
        rules = rules or str(Path(a.run_dir) / "rules")
        for what, path in (("merger", merger), ("rules", rules)):
            if not Path(path).exists():
                hint = " Run `umim fit --config conf/default.yaml` first." if a.run_dir == "runs/default" else ""
                print(f"error: no {what} at {path}.{hint} (or pass --{what}, or --merge none)", file=sys.stderr)
                return 2
    model = MergedLM.load(LMSpec(a.model, a.gguf_file, a.dtype), merger=merger if a.merge != "none" else None,
                          rules=rules if a.merge != "none" else None, device=a.device)
    cfg = SamplingConfig(max_new_tokens=a.max_new_tokens, do_sample=a.do_sample, temperature=a.temperature,
                         top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop_strings=a.stop)
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

    from umim.errors import UserError

    for i, a in enumerate(args):
        path = a.partition("=")[2] if a.startswith("--ckpt_path=") else (args[i + 1] if a == "--ckpt_path" and
                                                                           i + 1 < len(args) else None)
        if path is None or path in ("last", "best", "hpc", "registry") or path.startswith("registry:"):
            continue
        if not Path(path).is_file():
            raise UserError(f"--ckpt_path {path}: no such checkpoint file (or use --ckpt_path last)")
        if not zipfile.is_zipfile(path):
            raise UserError(f"--ckpt_path {path}: truncated or not a checkpoint written by umim fit")


def _dispatch(args: list[str]) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if args and args[0] == "mine":
        return mine_main(args[1:])
    if args and args[0] == "generate":
        return generate_main(args[1:])
    _check_ckpt_path(args)
    try:
        build_cli(args)
    except SIGTERMException:
        return 143  # interrupted (SIGTERM or Ctrl+C): last.ckpt was saved, resume with --ckpt_path last
    return 0


def main(argv: list[str] | None = None) -> int:
    """``umim fit|validate|test|mine|generate``; user errors are one line and exit code 2 (see ``umim.errors``)."""
    from umim.errors import cli_entry

    return cli_entry(_dispatch, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
