"""Training-recipe sweep: `umim fit` variants under one wall budget, compared by held-out KL over wall time.

Each variant is the base config (default conf/default.yaml) plus command-line overrides. Each runs as
its own `umim fit` subprocess, one at a time, with the same seed and the same wall budget
(``--trainer.max_time``), into OUT/<variant>/. The end-of-training export and report callback is
dropped, because the sweep needs only the validation curve. Every override is parsed against the
real CLI before the first run. When a run ends, its curve is appended to OUT/results.jsonl: held-out
KL (``val/loss``) and top-1 against optimizer steps and training wall time, read from the columns
that umim.training.timing.WallTime writes to metrics.csv. At the end, a table compares the variants,
including val/loss interpolated at equal training wall times.

Usage::

    python benchmarks/recipe_sweep.py --out runs/sweep --budget 00:00:10:00 --variants baseline,lr2x,block128
    python benchmarks/recipe_sweep.py --out runs/sweep --variants baseline --variant wd0='--model.weight_decay 0'
    python benchmarks/recipe_sweep.py --curve runs/default     # a run's learning curve as a markdown table

The budget covers training and its validations (Lightning's max_time starts when training starts).
The wall times in the tables are training only (validation excluded). The LR schedule still spans
the config's max_steps, so a budget shorter than those steps cuts the schedule short in every variant
alike.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from umim.errors import UserError, cli_entry, one_line
from umim.safe_io import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
MARKER = "sweep.json"  # what makes a folder a sweep folder of this script
FORMAT = "umim-recipe-sweep"
RUN_CONFIG = "sweep_config.yaml"  # what makes a subfolder one of this script's runs
RESERVED = (MARKER, "results.jsonl", "summary.md")  # the sweep folder's own files: no variant may be named so

VARIANTS: dict[str, tuple[list[str], str]] = {
    "baseline": ([], "the config as it is"),
    "lr2x": (["--model.lr", "3.2e-3"], "lr 3.2e-3 (2x conf/default.yaml's)"),
    "lr_half": (["--model.lr", "8e-4"], "lr 8e-4 (0.5x conf/default.yaml's, the paper's)"),
    "no_clip": (["--trainer.gradient_clip_val", "null"], "no gradient clipping (conf/default.yaml clips at 1.0)"),
    "warmup20": (["--model.warmup_ratio", "0.2"], "schedule: 20% warmup (conf/default.yaml: 5%)"),
    "sched_half": (["--trainer.max_steps", "75"],
                   "schedule: cosine over 75 steps, ends there (conf/default.yaml: 150)"),
    "block128": (["--data.block_size", "128", "--data.batch_size", "4"],
                 "4 blocks of 128 tokens per batch (conf/default.yaml: 2 of 256)"),
    "batch4": (["--data.batch_size", "4"], "4 blocks per step (2x conf/default.yaml's)"),
    "token_processor": (["--model.merger.token_processor", "true"], "per-token MLP before pooling"),
    "span_positions": (["--model.merger.span_positions", "true"], "tokens' distance from the span end known"),
    "heads8": (["--model.merger.num_heads", "8"], "merger with 8 attention heads"),
    "heads2": (["--model.merger.num_heads", "2"], "merger with 2 attention heads"),
    "rules_intra": (["--data.mining.filters", "[intra]"], "rules without the inter filter (more merges)"),
    "tau10": (["--data.mining.min_count", "10"], "rules seen >= 10 times (fewer merges)"),
    "corpus_quarter": (["--data.max_train_blocks", "98"], "98 training blocks (a quarter of conf/default.yaml's)"),
    "teacher_cache": (["--model.teacher_cache_mb", "512"], "teacher outputs cached between epochs (512 MiB)"),
}
"""Built-in variants: name -> (overrides of ``umim fit``, what they change)."""


@dataclass
class Point:
    """One validation of a run."""

    step: int
    """Optimizer steps done."""
    train_s: float | None
    """Training wall seconds so far, validation excluded (None: the run predates the WallTime callback)."""
    total_s: float | None
    """Seconds since training started, validation included."""
    loss: float
    """Held-out KL(teacher || student), nats per aligned position (val/loss)."""
    top1: float | None
    """Top-1 agreement of student and teacher, % (val/top1)."""
    tr: float | None
    """Token reduction of the held-out blocks, % (val/tr)."""


# -- curves ---------------------------------------------------------------------------------------------
def _float(row: dict, key: str) -> float | None:
    value = row.get(key)
    return float(value) if value not in (None, "") else None


def metrics_files(run: str | os.PathLike) -> list[Path]:
    """The metrics.csv files of one run folder (its CSVLogger's ``logs/version_*``, oldest first), or ``run``
    itself if it is one. A folder holding other runs' logs in subfolders (a sweep folder) is refused: their
    curves would merge."""
    run = Path(run)
    if run.is_file():
        return [run]
    files = sorted(run.glob("logs/version_*/metrics.csv"), key=lambda p: _version(p.parent))
    if not files:
        runs = sorted({p.parent.parent.parent for p in run.glob("*/**/logs/version_*/metrics.csv")})
        if runs:
            raise UserError(f"{run}: holds the logs of {len(runs)} run(s) in subfolders (a sweep folder?), not "
                            f"its own; pass one run folder, e.g. {runs[0]}")
        raise UserError(f"{run}: no metrics.csv in its logs/version_*/ (a `umim fit` folder with a CSVLogger, "
                        "or the csv itself)")
    return files


def _version(folder: Path) -> int:
    tail = folder.name.rpartition("_")[2]
    return int(tail) if tail.isdigit() else -1


def read_curve(run: str | os.PathLike) -> list[Point]:
    """The validations of a run, by step: one :class:`Point` per row of metrics.csv that has ``val/loss``.

    A resumed run logs into a new ``version_*`` folder; later versions win at equal steps.
    """
    points: dict[int, Point] = {}
    files, unvalidated = metrics_files(run), []
    for path in files:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if "step" not in header:
                raise UserError(f"{path}: no 'step' column; give a metrics.csv of Lightning's CSVLogger "
                                "from a `umim fit` run")
            if "val/loss" not in header:  # a resumed version that stopped before validating is fine
                unvalidated.append(path)
                continue
            for row in reader:
                loss = _float(row, "val/loss")
                if loss is None:
                    continue
                # Lightning logs validation before it counts the step it ran in: logged step + 1 steps are done
                step = int(row["step"]) + 1
                top1 = _float(row, "val/top1")
                points[step] = Point(step, _float(row, "time/train_s"), _float(row, "time/total_s"), loss,
                                     None if top1 is None else 100.0 * top1, _float(row, "val/tr"))
    if len(unvalidated) == len(files):
        raise UserError(f"{', '.join(map(str, unvalidated))}: no 'val/loss' column (no validation logged); "
                        "give the metrics.csv of a `umim fit` run that validated")
    return [points[s] for s in sorted(points)]


def loss_at(curve: list[Point], seconds: float) -> float | None:
    """val/loss at ``seconds`` of training wall time, linear between validations; None outside the measured span."""
    timed = [(p.train_s, p.loss) for p in curve if p.train_s is not None]
    if not timed or not timed[0][0] <= seconds <= timed[-1][0]:
        return None
    for (t0, l0), (t1, l1) in zip(timed, timed[1:]):
        if t0 <= seconds <= t1:
            return l0 if t1 == t0 else l0 + (l1 - l0) * (seconds - t0) / (t1 - t0)
    return timed[-1][1]  # a single validation, exactly at ``seconds``


def equal_wall_times(curves: list[list[Point]], n: int = 4) -> list[float]:
    """``n`` evenly spaced training wall times from the latest first validation to the earliest last one, so
    each lies within every timed run's measured span where the spans overlap (else the earliest end alone)."""
    spans = [(t[0], t[-1]) for t in ([p.train_s for p in c if p.train_s is not None] for c in curves) if t]
    if not spans:
        return []
    start, end = max(s for s, _ in spans), min(e for _, e in spans)
    if start >= end or n < 2:
        return [end]
    return [start + (end - start) * k / (n - 1) for k in range(n)]


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def curve_table(curve: list[Point]) -> str:
    """A learning curve as markdown: held-out KL and top-1 against steps and wall time."""
    lines = ["| step | train wall (s) | total wall (s) | held-out KL | top-1 (%) | TR (%) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for p in curve:
        lines.append(f"| {p.step} | {_fmt(p.train_s, '.0f')} | {_fmt(p.total_s, '.0f')} | {p.loss:.4f} | "
                     f"{_fmt(p.top1, '.2f')} | {_fmt(p.tr, '.1f')} |")
    return "\n".join(lines)


def summary_table(records: list[dict], at: list[float]) -> str:
    """One row per variant (its last record): steps, final/best val/loss, top-1, TR, wall times, val/loss at ``at``."""
    head = ["variant", "status", "steps", "val/loss final", "val/loss best", "top-1 (%)", "TR (%)", "train s",
            "total s", *[f"val/loss @ {t:.0f} s" for t in at]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in records:
        curve = [Point(**p) for p in r.get("curve", [])]
        last = curve[-1] if curve else None
        cells = [r["variant"], r["status"], str(last.step) if last else "–",
                 _fmt(last.loss if last else None, ".4f"), _fmt(min((p.loss for p in curve), default=None), ".4f"),
                 _fmt(last.top1 if last else None, ".2f"), _fmt(last.tr if last else None, ".1f"),
                 _fmt(last.train_s if last else None, ".0f"), _fmt(last.total_s if last else None, ".0f"),
                 *[_fmt(loss_at(curve, t), ".4f") for t in at]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the sweep folder --------------------------------------------------------------------------------------
def is_sweep_dir(path: Path) -> bool:
    try:
        return json.loads((Path(path) / MARKER).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def open_sweep_dir(out: Path, info: dict) -> None:
    """Make ``out`` a sweep folder; refuse a file, or a folder with other content that this script did not write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the sweep")
    if out.is_dir() and any(out.iterdir()) and not is_sweep_dir(out):
        raise UserError(f"--out {out} holds files that are not a recipe sweep of this script: choose a new folder")
    write_text_atomic(out / MARKER, json.dumps({"format": FORMAT, **info}, indent=2) + "\n")


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line, rewriting the file atomically (a reader never sees half a line)."""
    old = path.read_text() if path.exists() else ""
    write_text_atomic(path, old + json.dumps(record) + "\n")


# -- configs ---------------------------------------------------------------------------------------------
def _class_path(entry) -> str:
    return entry.get("class_path", "") if isinstance(entry, dict) else str(entry)


def run_config(base: dict, run_dir: Path, budget: str, seed: int, val_every: int | None) -> dict:
    """The base config made a sweep run: outputs and CSV logs in ``run_dir`` (and the mined rules, when the base
    keeps them in its own run folder, so a variant's mining settings apply), ``budget`` as max_time, no export
    or report, the WallTime callback, no progress bar."""
    cfg = json.loads(json.dumps(base))  # a deep copy
    trainer = cfg.setdefault("trainer", {})
    data, root = cfg.get("data") or {}, trainer.get("default_root_dir")
    rules = data.get("rules") if isinstance(data.get("rules"), str) else None
    if rules and root and Path(rules).is_relative_to(root):  # the base run's own mined rules: each run mines its own
        data["rules"] = str(run_dir / Path(rules).relative_to(root))
    trainer.update(default_root_dir=str(run_dir), max_time=budget, enable_progress_bar=False,
                   logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": str(run_dir), "name": "logs"}})
    if val_every is not None:
        trainer.update(val_check_interval=val_every, check_val_every_n_epoch=None)
    callbacks = [c for c in trainer.get("callbacks") or [] if not _class_path(c).endswith(".ExportAndReport")]
    if not any(_class_path(c).endswith(".WallTime") for c in callbacks):
        callbacks.append({"class_path": "umim.training.timing.WallTime"})
    trainer["callbacks"] = callbacks
    cfg["seed_everything"] = seed
    return cfg


def parse_error(config: Path, overrides: list[str]) -> str | None:
    """Why ``umim fit --config config *overrides`` would be refused by the CLI's parser (None: it parses).
    Parses only: builds no model, trainer or data."""
    from umim.cli import UMIMCLI, build_cli

    class ParseOnly(UMIMCLI):
        def instantiate_classes(self) -> None:
            pass

    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)  # parsing seeds too; only the runs need to say so
    try:
        build_cli(["--config", str(config), *overrides], cli_class=ParseOnly, run=False,
                  parser_kwargs={"exit_on_error": False})
    except (argparse.ArgumentError, SystemExit, UserError) as e:
        return " ".join(line.strip() for line in str(e).splitlines()[:2]) or type(e).__name__
    finally:
        seed_log.setLevel(level)
    return None


def parse_variants(names: str | None, custom: list[str]) -> dict[str, list[str]]:
    """The variants to run, in order: the built-ins named in ``names`` (all when neither is given), then
    ``custom`` entries ``NAME='--field value ...'``."""
    chosen: dict[str, list[str]] = {}
    if names is None and not custom:
        names = ",".join(VARIANTS)
    for name in filter(None, (n.strip() for n in (names or "").split(","))):
        if name not in VARIANTS:
            raise UserError(f"--variants: unknown variant {name!r}; built-in ones: {', '.join(VARIANTS)}")
        chosen[name] = list(VARIANTS[name][0])
    for spec in custom:
        name, eq, args = spec.partition("=")
        name = name.strip()
        if not eq or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise UserError(f"--variant {spec!r}: give NAME='--field value ...', NAME a letter or digit, then "
                            "letters, digits, _ . -")
        if name in chosen or name in VARIANTS:
            raise UserError(f"--variant {name}: that name is taken (built-in or given twice); choose another")
        if name in RESERVED:  # ('/', '.' and '..' are refused by the pattern above)
            raise UserError(f"--variant {name}: that name is one of the sweep folder's own files "
                            f"({', '.join(RESERVED)}); choose another")
        try:
            chosen[name] = shlex.split(args)
        except ValueError as e:
            raise UserError(f"--variant {name}: {e} in {args!r}") from e
    return chosen


def seconds(budget: str) -> int:
    """DD:HH:MM:SS -> seconds."""
    d, h, m, s = (int(x) for x in budget.split(":"))
    return ((d * 24 + h) * 60 + m) * 60 + s


# -- running -----------------------------------------------------------------------------------------------
def run_variant(name: str, overrides: list[str], base: dict, out: Path, a, env: dict) -> dict:
    """One ``umim fit`` subprocess into ``out/name``; returns its record (curve included)."""
    run_dir = out / name
    if run_dir.exists():  # an earlier run of this sweep: replaced (anything else there is not touched)
        if not (run_dir / RUN_CONFIG).is_file():
            raise UserError(f"{run_dir} was not written by this sweep: move it, or choose another --out")
        shutil.rmtree(run_dir)
    cfg = run_config(base, run_dir, a.budget, a.seed, a.val_every)
    write_text_atomic(run_dir / RUN_CONFIG, yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "umim.cli", "fit", "--config", str(run_dir / RUN_CONFIG), *overrides]
    t0 = time.perf_counter()
    with open(run_dir / "fit.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    record = {"variant": name, "overrides": overrides, "config": str(a.config), "budget": a.budget, "seed": a.seed,
              "returncode": rc, "process_s": round(wall, 1), "status": "ok" if rc == 0 else "failed", "curve": []}
    try:
        record["curve"] = [asdict(p) for p in read_curve(run_dir)]
    except UserError:
        pass  # failed before logging anything: the log says why
    if rc != 0:
        tail = (run_dir / "fit.log").read_text(errors="replace").strip().splitlines()
        record["error"] = tail[-1] if tail else f"exit code {rc}"
    return record


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="built-in variants:\n" + "\n".join(f"  {k:<16} {' '.join(v) or '(none)':<48} {d}"
                                                  for k, (v, d) in VARIANTS.items()))
    ap.add_argument("--config", default=str(ROOT / "conf" / "default.yaml"), help="base `umim fit` config")
    ap.add_argument("--out", help="sweep folder (new, or one this script wrote): OUT/<variant>/, results.jsonl")
    ap.add_argument("--variants", help="comma-separated built-in variants (default: all, unless --variant is given)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME='--field value ...'",
                    help="a custom variant (repeatable)")
    ap.add_argument("--budget", default="00:00:10:00", help="wall budget of each run, DD:HH:MM:SS (max_time)")
    ap.add_argument("--seed", type=int, default=0, help="seed_everything of every run")
    ap.add_argument("--val-every", type=int, help="validate every N training batches (default: the config's)")
    ap.add_argument("--at", help="comma-separated training wall seconds to compare val/loss at "
                                 "(default: 4 points spanning the times every run was measured at)")
    ap.add_argument("--threads", type=int, help="CPU threads of each run (OMP_NUM_THREADS; default: torch's)")
    ap.add_argument("--curve", metavar="RUN_DIR", help="print the learning curve of a run (or its metrics.csv)")
    a = ap.parse_args(argv)

    if a.curve:
        print(curve_table(read_curve(a.curve)))
        return 0
    if not a.out:
        raise UserError("--out: give a folder for the sweep (or --curve RUN_DIR to print a run's curve)")
    if not re.fullmatch(r"\d+:\d\d:\d\d:\d\d", a.budget):
        raise UserError(f"--budget {a.budget!r}: give DD:HH:MM:SS, e.g. 00:00:10:00")
    if a.val_every is not None and a.val_every < 1:
        raise UserError(f"--val-every {a.val_every}: give a positive number of training batches")
    if a.threads is not None and a.threads < 1:
        raise UserError(f"--threads {a.threads}: give a positive number of threads")
    try:
        at = [float(t) for t in a.at.split(",")] if a.at else None
    except ValueError as e:
        raise UserError(f"--at {a.at!r}: give seconds separated by commas, e.g. 120,300,540") from e
    config = Path(a.config)
    try:
        base = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--config {config}: {one_line(e)}") from e
    if not isinstance(base, dict):
        raise UserError(f"--config {config}: not a `umim fit` config (a YAML mapping)")
    variants = parse_variants(a.variants, a.variant)
    out = Path(a.out)
    open_sweep_dir(out, {"config": str(config)})

    # every override parsed by the real CLI before any run (a typo fails now, not hours in)
    fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".yaml", dir=out)
    os.close(fd)
    try:
        write_text_atomic(probe, yaml.safe_dump(run_config(base, out / ".probe", a.budget, a.seed, a.val_every)))
        errors = {name: parse_error(Path(probe), args) for name, args in variants.items()}
    finally:
        os.unlink(probe)
    for name, err in errors.items():
        if err is None:
            continue
        if name in VARIANTS:  # a built-in whose option this checkout (or this config) lacks
            print(f"skipping {name}: `umim fit` does not take {' '.join(variants[name])} here ({err})")
            del variants[name]
        else:
            raise UserError(f"--variant {name}: `umim fit` refuses {' '.join(variants[name])}: {err}")
    if not variants:
        raise UserError("no variant left to run")

    env = dict(os.environ)
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    print(f"{len(variants)} run(s) of up to {a.budget} each (~{len(variants) * seconds(a.budget) / 60:.0f} min "
          f"plus start-ups), base {config}, into {out}")
    records = []
    for name, overrides in variants.items():
        print(f"[{name}] umim fit --config {config} {shlex.join(overrides)}", flush=True)
        record = run_variant(name, overrides, base, out, a, env)
        append_record(out / "results.jsonl", record)
        records.append(record)
        curve = [Point(**p) for p in record["curve"]]
        last = f"val/loss {curve[-1].loss:.4f} at step {curve[-1].step}" if curve else "no validation logged"
        print(f"[{name}] {record['status']} in {record['process_s']:.0f} s: {last}"
              + (f"; {record['error']} (see {out / name / 'fit.log'})" if record["status"] != "ok" else ""), flush=True)

    at = at if at is not None else equal_wall_times([[Point(**p) for p in r["curve"]] for r in records])
    table = summary_table(records, at)
    write_text_atomic(out / "summary.md", table + "\n")
    print(table)
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(cli_entry(main, sys.argv[1:]))
