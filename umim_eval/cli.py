"""``umim-eval``: the evaluation command (subcommand dispatch).

Subcommands
-----------
``umim-eval ppl|gen-quality|summarize|math|compare|qa --config conf/eval/X.yaml [--field value ...]``
    One runner per paper table (:data:`RUNNERS`). Each reads its settings dataclass from a YAML
    config (unknown keys are errors) with command-line overrides, shows progress bars, writes
    ``OUT/NAME.json`` (everything) and ``OUT/NAME.md`` (the table), and prints the table.
``umim-eval lm-eval ARGS...``
    lm-evaluation-harness with the ``umim`` model registered: registers it
    (:func:`umim_eval.harness.lm_eval_hook.register`, which imports only lm-eval's light registry) and
    hands ``ARGS`` unchanged to lm-eval's own CLI main (``lm_eval.__main__.cli_evaluate``), so
    every lm-eval option works, e.g.::

        umim-eval lm-eval --model umim --model_args pretrained=embedded,run_dir=runs/default \\
            --tasks hellaswag --device cpu --batch_size 8 --output_path out/

    This route needs no start-up hook. Plain ``lm_eval --model umim`` works too when the
    ``umim-lm-eval.pth`` start-up hook is installed (see :mod:`umim_eval.harness.lm_eval_hook`).
``umim-eval install-lm-eval-hook [--site DIR]``
    Copy that ``.pth`` hook into site-packages (for installs that did not ship it, e.g. an
    editable install); ``--remove`` deletes it again.

Registration mechanism (why both): lm-eval 0.4 has no plugin/entry-point lookup for models;
``--model NAME`` must already be in ``lm_eval.api.registry.model_registry`` when the CLI runs. The
pass-through registers in-process; the ``.pth`` hook registers lazily whenever lm-eval's registry
is imported, at the cost of one tiny module at interpreter start-up (no torch, no lm-eval).
"""

from __future__ import annotations

import inspect
import os
import shutil
import sys
from dataclasses import dataclass

PTH_NAME = "umim-lm-eval.pth"

RUNNERS: dict[str, tuple[str, str]] = {
    # subcommand: (task module exposing Config, run, table and NAME; one line of help)
    "ppl": ("umim_eval.tasks.ppl", "perplexity + TR of base and merged LM per dataset (Table 2)"),
    "gen-quality": ("umim_eval.tasks.gen_quality",
                    "continuation quality: Rep/Dist, ROUGE, BERTScore, chrF, MAUVE (Tables 10, 11)"),
    "summarize": ("umim_eval.tasks.summarize", "CNN/DailyMail summarization at matched TR (Table 5)"),
    "math": ("umim_eval.tasks.math_reasoning", "AIME/AMC pass@k with prompt merging (Table 6)"),
    "compare": ("umim_eval.tasks.compare",
                "all methods at matched TR: continuation perplexity (UMIM vs baselines vs compressors)"),
    "qa": ("umim_eval.tasks.qa", "zero-shot multiple-choice QA through lm-eval at matched TR (Table 4)"),
    "recall": ("umim_eval.tasks.recall",
               "all methods at matched TR: recall of a sentence from anywhere in the context (NLL + accuracy)"),
}
"""Lazy table of the runners: importing the CLI imports none of them."""


def _task(command: str):
    import importlib

    return importlib.import_module(RUNNERS[command][0])


def parse_runner_config(command: str, argv: list[str]):
    """Settings dataclass of ``command`` from ``argv`` (``--config FILE`` and overrides)."""
    from umim.settings import parse_settings

    return parse_settings(_task(command).Config, argv, f"umim-eval {command}")


