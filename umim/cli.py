"""The ``umim`` command: ``fit``/``validate``/``test`` (LightningCLI) and ``mine``."""

from __future__ import annotations

import argparse
import sys
import time

from lightning.pytorch.cli import LightningCLI

from .datamodule import UMIMDataModule
from .distillation import UMIMDistillation


class UMIMCLI(LightningCLI):
    """LightningCLI with the LM spec shared between model and data (one place in the config)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.lm", "data.lm", apply_on="parse")


def mine_main(argv: list[str]) -> int:
    """``umim mine``: mine merge rules from a corpus and save them."""
    from .corpus import load_documents, tokenize_documents
    from .fingerprint import tokenizer_fingerprint
    from .lm import LMSpec, load_tokenizer
    from .mining import FILTER_STAGES, MiningError, mine_rules

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
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    tok = load_tokenizer(LMSpec(a.tokenizer, a.gguf_file))
    ids, offsets = tokenize_documents(load_documents(a.data, a.split), tok)
    t1 = time.perf_counter()
    try:
        rules = mine_rules(
            ids, offsets, tokenizer_fingerprint(tok), a.min_count, a.min_n, a.max_n,
            [] if a.no_filter else a.filters, corpus=f"{a.data}:{a.split}",
        )
    except MiningError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t2 = time.perf_counter()
    rules.save(a.out)
    print(f"tokens scanned: {rules.tokens_scanned:,} ({len(offsets) - 1:,} documents)")
    print(f"filters: {rules.filters or 'none'}; tau = {rules.min_count}")
    for n, k in rules.num_rules().items():
        removed = ", ".join(f"-{d.get(n, 0):,} by {s}" for s, d in rules.removed_by_filter.items())
        print(f"  {n}-grams: {k:,}" + (f" ({removed})" if removed else ""))
    print(f"wall time: tokenize {t1 - t0:.1f} s, count+filter {t2 - t1:.2f} s; saved to {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int | None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "mine":
        return mine_main(args[1:])
    UMIMCLI(
        UMIMDistillation,
        UMIMDataModule,
        args=None if argv is None else args,  # None: LightningCLI reads sys.argv itself
        save_config_kwargs={"overwrite": True},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
