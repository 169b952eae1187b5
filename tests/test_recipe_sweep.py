"""benchmarks/recipe_sweep.py and the WallTime callback: a metrics.csv read into a curve (resumed versions,
step count, % top-1), val/loss interpolated at equal wall times, the learning-curve table, refused
outputs and variants, WallTime's clock excluding validation on a real tiny fit, and one real sweep of
two variants of a tiny `umim fit` config."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import lightning as L
import pytest
from conftest import benchmark_script, make_tiny_llama_run

from umim.errors import UserError, cli_entry
from umim.lm import LMSpec
from umim.training.datamodule import UMIMDataModule
from umim.training.distillation import UMIMDistillation
from umim.training.timing import WallTime

pytestmark = pytest.mark.usefixtures("one_thread")

COLUMNS = ["epoch", "step", "train/loss_step", "val/loss", "val/top1", "val/tr", "time/train_s", "time/total_s"]


@pytest.fixture(scope="module")
def sweep():
    with benchmark_script("recipe_sweep") as mod:
        yield mod


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return make_tiny_llama_run(tmp_path_factory.mktemp("tiny"))


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})


def _synthetic_run(root: Path) -> Path:
    """A run as Lightning's CSVLogger writes it: train rows between validation rows (logged at step - 1),
    resumed once into version_1, which logs step 60's validation again."""
    _write_csv(root / "logs" / "version_0" / "metrics.csv", [
        {"epoch": 0, "step": 4, "train/loss_step": 1.5},
        {"epoch": 0, "step": 29, "val/loss": 1.0, "val/top1": 0.50, "val/tr": 24.0, "time/train_s": 100.0,
         "time/total_s": 110.0},
        {"epoch": 0, "step": 34, "train/loss_step": 1.2},
        {"epoch": 0, "step": 59, "val/loss": 0.99, "val/top1": 0.51, "val/tr": 24.0, "time/train_s": 200.0,
         "time/total_s": 220.0},
    ])
    _write_csv(root / "logs" / "version_1" / "metrics.csv", [
        {"epoch": 0, "step": 59, "val/loss": 0.9, "val/top1": 0.52, "val/tr": 24.0, "time/train_s": 200.0,
         "time/total_s": 220.0},
        {"epoch": 0, "step": 89, "val/loss": 0.8, "val/top1": 0.55, "val/tr": 24.0, "time/train_s": 300.0,
         "time/total_s": 330.0},
    ])
    return root


def test_curve_from_metrics_csv_and_equal_wall_times(sweep, tmp_path):
    curve = sweep.read_curve(_synthetic_run(tmp_path / "run"))
    assert [p.step for p in curve] == [30, 60, 90]
    assert [p.loss for p in curve] == [1.0, 0.9, 0.8]  # the resumed version's step-60 validation wins
    assert [p.train_s for p in curve] == [100.0, 200.0, 300.0] and curve[-1].total_s == 330.0
    assert curve[0].top1 == pytest.approx(50.0) and curve[0].tr == 24.0
    assert sweep.loss_at(curve, 100.0) == 1.0 and sweep.loss_at(curve, 300.0) == 0.8
    assert sweep.loss_at(curve, 150.0) == pytest.approx(0.95)
    assert sweep.loss_at(curve, 275.0) == pytest.approx(0.825)
    assert sweep.loss_at(curve, 99.0) is None and sweep.loss_at(curve, 301.0) is None  # never extrapolated
    shorter = [sweep.Point(10, 120.0, 125.0, 1.1, 40.0, 24.0), sweep.Point(20, 240.0, 250.0, 1.05, 41.0, 24.0)]
    assert sweep.equal_wall_times([curve, shorter]) == [120.0, 160.0, 200.0, 240.0]  # where both were measured
    assert sweep.equal_wall_times([curve, [shorter[0]]]) == [120.0]
    late = [sweep.Point(40, 310.0, 320.0, 0.7, 60.0, 24.0)]
    assert sweep.equal_wall_times([curve, late]) == [300.0]  # no overlap: the earliest end
    untimed = [sweep.Point(30, None, None, 1.0, 50.0, 24.0)]  # a run from before the WallTime callback
    assert sweep.loss_at(untimed, 100.0) is None and sweep.equal_wall_times([untimed]) == []

    records = [{"variant": "a", "status": "ok", "curve": [vars(p) for p in curve]},
               {"variant": "b", "status": "failed", "curve": []}]
    table = sweep.summary_table(records, [150.0, 250.0]).splitlines()
    assert table[0].split("|")[-3:-1] == [" val/loss @ 150 s ", " val/loss @ 250 s "]
    assert table[2].split(" | ")[1:] == ["ok", "90", "0.8000", "0.8000", "55.00", "24.0", "300", "330", "0.9500",
                                         "0.8500 |"]
    assert table[3].count("–") == 9


