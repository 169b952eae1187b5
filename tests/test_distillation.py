"""Training on a real (tiny, random-weight) Llama built from a config: loss falls, LM stays frozen,
only the merger changes, resume restores merger and optimizer, identity when nothing merges,
and `umim fit` writes merger, rules and the metrics report."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_tiny_llama_run

from umim.cli import main
from umim.fingerprint import tokenizer_fingerprint
from umim.lm import LMSpec, load_lm, load_tokenizer
from umim.merging.batch import build_merged_batch
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.corpus import load_documents
from umim.rules.store import MergeRules
from umim.training.datamodule import SegmentCollator, UMIMDataModule
from umim.training.distillation import UMIMDistillation


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny Llama + its tokenizer saved as a HF folder, and a local English corpus folder."""
    return make_tiny_llama_run(tmp_path_factory.mktemp("tiny"))


def _datamodule(root, rules_dir, **kw):
    args = dict(corpus=str(root / "corpus"), lm=LMSpec(str(root / "lm")), rules=str(rules_dir), block_size=64,
                batch_size=4, max_train_blocks=48, max_eval_blocks=8)
    args.update(kw)
    return UMIMDataModule(**args)


def test_identity_when_nothing_merges(tiny_setup):
    lm = load_lm(LMSpec(str(tiny_setup / "lm")))
    tok = load_tokenizer(LMSpec(str(tiny_setup / "lm")))
    fp = tokenizer_fingerprint(tok)
    empty = MergeRules(ngrams={2: np.zeros((0, 2), int)}, counts={2: np.zeros(0, int)}, tokenizer=fp)
    # rules whose n-grams never occur in the input (token ids absent from it)
    ids = torch.tensor([tok("def foo(x): return x in the list")["input_ids"]] * 2)
    absent = [t for t in range(len(tok)) if t not in ids][:2]
    unmatched = MergeRules(ngrams={2: np.array([absent])}, counts={2: np.array([9])}, tokenizer=fp)
    merger = MergeModule(MergerConfig(hidden_size=lm.get_input_embeddings().embedding_dim))
    for rules in (empty, unmatched):
        batch = SegmentCollator(rules)(list(ids.numpy()))
        merged = build_merged_batch(batch["input_ids"], batch["seg_start"], batch["seg_len"],
                                    lm.get_input_embeddings(), merger)
        with torch.no_grad():
            plain = lm(input_ids=ids).logits
            via_merge = lm(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask).logits
        assert torch.equal(plain, via_merge)
        assert not merged.loss_mask.any()


def test_training_lowers_loss_and_keeps_lm_frozen(tiny_setup, tmp_path):
    dm = _datamodule(tiny_setup, tmp_path / "rules", max_train_blocks=16)
    module = UMIMDistillation(lm=LMSpec(str(tiny_setup / "lm")), lr=1e-2, warmup_ratio=0.0)
    module.configure_model()
    lm_before = {k: v.clone() for k, v in module.lm.state_dict().items()}
    merger_before = {k: v.clone() for k, v in module.merger.state_dict().items()}
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    # the distillation loss on the training blocks (a 60-step run on 16 blocks must fit them)
    before = trainer.validate(module, dataloaders=dm.train_dataloader(), verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, dataloaders=dm.train_dataloader(), verbose=False)[0]

    assert dm.rules is not None and len(dm.rules) > 0 and before["val/tr"] > 5.0
    assert after["val/loss"] < 0.8 * before["val/loss"], (before, after)
    assert after["val/top1"] >= before["val/top1"]
    for k, v in module.lm.state_dict().items():
        assert torch.equal(v, lm_before[k]), f"frozen LM parameter {k} changed"
    assert all(not p.requires_grad for p in module.lm.parameters())
    changed = [k for k, v in module.merger.state_dict().items() if not torch.equal(v, merger_before[k])]
    assert set(changed) == set(merger_before), \
        f"merger parameters that did not train: {set(merger_before) - set(changed)}"
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.merger.parameters()}


