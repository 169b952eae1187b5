"""Rule selection inside one fit (umim.training.rule_selection): KL charged to merges by hand-checked
cases, the per-position KL the loss hands out, and `umim fit` runs on a tiny random Llama that score
and switch to the selected rules, export them with their costs, restart the monitors, resume exactly
on either side of the switch, and refuse set-ups that cannot work."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_tiny_llama_run

from umim.cli import main
from umim.lm import LMSpec
from umim.rules.cost import RuleCosts, RuleIndex, cost_order, measured_tr, rule_list, rules_digest
from umim.rules.store import MergeRules
from umim.training.datamodule import UMIMDataModule
from umim.training.distill_loss import distillation_loss
from umim.training.distillation import UMIMDistillation
from umim.training.rule_selection import RuleSelection, attribute_kl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama_run(tmp_path_factory.mktemp("tiny"))


def _rules() -> MergeRules:
    return MergeRules(ngrams={2: np.array([[1, 2], [3, 4]]), 3: np.array([[5, 6, 7]])},
                      counts={2: np.array([9, 8]), 3: np.array([7])}, tokenizer={})


# -- charging KL to merges ---------------------------------------------------------------------------
def test_attribute_kl_charges_the_latest_merge_within_the_window():
    rules = _rules()
    index = RuleIndex(rules)
    g = {tuple(r): i for i, r in enumerate(rule_list(rules))}
    # row 0: [1 2] 9 [3 4] [5 6 7] 9 | row 1: 9 9 [1 2] 9 (+ padding)
    ids = np.array([[1, 2, 9, 3, 4, 5, 6, 7, 9], [9, 9, 1, 2, 9, 0, 0, 0, 0]])
    seg_start = np.array([[0, 2, 3, 5, 8], [0, 1, 2, 4, 0]])
    seg_len = np.array([[2, 1, 2, 3, 1], [1, 1, 2, 1, 0]])
    kl = np.array([[1.0, 2.0, 4.0, 8.0, 16.0], [0.0, 0.0, 32.0, 64.0, 128.0]])

    def charged(window):
        rid, c = attribute_kl(ids, seg_start, seg_len, kl, index, window)
        out = {}
        for r, v in zip(rid, c):
            out.setdefault(r, []).append(v)
        return {k: sorted(v) for k, v in out.items()}

    assert charged(0) == {g[(1, 2)]: [1.0, 32.0], g[(3, 4)]: [4.0], g[(5, 6, 7)]: [8.0]}
    # window 1: the next position too, unless a later merge sits there; never a padded one
    assert charged(1) == {g[(1, 2)]: [3.0, 96.0], g[(3, 4)]: [4.0], g[(5, 6, 7)]: [24.0]}
    assert charged(3) == {g[(1, 2)]: [3.0, 96.0], g[(3, 4)]: [4.0], g[(5, 6, 7)]: [24.0]}
    rid, c = attribute_kl(ids, np.zeros((2, 3), int), np.zeros((2, 3), int), np.zeros((2, 3)), index, 1)
    assert rid.size == 0 and c.size == 0


def test_cost_order_shrinks_and_can_put_unseen_rules_at_the_mean():
    rules = _rules()
    ngrams = rule_list(rules)
    # rule 0 cheap on many merges, rule 1 expensive, rule 2 never charged (mean cost)
    costs = RuleCosts(ngrams, np.array([9, 8, 7]), np.array([10, 10, 0]), np.array([1.0, 50.0, 0.0]), 100)
    assert list(cost_order(costs, prior=0.0, unseen_at_mean=True)) == [0, 2, 1]
    assert list(cost_order(costs)) == [0, 1]  # `umim select-rules` by default: unseen rules left out
    # one lucky merge: cheap raw, but shrunk toward the mean it ranks after a well-measured cheap rule
    costs = RuleCosts(ngrams, np.array([9, 8, 7]), np.array([40, 1, 40]), np.array([4.0, 0.0, 400.0]), 100)
    assert list(cost_order(costs, prior=0.0, unseen_at_mean=True))[0] == 1
    assert list(cost_order(costs, prior=4.0, unseen_at_mean=True))[0] == 0


def test_distillation_loss_hands_out_each_positions_kl():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    t, s = torch.randn(7, 8), torch.randn(7, 8, requires_grad=True)
    buf = torch.full((7,), -1.0)
    loss = distillation_loss(t, s, head, chunk_size=3, position_kl=buf)
    tl, sl = torch.log_softmax(head(t), -1), torch.log_softmax(head(s), -1)
    want = (tl.exp() * (tl - sl)).sum(-1)
    assert torch.allclose(buf, want.detach(), atol=1e-6) and not buf.requires_grad
    assert torch.allclose(loss, want.mean(), atol=1e-6)


# -- in a fit ----------------------------------------------------------------------------------------
def _config(tiny, out, at_step=3, target=0.1, max_steps=8, rules=None, extra_cb=""):
    return f"""
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: {max_steps}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {out}
  val_check_interval: 2
  limit_val_batches: 2
  callbacks:
    - class_path: umim.training.checkpoint.ResumableCheckpoint
      init_args: {{monitor: val/loss, mode: min, save_top_k: 1}}
    - class_path: lightning.pytorch.callbacks.EarlyStopping
      init_args: {{monitor: val/loss, mode: min, patience: 3}}
    - class_path: umim.training.rule_selection.RuleSelection
      init_args: {{target_tr: {target}, at_step: {at_step}}}{extra_cb}
    - class_path: umim.training.export.ExportAndReport
      init_args:
        max_eval_blocks: 2
        eval_sets: [{{name: held-out, corpus: {tiny / 'corpus'}, split: test}}]