def _inputs_stamp(cfg) -> str:
    """A hash of the merger and rules files a run reads (its settings name only their paths)."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for folder in cfg.merging_paths():
        for name in ("config.json", "rules.json", "rules.safetensors"):
            f = Path(folder) / name if folder else None
            if f is not None and f.is_file():
                h.update(name.encode() + f.read_bytes())
    return h.hexdigest()


def save_results(command: str, result: dict, out_dir: str) -> dict:
    """Write ``out_dir/NAME.json`` (everything) and ``out_dir/NAME.md`` (the table) of a runner's
    result; the one place results are written. Returns the paths."""
    from .results import write_results

    mod = _task(command)
    return write_results(result, out_dir, mod.NAME, mod.table(result))


def run_command(command: str, argv: list[str]) -> int:
    """Parse, run, write JSON + markdown, print the table."""
    from dataclasses import asdict

    from umim.safe_io import check_writable_dir

    from .results import Journal

    cfg = parse_runner_config(command, argv)
    mod = _task(command)
    cfg.out_dir = cfg.out_dir or f"results/{mod.NAME}"
    check_writable_dir(cfg.out_dir)  # before any work, not after it
    settings = {**asdict(cfg), "inputs": _inputs_stamp(cfg)}  # retrained merger or re-mined rules: afresh
    journal = Journal(cfg.out_dir, mod.NAME, settings) if "journal" in inspect.signature(mod.run).parameters else None
    if journal is not None and journal.resumed:
        print(f"resuming: {journal.resumed} pieces already computed in {journal.path}", file=sys.stderr)
    result = mod.run(cfg, journal=journal) if journal is not None else mod.run(cfg)
    paths = save_results(command, result, cfg.out_dir)
    if journal is not None:
        journal.close()
    print(mod.table(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def lm_eval_main(argv: list[str]) -> int:
    """Run lm-eval's CLI with ``argv`` (without the program name) and ``umim`` registered."""
    from umim_eval.harness.lm_eval_hook import register

    if not register():
        print("umim-eval lm-eval: lm-eval is not installed (pip install 'lm-eval>=0.4,<0.5')", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's HarnessCLI parses sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as e:  # lm-eval's --help / usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0


def _site_dir() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def install_hook(site: str | None = None, remove: bool = False) -> str:
    """Copy (or remove) the start-up hook ``umim-lm-eval.pth`` in ``site`` (default: purelib)."""
    from umim_eval.harness.lm_eval_hook import pth_path

    folder = site or _site_dir()
    if not os.path.isdir(folder):
        from umim.errors import UserError

        raise UserError(f"--site {folder}: no such folder (give the site-packages folder of the environment)")
    dest = os.path.join(folder, PTH_NAME)
    if remove:
        if os.path.exists(dest):
            os.remove(dest)
    else:
        shutil.copyfile(pth_path(), dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``umim-eval COMMAND``; user errors are one line and exit code 2 (see ``umim.errors``)."""
    from umim.errors import cli_entry

    return cli_entry(_dispatch, list(sys.argv[1:] if argv is None else argv))


COMMANDS = {
    **{name: help_ for name, (_, help_) in RUNNERS.items()},
    "lm-eval": "lm-evaluation-harness with the `umim` model registered (all further arguments go to lm-eval)",
    "install-lm-eval-hook": "install the start-up hook so that plain `lm_eval --model umim` works",
}
"""Subcommand -> one line of help (``umim-eval --help``)."""


@dataclass
class HookConfig:
    """Install (or remove) the start-up hook so that plain ``lm_eval --model umim`` works."""

    site: str | None = None
    """site-packages folder (default: this interpreter's)."""
    remove: bool = False
    """Delete the hook instead."""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, help_ in COMMANDS.items()]
    return ("usage: umim-eval COMMAND [--config FILE.yaml] [--field value ...]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n`umim-eval COMMAND --help` lists the settings of a command.")


def _dispatch(argv: list[str]) -> int:
    from umim.errors import UserError
    from umim.settings import parse_settings

    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("lm-eval", "lm_eval"):
        return lm_eval_main(argv[1:])  # pass-through: no parsing of lm-eval's own options here
    if argv[0] in RUNNERS:
        return run_command(argv[0], argv[1:])
    if argv[0] == "install-lm-eval-hook":
        a = parse_settings(HookConfig, argv[1:], "umim-eval install-lm-eval-hook")
        path = install_hook(a.site, a.remove)
        print(("removed " if a.remove else "installed ") + path)
        return 0
    raise UserError(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")


if __name__ == "__main__":
    sys.exit(main())