def test_checkpoint_resume_restores_merger_and_optimizer(tiny_setup, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = _datamodule(tiny_setup, tmp_path / "rules")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = UMIMDistillation(lm=LMSpec(str(tiny_setup / "lm")), lr=1e-2)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[ckpt], limit_val_batches=1, num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["state_dict"] and all(k.startswith("merger.") for k in saved["state_dict"])  # no LM weights

    fresh = UMIMDistillation(lm=LMSpec(str(tiny_setup / "lm")), lr=1e-2, seed=123)  # different init
    trainer2 = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                         limit_val_batches=1, num_sanity_val_steps=0, enable_model_summary=False)
    trainer2.fit(fresh, datamodule=dm, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for k, v in module.merger.state_dict().items():
        assert torch.equal(fresh.merger.state_dict()[k], v)
    restored = trainer2.optimizers[0].state_dict()["state"]
    for i, st in saved["optimizer_states"][0]["state"].items():
        assert torch.equal(restored[i]["exp_avg"], st["exp_avg"])
    assert trainer2.global_step == 6


def test_umim_fit_cli_exports_merger_rules_and_report(tiny_setup, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    # a saved extra rule set (as `umim mine --model-prob` writes): the first bigram of every test doc
    tok = load_tokenizer(LMSpec(str(tiny_setup / "lm")))
    docs = load_documents(str(tiny_setup / "corpus"), "test")
    grams = sorted({tuple(tok(d, add_special_tokens=False)["input_ids"][:2]) for d in docs})
    MergeRules(ngrams={2: np.array(grams)}, counts={2: np.ones(len(grams), dtype=np.int64)},
               tokenizer=tokenizer_fingerprint(tok)).save(tmp_path / "extra")
    cfg.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 8
  logger: false
  enable_progress_bar: false
  default_root_dir: {out}
  limit_val_batches: 2
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {out}/checkpoints, monitor: val/loss, mode: min, save_top_k: 1}}
    - class_path: umim.training.export.ExportAndReport
      init_args:
        out_dir: {out}
        max_eval_blocks: 4
        eval_sets: [{{name: held-out, corpus: {tiny_setup / 'corpus'}, split: test}}]
        rule_variants: [{{name: no filter, filters: []}}, {{name: extra, path: {tmp_path / 'extra'}}}]
model:
  lm: {{name_or_path: {tiny_setup / 'lm'}}}
  lr: 1.0e-2
data:
  corpus: {tiny_setup / 'corpus'}
  rules: {out}/rules
  block_size: 64
  batch_size: 4
  max_train_blocks: 16
  max_eval_blocks: 4
""")
    main(["fit", "--config", str(cfg)])
    report = json.loads((out / "metrics.json").read_text())
    rows = report["results"][f"held-out ({tiny_setup / 'corpus'}:test)"]
    assert set(rows) == {"trained", "untrained", "trained, rules no filter", "untrained, rules no filter",
                         "trained, rules extra", "untrained, rules extra"}
    assert 0 < rows["trained, rules extra"]["tr"] < rows["trained"]["tr"]
    assert rows["trained"]["tr"] == rows["untrained"]["tr"] > 0
    assert rows["trained, rules no filter"]["tr"] >= rows["trained"]["tr"]
    merger = MergeModule.from_pretrained(
        out / "merger", tokenizer_fp=tokenizer_fingerprint(load_tokenizer(LMSpec(str(tiny_setup / "lm")))))
    rules = MergeRules.load(out / "rules")
    assert len(rules) > 0 and merger.config.hidden_size == 32
    assert (out / "metrics.md").read_text().startswith("| eval set |")

    # a second fit whose report fails leaves the first export whole (no new merger beside old metrics)
    import hashlib

    import umim.training.export

    def tree():
        return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file() and p.parts[len(out.parts)] in
                ("merger", "rules", "metrics.json", "metrics.md")}

    before = tree()

    def broken(*args, **kwargs):
        raise RuntimeError("report failed")

    original, umim.training.export.evaluate_alignment = umim.training.export.evaluate_alignment, broken
    try:
        with pytest.raises(RuntimeError, match="report failed"):
            main(["fit", "--config", str(cfg), "--model.lr", "5e-2"])
    finally:
        umim.training.export.evaluate_alignment = original
    assert tree() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left
