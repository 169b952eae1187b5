"""Multi-process tier: each paper config (conf/*.yaml) run by `umim fit` on 2 CPU processes (gloo),
DDP and the sharded strategy (FSDP2), with a tiny random model of its family; only model, corpus,
sizes, devices and the output folder are overridden.

Checked: exit 0 and one export (merger, rules, metrics.json) with the teacher unchanged; sharded
checkpoints hold no frozen-LM tensor; val/loss of 1 and 2 processes (lr 0) and of DDP and sharded
agree; DDP and sharded export the same merger at the same seed; a run interrupted by SIGTERM and
resumed with `--ckpt_path last` continues exactly like the uninterrupted run (1 and 2 processes).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_families import PAPER_CONFIGS, build_all

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
STRATEGY = {"gpt2xl": "DDPStrategy", "llama3.2-1b": "DDPStrategy", "llama3.1-8b": "DecoderLayerFSDP",
            "deepscaler-1.5b": "DecoderLayerFSDP"}  # what each paper config names


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("families"))


class Runs:
    """`umim fit` runs by name, each run once per test session and shared by the tests that read it."""

    def __init__(self, assets, root: Path):
        self.assets, self.root, self.done = assets, root, {}

    def fit(self, name: str, config: str, family: str, devices: int = 2, extra: tuple = (), out: str | None = None):
        """`umim fit` of a paper config (UMIM's own settings)."""
        return self.run(name, config, devices, out, (
            "--model.lm.name_or_path", str(self.assets[family]), "--data.corpus", str(self.assets["corpus"]),
            "--data.block_size", "64", "--data.batch_size", "2", "--data.num_workers", "0",
            "--data.max_eval_blocks", "4", "--model.loss_chunk_size", "64", *extra))

    def run(self, name: str, config: str, devices: int, out: str | None, extra: tuple):
        key = (name, out)
        if key in self.done:
            return self.done[key]
        out_dir = self.root / (out or name)
        args = [
            sys.executable, "-m", "umim.cli", "fit", "--config", str(ROOT / "conf" / f"{config}.yaml"),
            "--trainer.default_root_dir", str(out_dir), "--trainer.accelerator", "cpu",
            "--trainer.devices", str(devices), "--trainer.precision", "32-true",
            "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out_dir),
            "--trainer.logger.name", "logs", "--trainer.logger.version", name, *extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "UMIM_CACHE": str(self.root / "cache"),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(args, cwd=self.root, env=env, capture_output=True, text=True, timeout=600)
        self.done[key] = proc
        return proc


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    return Runs(assets, tmp_path_factory.mktemp("runs"))


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def losses(out_dir: Path, version: str, column: str) -> dict[int, float]:
    with open(out_dir / "logs" / version / "metrics.csv") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("config", list(PAPER_CONFIGS))
def test_paper_config_on_two_processes(runs, config):
    """fit -> checkpoints -> export/report on 2 processes with the config's own strategy."""
    proc = runs.fit(config, config, PAPER_CONFIGS[config])
    ok(proc)
    out = runs.root / config
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == 2 and metrics["train"]["steps"] == STEPS
    assert metrics["train"]["strategy"] == STRATEGY[config]
    assert metrics["teacher_unchanged"] is True
    assert set(metrics["results"]) == {"held-out (%s:test)" % runs.assets["corpus"]}
    assert (proc.stdout + proc.stderr).count("exported merger and rules to") == 1  # rank 0 alone writes
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no staging left behind
    assert (out / "merger" / "merger.safetensors").is_file() and (out / "rules" / "rules.json").is_file()
    last = checkpoint(out / "checkpoints" / "last.ckpt")
    assert last["global_step"] == STEPS
    # checkpoints hold the merger and the loop state, never a frozen-LM tensor
    assert last["state_dict"] and all(k.startswith("merger.") for k in last["state_dict"])
    assert losses(out, config, "val/loss")


def test_ddp_and_sharded_export_the_same_merger(runs):
    """The same config and seed on 2 processes: DDP and FSDP2 train the same merger."""
    sharded = runs.fit("llama3.1-8b", "llama3.1-8b", "llama-untied")
    ddp = runs.fit("llama3.1-8b-ddp", "llama3.1-8b", "llama-untied", extra=("--trainer.strategy", "ddp"))
    ok(sharded), ok(ddp)
    a = load_file(runs.root / "llama3.1-8b" / "merger" / "merger.safetensors")
    b = load_file(runs.root / "llama3.1-8b-ddp" / "merger" / "merger.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert (json.loads((runs.root / "llama3.1-8b-ddp" / "metrics.json").read_text())["train"]["strategy"]
            == "DDPStrategy")


def test_val_loss_equals_one_process(runs):
    """With lr 0 every run evaluates the same merger on the same validation blocks."""
    lr0 = ("--model.lr", "0", "--trainer.max_steps", "2")
    procs = {
        "one": runs.fit("lr0-one", "llama3.1-8b", "llama-tied", devices=1, extra=lr0),  # sharded, 1 process, tied
        "sharded": runs.fit("lr0-sharded", "llama3.1-8b", "llama-tied", extra=lr0),
        "ddp": runs.fit("lr0-ddp", "llama3.1-8b", "llama-tied", extra=(*lr0, "--trainer.strategy", "ddp")),
    }
    vals = {}
    for name, proc in procs.items():
        ok(proc)
        vals[name] = losses(runs.root / f"lr0-{name}", f"lr0-{name}", "val/loss")
    (step, one), = vals["one"].items()
    assert vals["sharded"] == pytest.approx({step: one}, rel=1e-6)
    assert vals["ddp"] == pytest.approx({step: one}, rel=1e-6)


@pytest.mark.parametrize("config,devices", [("gpt2xl", 1), ("gpt2xl", 2), ("llama3.1-8b", 2)])
def test_resume_is_exact(runs, config, devices):
    """SIGTERM after step 3 saves last.ckpt; `--ckpt_path last` then reproduces steps 4..6 exactly."""
    family = PAPER_CONFIGS[config]
    ref_name = config if devices == 2 else f"{config}-1proc"
    ref = runs.fit(ref_name, config, family, devices=devices)
    name = f"{config}-{devices}-resumed"
    stopped = runs.fit(name + "-a", config, family, devices=devices, out=name,
                       extra=("--trainer.callbacks+=tiny_families.SigtermAtStep", "--trainer.callbacks.step", "3"))
    ok(ref)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    out = runs.root / name
    assert checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert not (out / "metrics.json").exists()  # an interrupted fit exports nothing
    resumed = runs.fit(name + "-b", config, family, devices=devices, out=name, extra=("--ckpt_path", "last"))
    ok(resumed)
    a, b = checkpoint(runs.root / ref_name / "checkpoints" / "last.ckpt"), checkpoint(out / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    ref_loss = losses(runs.root / ref_name, ref_name, "train/loss_step")
    got = list(losses(out, name + "-b", "train/loss_step").values())
    assert got == list(ref_loss.values())[3:]  # the same batches, the same merger, the same losses


def test_mixed_precision_keeps_buffers_and_trainable_state_fp32(runs):
    """bf16-mixed under the sharded strategy: the LM computes in bf16, RoPE buffers and the merger stay fp32."""
    proc = runs.fit("bf16", "deepscaler-1.5b", "qwen2", extra=(
        "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2",
        "--trainer.callbacks+=tiny_families.CheckPrecision"))
    ok(proc)
    assert json.loads((runs.root / "bf16" / "metrics.json").read_text())["train"]["precision"] == "bf16-mixed"


def test_any_frozen_lm_module_trains_sharded(runs):
    """K-Token Merging's LoRA recipe (trainable adapters inside the sharded decoder layers, a trainable
    encoder in its own unit) on 2 processes: DDP and FSDP2 export the same encoder and adapter."""
    exported = {}
    for strategy in ("ddp", "sharded"):
        name = f"ktoken-lora-{strategy}"
        chosen = ("--trainer.strategy", "ddp") if strategy == "ddp" else \
            ("--trainer.strategy.class_path", "umim.training.strategy.DecoderLayerFSDP")
        proc = runs.run(name, "ktoken", 2, None, (
            "--model.class_path", "umim.ktoken.training.KTokenLoRA", *chosen,
            "--model.init_args.lm.name_or_path", str(runs.assets["llama-tied"]),
            "--model.init_args.export_dir", str(runs.root / name / "ktoken"),
            "--data.init_args.corpus", str(runs.assets["corpus"]), "--data.init_args.block_size", "64"))
        ok(proc)
        folder = runs.root / name / "ktoken"
        exported[strategy] = {**load_file(folder / "encoder.safetensors"),
                              **load_file(folder / "adapter" / "adapter_model.safetensors")}
        last = checkpoint(runs.root / name / "checkpoints" / "last.ckpt")["state_dict"]
        assert all(k.startswith("encoder.") or "lora_" in k for k in last)  # adapters, never the base LM
    assert exported["ddp"].keys() == exported["sharded"].keys() and any("lora_B" in k for k in exported["ddp"])
    for k, v in exported["ddp"].items():
        torch.testing.assert_close(exported["sharded"][k], v, rtol=1e-5, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in exported["ddp"].items() if "lora_B" in k)  # adapters trained


def test_resume_across_epochs_and_at_an_epoch_boundary(runs):
    """Epochs of 4 batches: a stop in the second epoch and a stop right after an epoch-end checkpoint
    both resume to the uninterrupted weights; a resume with another batch size is refused."""
    short = ("--data.max_train_blocks", "8", "--trainer.max_steps", "10")
    ref = runs.fit("epochs-ref", "gpt2xl", "gpt2", devices=1, extra=short)
    ok(ref)
    want = checkpoint(runs.root / "epochs-ref" / "checkpoints" / "last.ckpt")
    assert want["global_step"] == 10 and want["epoch"] == 2
    for stop in (6, 4):  # mid-epoch 2; after the validation (and last.ckpt) that ends epoch 1
        name = f"epochs-stop{stop}"
        stopped = runs.fit(name + "-a", "gpt2xl", "gpt2", devices=1, out=name, extra=(
            *short, "--trainer.callbacks+=tiny_families.SigtermAtStep", "--trainer.callbacks.step", str(stop)))
        assert stopped.returncode == 143, stopped.stderr[-3000:]
        if stop == 6:
            bad = runs.fit(name + "-bad", "gpt2xl", "gpt2", devices=1, out=name,
                           extra=(*short, "--data.batch_size", "4", "--ckpt_path", "last"))
            assert bad.returncode == 2 and "batch_size 2 vs 4" in bad.stderr, bad.stderr[-2000:]
        resumed = runs.fit(name + "-b", "gpt2xl", "gpt2", devices=1, out=name, extra=(*short, "--ckpt_path", "last"))
        ok(resumed)
        got = checkpoint(runs.root / name / "checkpoints" / "last.ckpt")
        assert got["global_step"] == 10
        for k in want["state_dict"]:
            assert torch.equal(want["state_dict"][k], got["state_dict"][k]), (stop, k)


def test_last_checkpoint_follows_every_epoch_end_validation(runs):
    """Validation once per epoch (the paper configs): last.ckpt is rewritten at every epoch end even when
    val/loss does not improve (lr 0), not only when a new best is saved."""
    proc = runs.fit("epoch-end", "gpt2xl", "gpt2", devices=1, extra=(
        "--data.max_train_blocks", "8", "--trainer.max_steps", "-1", "--trainer.max_epochs", "3",
        "--trainer.val_check_interval", "1.0", "--model.lr", "0"))
    ok(proc)
    assert checkpoint(runs.root / "epoch-end" / "checkpoints" / "last.ckpt")["global_step"] == 12


@pytest.mark.parametrize("strategy", ["ddp", "sharded"])
def test_rule_selection_scores_every_block_once_across_ranks(runs, strategy):
    """RuleSelection on 2 processes: each rank scores half the blocks, the reduced merge counts equal a
    1-process run's (the counts depend on blocks and rules only, not on the merger), rank 0 writes the
    selection once, and the export is the selected subset of the mined rules."""
    config = "llama3.2-1b" if strategy == "ddp" else "llama3.1-8b"
    costs = {}
    for devices in (1, 2):
        name = f"selection-{strategy}-{devices}"
        proc = runs.fit(name, config, PAPER_CONFIGS[config], devices=devices, extra=(
            "--trainer.callbacks+=umim.training.rule_selection.RuleSelection", "--trainer.callbacks.target_tr", "0.1",
            "--trainer.callbacks.at_step", "3", "--trainer.callbacks.score_blocks", "8",
            "--data.rules", str(runs.root / name / "mined_rules")))
        ok(proc)
        out = runs.root / name
        from umim.rules.cost import RuleCosts, rule_list
        from umim.rules.store import MergeRules

        assert (proc.stdout + proc.stderr).count("step 3: kept") == 1
        mined, exported = MergeRules.load(out / "mined_rules"), MergeRules.load(out / "rules")
        assert rule_list(exported) == rule_list(MergeRules.load(out / "selected_rules"))
        assert set(rule_list(exported)) < set(rule_list(mined))
        assert exported.selection["method"] == "cost inside umim fit"
        costs[devices] = RuleCosts.load(out / "rule_costs.json", mined)
    assert costs[1].tokens == costs[2].tokens == 8 * 64
    assert costs[2].fires.sum() > 0 and (costs[1].fires == costs[2].fires).all()