model:
  lm: {{name_or_path: {tiny / 'lm'}}}
  lr: 1.0e-2
data:
  corpus: {tiny / 'corpus'}
  rules: {rules or out / 'mined_rules'}
  block_size: 64
  batch_size: 4
  max_train_blocks: 16
  max_eval_blocks: 4
"""


def _fit(tmp_path, text, *argv) -> int:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    try:
        return main(["fit", "--config", str(cfg), *argv])
    except SystemExit as e:
        return e.code


def test_fit_switches_to_the_selected_rules_and_exports_them(tiny, tmp_path, capfd):
    out = tmp_path / "run"
    assert _fit(tmp_path, _config(tiny, out)) in (0, None)
    said = capfd.readouterr()
    assert (said.out + said.err).count("step 3: kept") == 1
    mined = MergeRules.load(out / "mined_rules")
    selected, exported = MergeRules.load(out / "selected_rules"), MergeRules.load(out / "rules")
    assert rule_list(exported) == rule_list(selected) and 0 < len(selected) < len(mined)
    assert set(rule_list(selected)) <= set(rule_list(mined))
    sel = selected.selection
    assert sel["method"] == "cost inside umim fit" and sel["source_rules_sha256"] == rules_digest(mined)
    assert sel["target_tr"] == 0.1 and abs(sel["measured_tr"] - 0.1) <= 0.005
    # the costs of the source rules, in the `umim select-rules --costs` format, on all 16 training blocks
    # (fewer than score_blocks): every merge of the longest-match segmentation charged once
    costs = RuleCosts.load(out / "rule_costs.json", mined)
    assert costs.tokens == 16 * 64 and costs.meta["text"]["blocks"] == 16 and (costs.kl_sum >= 0).all()
    blocks = UMIMDataModule(corpus=str(tiny / "corpus"), lm=LMSpec(str(tiny / "lm")), rules=str(out / "mined_rules"),
                            block_size=64, max_train_blocks=16)
    blocks.setup("fit")
    assert costs.fires.sum() == int((mined.matcher.segment_batch(blocks.blocks["train"])[1] > 1).sum())
    # the fit's TR on the training blocks is the selection's
    dm = UMIMDataModule(corpus=str(tiny / "corpus"), lm=LMSpec(str(tiny / "lm")), rules=str(out / "rules"),
                        block_size=64, max_train_blocks=16)
    dm.setup("fit")
    assert measured_tr(exported, dm.blocks["train"]) == pytest.approx(sel["measured_tr"])
    # the best checkpoint and the report come from after the switch (validation at step 2 no longer counts)
    metrics = json.loads((out / "metrics.json").read_text())
    best = metrics["train"]["best_checkpoint"]
    assert best and int(best.split("step=")[1].split(".")[0]) >= 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(["last.ckpt", best.split("/")[-1]])
    assert sum(metrics["rules"]["num_rules"].values()) == len(selected)
    # a second fit into the same folder starts again from the mined rules and selects the same ones
    assert _fit(tmp_path, _config(tiny, out)) in (0, None)
    assert rule_list(MergeRules.load(out / "rules")) == rule_list(selected)


class SaveAt(L.Callback):
    """Save a checkpoint after the validation of one step (a stand-in for an interrupted run)."""

    def __init__(self, step: int, path: str):
        self.step, self.path = step, path

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_step == self.step and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)


def _trainer_fit(tiny, root, callbacks, ckpt_path=None, max_steps=8):
    dm = UMIMDataModule(corpus=str(tiny / "corpus"), lm=LMSpec(str(tiny / "lm")), rules=str(root.parent / "mined"),
                        block_size=64, batch_size=4, max_train_blocks=16, max_eval_blocks=4)
    module = UMIMDistillation(lm=LMSpec(str(tiny / "lm")), lr=1e-2)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=2, limit_val_batches=1,
                        num_sanity_val_steps=0, default_root_dir=root, enable_checkpointing=False,
                        callbacks=callbacks)
    L.seed_everything(0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return dm, module


@pytest.mark.parametrize("save_step", [2, 4])  # before the switch at step 3, and after it
def test_resume_on_either_side_of_the_switch_selects_like_the_whole_run(tiny, tmp_path, save_step):
    whole = RuleSelection(target_tr=0.1, at_step=3)
    dm_whole, m_whole = _trainer_fit(tiny, tmp_path / "whole", [whole])
    ckpt = str(tmp_path / "part.ckpt")
    _trainer_fit(tiny, tmp_path / "part", [RuleSelection(target_tr=0.1, at_step=3), SaveAt(save_step, ckpt)])
    resumed = RuleSelection(target_tr=0.1, at_step=3)
    dm_res, m_res = _trainer_fit(tiny, tmp_path / "resumed", [resumed], ckpt_path=ckpt)
    assert resumed.selected is not None and np.array_equal(resumed.selected, whole.selected)
    if save_step < 3:  # scored after the resume, with the same merger on the same blocks
        assert np.allclose(resumed.costs.kl_sum, whole.costs.kl_sum) and np.array_equal(resumed.costs.fires,
                                                                                      whole.costs.fires)
    else:  # the selection came from the checkpoint: nothing scored again
        assert resumed.costs is None
    assert rule_list(dm_res.rules) == rule_list(dm_whole.rules)  # later batches use the selection
    for k, v in m_whole.merger.state_dict().items():
        assert torch.allclose(m_res.merger.state_dict()[k], v, atol=1e-6), k


def test_resume_with_other_rules_is_refused(tiny, tmp_path):
    ckpt = str(tmp_path / "part.ckpt")
    _trainer_fit(tiny, tmp_path / "part", [RuleSelection(target_tr=0.1, at_step=3), SaveAt(4, ckpt)])
    other = tmp_path / "other"
    MergeRules.load(tmp_path / "mined").save(other)
    rules = MergeRules.load(other)
    rules.ngrams[2] = rules.ngrams[2][1:]
    rules.counts[2] = rules.counts[2][1:]
    rules.save(tmp_path / "mined")  # the folder the resumed run reads now holds one rule fewer
    with pytest.raises(Exception, match="selection was made from another rule set"):
        _trainer_fit(tiny, tmp_path / "resumed", [RuleSelection(target_tr=0.1, at_step=3)], ckpt_path=ckpt)


@pytest.mark.parametrize("case", ["export_folder", "target_too_high", "workers", "at_step_past_max"])
def test_fit_refuses_what_cannot_work_before_training(tiny, tmp_path, capfd, case):
    out = tmp_path / "run"
    text, argv, frag = _config(tiny, out), [], ""
    if case == "export_folder":
        text, frag = _config(tiny, out, rules=out / "rules"), "give data.rules another folder"
    elif case == "target_too_high":
        text, frag = _config(tiny, out, target=0.95), "lower it"
    elif case == "workers":
        argv, frag = ["--data.num_workers", "1"], "data.num_workers: 0"
    else:
        text, frag = _config(tiny, out, at_step=8), "must come before trainer.max_steps"
    assert _fit(tmp_path, text, *argv) == 2
    err = capfd.readouterr().err
    assert frag in err and "Traceback" not in err
    assert not (out / "merger").exists() and not (out / "checkpoints").exists()


def test_distillation_loss_calls_the_head_at_least_min_chunks_times():
    """A sharded head is a collective: a rank with fewer positions still makes every rank's calls."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    rows = []
    head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    t, s = torch.randn(7, 8), torch.randn(7, 8, requires_grad=True)
    want = distillation_loss(t, s, head, chunk_size=3)
    assert rows == [3, 3, 3, 3, 1, 1]  # teacher and student per chunk
    rows.clear()
    got = distillation_loss(t, s, head, chunk_size=3, min_chunks=5)
    assert rows == [3, 3, 3, 3, 1, 1, 0, 0, 0, 0] and torch.equal(got, want)