def test_curve_command_prints_markdown(sweep, tmp_path, capsys):
    run = _synthetic_run(tmp_path / "run")
    assert cli_entry(sweep.main, ["--curve", str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| step | train wall (s) |") and len(lines) == 5
    assert lines[2] == "| 30 | 100 | 110 | 1.0000 | 50.00 | 24.0 |"
    assert cli_entry(sweep.main, ["--curve", str(tmp_path / "nothing")]) == 2
    assert "no metrics.csv" in capsys.readouterr().err


def test_curve_of_a_sweep_folder_refused_not_merged(sweep, tmp_path, capsys):
    out = tmp_path / "sweep"
    sweep.open_sweep_dir(out, {"config": "x"})
    for name, loss in (("a", 1.0), ("b", 2.0)):  # two variants validating at the same step
        _write_csv(out / name / "logs" / "version_0" / "metrics.csv", [{"step": 29, "val/loss": loss}])
    assert [p.loss for p in sweep.read_curve(out / "a")] == [1.0]  # one run folder: its own curve only
    assert cli_entry(sweep.main, ["--curve", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "pass one run folder" in err
    # a run folder's own logs only: a run kept inside it (e.g. a copy) does not merge into its curve
    _write_csv(out / "a" / "old" / "logs" / "version_3" / "metrics.csv", [{"step": 29, "val/loss": 5.0}])
    assert [p.loss for p in sweep.read_curve(out / "a")] == [1.0]


def test_curve_of_a_csv_without_step_or_val_loss_is_refused(sweep, tmp_path, capsys):
    nostep = tmp_path / "nostep.csv"
    nostep.write_text("epoch,val/loss\n0,1.0\n")
    noval = tmp_path / "noval.csv"
    noval.write_text("epoch,step,train/loss_step\n0,4,1.5\n")
    for path, col in ((nostep, "'step'"), (noval, "'val/loss'")):
        assert cli_entry(sweep.main, ["--curve", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and col in err
    # a resumed version that stopped before validating leaves the earlier versions' curve intact
    run = _synthetic_run(tmp_path / "run")
    (run / "logs" / "version_2").mkdir()
    (run / "logs" / "version_2" / "metrics.csv").write_text("epoch,step,train/loss_step\n0,94,0.7\n")
    assert [p.step for p in sweep.read_curve(run)] == [30, 60, 90]


def test_variant_descriptions_state_absolute_values(sweep):
    for name, (overrides, what) in sweep.VARIANTS.items():
        for value in overrides[1::2]:
            try:
                number = float(value)
            except ValueError:
                continue  # a flag or a list: the description says what it turns on
            assert value in what or (number < 1 and f"{number * 100:g}%" in what), (name, value, what)


def test_out_that_is_not_a_sweep_is_refused(sweep, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, why in ((foreign, "not a recipe sweep"), (afile, "is a file")):
        assert cli_entry(sweep.main, ["--out", str(out), "--variants", "baseline"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(out) in err and why in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"] and afile.read_text() == "x"

    ours = tmp_path / "ours"
    sweep.open_sweep_dir(ours, {"config": "x"})
    sweep.append_record(ours / "results.jsonl", {"variant": "a"})
    sweep.open_sweep_dir(ours, {"config": "x"})  # a sweep folder of this script is taken again
    sweep.append_record(ours / "results.jsonl", {"variant": "b"})
    assert [json.loads(x)["variant"] for x in (ours / "results.jsonl").read_text().splitlines()] == ["a", "b"]
    (ours / "lr2x").mkdir()  # a variant folder this script did not write is not replaced
    with pytest.raises(UserError, match="not written by this sweep"):
        sweep.run_variant("lr2x", [], {}, ours, None, {})
    assert (ours / "lr2x").is_dir()


def test_variant_selection_and_typos_refused_before_any_run(sweep, tmp_path, capsys):
    assert list(sweep.parse_variants(None, [])) == list(sweep.VARIANTS)
    chosen = sweep.parse_variants("baseline,lr2x", ["wd0=--model.weight_decay 0 --model.lr '1e-3'"])
    assert chosen == {"baseline": [], "lr2x": ["--model.lr", "3.2e-3"],
                      "wd0": ["--model.weight_decay", "0", "--model.lr", "1e-3"]}
    assert list(sweep.parse_variants(None, ["x=--model.lr 1"])) == ["x"]
    for names, custom, msg in (("nope", [], "unknown variant 'nope'"), (None, ["lr2x=--model.lr 1"], "taken"),
                               (None, ["bad name=--model.lr 1"], "NAME="), (None, ["x=--model.lr '1"], "quotation"),
                               (None, ["sweep.json=--model.lr 1"], "sweep folder's own files"),
                               (None, ["results.jsonl=--model.lr 1"], "sweep folder's own files"),
                               (None, ["summary.md=--model.lr 1"], "sweep folder's own files"),
                               (None, ["a/b=--model.lr 1"], "NAME="), (None, ["..=--model.lr 1"], "NAME="),
                               (None, [".=--model.lr 1"], "NAME=")):
        with pytest.raises(UserError, match=msg):
            sweep.parse_variants(names, custom)
    out = tmp_path / "sweep"
    assert cli_entry(sweep.main, ["--out", str(out), "--variants", "baseline", "--variant", "typo=--model.lrr 1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "typo" in err and "model.lrr" in err
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]  # nothing ran
    assert cli_entry(sweep.main, ["--out", str(out), "--variant", "summary.md=--model.lr 1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "summary.md" in err
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]  # refused before any run
    assert cli_entry(sweep.main, ["--out", str(out), "--budget", "10 min"]) == 2
    assert "--budget" in capsys.readouterr().err


class _SlowValidation(L.Callback):
    """Validation that takes at least 0.3 s more, to see it excluded from the training clock."""

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            time.sleep(0.3)


class _Record(L.Callback):
    def __init__(self):
        self.rows = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.rows.append({k: float(trainer.callback_metrics[k]) for k in ("time/train_s", "time/total_s")})


def test_each_run_mines_its_own_rules_when_the_base_keeps_them_in_its_run_folder(sweep, tmp_path):
    base = {"trainer": {"default_root_dir": "runs/default", "callbacks": [
        {"class_path": "umim.training.export.ExportAndReport"}]}, "data": {"rules": "runs/default/mined_rules"}}
    cfg = sweep.run_config(base, tmp_path / "tau10", "00:00:01:00", 0, None)
    assert cfg["data"]["rules"] == str(tmp_path / "tau10" / "mined_rules")  # tau10 must not reuse tau 5 rules
    assert [c["class_path"] for c in cfg["trainer"]["callbacks"]] == ["umim.training.timing.WallTime"]
    assert base["data"]["rules"] == "runs/default/mined_rules"  # the base is left alone
    base["data"]["rules"] = "/data/selected"  # a rule set of its own: every run trains on it
    assert sweep.run_config(base, tmp_path / "x", "00:00:01:00", 0, None)["data"]["rules"] == "/data/selected"


def test_wall_time_excludes_validation_and_survives_resume(tiny_setup, tmp_path):
    dm = UMIMDataModule(corpus=str(tiny_setup / "corpus"), lm=LMSpec(str(tiny_setup / "lm")),
                        rules=str(tmp_path / "rules"), block_size=64, batch_size=4, max_train_blocks=16,
                        max_eval_blocks=4)
    clock, seen = WallTime(), _Record()
    trainer = L.Trainer(max_steps=6, val_check_interval=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[clock, _SlowValidation(), seen])
    t0 = time.perf_counter()
    trainer.fit(UMIMDistillation(lm=LMSpec(str(tiny_setup / "lm")), lr=1e-2), datamodule=dm)
    elapsed = time.perf_counter() - t0
    assert len(seen.rows) == 3  # steps 2, 4, 6
    train = [r["time/train_s"] for r in seen.rows]
    total = [r["time/total_s"] for r in seen.rows]
    assert 0 < train[0] < train[1] < train[2] and total[2] < elapsed
    for k, (t, tot) in enumerate(zip(train, total)):
        assert tot - t >= 0.3 * (k + 1)  # this and every earlier validation's sleep are outside the training clock
    state = clock.state_dict()
    assert state["total_s"] >= total[2] and train[2] <= state["train_s"] <= train[2] + (state["total_s"] - total[2])
    trainer.save_checkpoint(tmp_path / "six.ckpt")

    resumed, seen_after = WallTime(), _Record()  # a resumed fit counts on from the checkpoint's clock
    trainer = L.Trainer(max_steps=8, val_check_interval=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[resumed, seen_after])
    trainer.fit(UMIMDistillation(lm=LMSpec(str(tiny_setup / "lm")), lr=1e-2), datamodule=dm,
                ckpt_path=tmp_path / "six.ckpt")
    assert len(seen_after.rows) == 1  # step 8
    after = seen_after.rows[0]
    assert after["time/train_s"] > state["train_s"] and after["time/total_s"] > state["total_s"]


TINY_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 4
  val_check_interval: 2
  enable_model_summary: false
  default_root_dir: {root}/never
  callbacks:
    - class_path: umim.training.checkpoint.ResumableCheckpoint
      init_args: {{monitor: val/loss, mode: min, save_top_k: 1}}
    - class_path: umim.training.export.ExportAndReport
      init_args: {{max_eval_blocks: 2}}
model:
  lm: {{name_or_path: {lm}}}
  lr: 1.0e-2
data:
  corpus: {corpus}
  block_size: 64
  batch_size: 4
  max_train_blocks: 16
  max_eval_blocks: 4
"""


@pytest.mark.slow
def test_real_sweep_of_two_variants(sweep, tiny_setup, tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(root=tmp_path, lm=tiny_setup / "lm", corpus=tiny_setup / "corpus"))
    out = tmp_path / "sweep"
    args = ["--config", str(cfg), "--out", str(out), "--variants", "baseline", "--variant", "lr_low=--model.lr 1e-4",
            "--budget", "00:00:05:00", "--threads", "1", "--at", "0,1000"]
    rc = cli_entry(sweep.main, args)
    printed = capsys.readouterr().out
    assert rc == 0, printed  # a failed run's line names its error and fit.log
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in records] == ["baseline", "lr_low"] and {r["status"] for r in records} == {"ok"}
    curves = {r["variant"]: [sweep.Point(**p) for p in r["curve"]] for r in records}
    for name, curve in curves.items():
        assert [p.step for p in curve] == [2, 4]
        assert 0 < curve[0].train_s < curve[1].train_s and all(p.train_s < p.total_s for p in curve)
        assert all(p.loss > 0 and 0 <= p.top1 <= 100 and p.tr > 0 for p in curve)
        run = out / name
        assert (run / "checkpoints").is_dir() and (run / "rules" / "rules.json").is_file()
        assert not (run / "merger").exists() and not (run / "metrics.json").exists()  # export dropped
    assert curves["baseline"][0].tr == curves["lr_low"][0].tr  # same rules, same held-out blocks
    assert curves["baseline"][-1].loss != curves["lr_low"][-1].loss  # the override reached the run
    assert not (tmp_path / "never").exists()
    rows = [line for line in printed.splitlines() if line.startswith(("| baseline ", "| lr_low "))]
    assert len(rows) == 2 and rows == (out / "summary.md").read_text().splitlines()[2:]
    assert rows[0].endswith("| – | – |")  # 0 s and 1000 s lie outside every measured span

    # the same folder again: its runs are replaced, the results appended
    rc = cli_entry(sweep.main, [*args[:4], "--variants", "baseline", "--budget", "00:00:05:00", "--threads", "1"])
    assert rc == 0, capsys.readouterr().out
    again = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in again] == ["baseline", "lr_low", "baseline"]
    assert [p["loss"] for p in again[2]["curve"]] == [p["loss"] for p in records[0]["curve"]]  # same seed