def test_validate_with_a_checkpoint_uses_its_selection(tiny, tmp_path):
    ckpt = str(tmp_path / "part.ckpt")
    whole = RuleSelection(target_tr=0.1, at_step=3)
    _trainer_fit(tiny, tmp_path / "part", [whole, SaveAt(4, ckpt)])
    dm = UMIMDataModule(corpus=str(tiny / "corpus"), lm=LMSpec(str(tiny / "lm")), rules=str(tmp_path / "mined"),
                        block_size=64, batch_size=4, max_train_blocks=16, max_eval_blocks=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, default_root_dir=tmp_path / "part",
                        callbacks=[RuleSelection(target_tr=0.1, at_step=3)])
    trainer.validate(UMIMDistillation(lm=LMSpec(str(tiny / "lm"))), datamodule=dm, ckpt_path=ckpt, verbose=False)
    assert rule_list(dm.rules) == rule_list(MergeRules.load(tmp_path / "part" / "selected_rules"))
    assert len(dm.rules) == len(whole.selected) < len(MergeRules.load(tmp_path / "mined"))


def test_select_rules_reproduces_the_fits_selection_from_its_costs(tiny, tmp_path):
    from umim.rules.cost import select_rules_main

    out = tmp_path / "run"
    assert _fit(tmp_path, _config(tiny, out)) in (0, None)
    # TR measured on the fit's 16 training blocks (max_train_blocks: the same seeded subset)
    assert select_rules_main(["--rules", str(out / "mined_rules"), "--costs", str(out / "rule_costs.json"),
                              "--target_tr", "0.1", "--prior", "4", "--unseen_at_mean", "true",
                              "--tr_blocks", "16", "--out", str(tmp_path / "again")]) == 0
    assert rule_list(MergeRules.load(tmp_path / "again")) == rule_list(MergeRules.load(out / "rules"))


@pytest.mark.parametrize("case", ["foreign_costs", "target_above_one"])
def test_fit_refuses_in_one_line_and_keeps_what_was_there(tiny, tmp_path, capfd, case):
    out = tmp_path / "run"
    text, frag = _config(tiny, out), "is not a rule-costs file"
    if case == "foreign_costs":
        out.mkdir()
        (out / "rule_costs.json").write_text('{"mine": 1}')
    else:
        text, frag = _config(tiny, out, target=1.5), "give a fraction in (0, 1)"
    assert _fit(tmp_path, text) == 2
    err = capfd.readouterr().err
    assert frag in err and "Traceback" not in err
    if case == "foreign_costs":
        assert (out / "rule_costs.json").read_text() == '{"mine": 1}'
