"""K-Token Merging on real tiny models (a Llama built from a config, a tokenizer trained in-process):
the encoder starts as the block mean, K-blocks never touch padding, the prompt merger hits the
requested TR and is the identity at ratio 0, distillation trains only the encoder, LoRA training
changes only adapter and encoder weights, trained folders round-trip, and conf/ktoken.yaml parses
with the real `umim` CLI. The slow test trains on the embedded SmolLM2."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_tiny_llama_run, make_tiny_lm

from umim.cli import UMIMCLI, build_cli, main
from umim.fingerprint import TokenizerMismatchError, tokenizer_fingerprint
from umim.ktoken.encoder import (
    KTokenConfig,
    KTokenEncoder,
    blocks_for_ratio,
    kblock_segments,
    max_tr,
)
from umim.ktoken.training import (
    KTokenDataModule,
    KTokenDistillation,
    KTokenLoRA,
    KTokenSettings,
    LoRASettings,
    task_loss,
)
from umim.lm import LMSpec, load_lm, load_tokenizer
from umim.merging.batch import build_merged_batch, check_segments
from umim_eval.methods.ktoken_merge import KTokenMerge
from umim_eval.scoring.prompt_inputs import continuation_nll_from, prompt_inputs

KS = (2, 3, 4)
CONF = Path(__file__).parents[1] / "conf" / "ktoken.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny Llama + its tokenizer saved as a HF folder, and a local English corpus folder."""
    return make_tiny_llama_run(tmp_path_factory.mktemp("ktoken"))


def _trainer(tmp_path, steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path, **kw)


def _datamodule(root, **kw) -> KTokenDataModule:
    args = {"corpus": str(root / "corpus"), "lm": LMSpec(str(root / "lm")), "block_size": 64, "batch_size": 4,
            "max_train_blocks": 16, "max_eval_blocks": 4}
    args.update(kw)
    dm = KTokenDataModule(**args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# -- the encoder and the segmentation ---------------------------------------------------------------
@pytest.mark.parametrize("k", KS)
def test_encoder_starts_as_block_mean(k):
    enc = KTokenEncoder(KTokenConfig(hidden_size=16, k=k))
    x = torch.randn(5, 4, 16)  # padded to 4 >= K, as a segmenter with longer spans pads them
    mask = torch.arange(4)[None].expand(5, 4) < k
    torch.testing.assert_close(enc(x, mask), x[:, :k].mean(1), atol=0, rtol=0)
    assert sum(p.numel() for p in enc.parameters()) == k * 16 * 16 + 16 + 16 * 16 + 16
    with pytest.raises(ValueError, match="exactly"):  # a short block (the tail of a prompt) is not merged
        enc(x, torch.arange(4)[None].expand(5, 4) < k - 1)
    with pytest.raises(ValueError, match="K"):
        KTokenEncoder(KTokenConfig(hidden_size=16, k=5))


@pytest.mark.parametrize("k", KS)
def test_segments_never_touch_padding(k):
    """Ragged right-padded batch: blocks stay inside each row, padding is no segment, the LM never
    attends to it (each row's outputs equal that row run alone), and the encoder sees no pad id."""
    lm = make_tiny_lm("llama", 50)
    pad = 49
    lengths = torch.tensor([37, 12, 5, 1, 20])
    L_ = int(lengths.max())
    g = torch.Generator().manual_seed(k)
    ids = torch.randint(0, pad, (len(lengths), L_), generator=g)
    ids[torch.arange(L_)[None] >= lengths[:, None]] = pad
    n_blocks = lengths // k  # as many full blocks as fit: the hardest case for padding
    n_blocks[1] = 1
    seg_start, seg_len = kblock_segments(lengths, k, n_blocks)
    check_segments(seg_start.numpy(), seg_len.numpy(), lengths.numpy())
    for b, (n, m) in enumerate(zip(lengths.tolist(), n_blocks.tolist())):
        segs = [(s, ln) for s, ln in zip(seg_start[b].tolist(), seg_len[b].tolist()) if ln > 0]
        assert segs == [(i * k, k) for i in range(m)] + [(j, 1) for j in range(m * k, n)]
    with pytest.raises(ValueError, match="padding"):
        kblock_segments(lengths, k, n_blocks + 1)

    enc = KTokenEncoder(KTokenConfig(hidden_size=32, k=k))
    seen = []
    enc.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].clone(), inp[1].clone())))
    embed = lm.get_input_embeddings()
    merged = build_merged_batch(ids, seg_start, seg_len, embed, enc, lengths)
    spans, span_mask = seen[0]
    assert not (spans[span_mask] == embed.weight[pad]).all(-1).any(), "a padding token reached the encoder"
    assert merged.attention_mask.sum(1).tolist() == (lengths - n_blocks * (k - 1)).tolist()
    assert (merged.inputs_embeds[merged.attention_mask == 0] == 0).all()
    assert ((merged.orig_to_comp == -1) == (torch.arange(L_)[None] >= lengths[:, None])).all()
    with torch.no_grad():
        batched = lm(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask).logits
        for b in range(len(lengths)):
            S = int(merged.attention_mask[b].sum())
            alone = lm(inputs_embeds=merged.inputs_embeds[b : b + 1, :S]).logits[0]
            torch.testing.assert_close(batched[b, :S], alone, atol=1e-5, rtol=1e-5)


# -- the prompt merger: matched TR, identity at 0 -----------------------------------------------------
@pytest.mark.parametrize("k", KS)
def test_prompt_merger_hits_requested_tr(k):
    enc = KTokenEncoder(KTokenConfig(hidden_size=32, k=k))
    lm = make_tiny_lm("llama", 60)  # only its embeddings are used
    top = (k - 1) / k
    for ratio in (0.1, 0.25, 0.4, 0.5, top):
        if ratio > top:
            continue
        method = KTokenMerge(enc, ratio=ratio)
        for n in (100, 128, 150):  # n >= 25 (K - 1): the TR step (K-1)/n allows a 2-point match
            mp = method.merge(lm, None, [i % 59 for i in range(n)])
            assert abs(mp.tr - ratio) <= 0.02, (k, ratio, n, mp.tr)
            starts = [s for s, _ in mp.segments]
            assert starts == sorted(starts) and sum(ln for _, ln in mp.segments) == n
            assert mp.embeds.shape == (len(mp.segments), 32)
    # short prompts: the miss is the rounding step or the block cap, and the merger says so
    for n in (3, 7, 10):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mp = KTokenMerge(enc, ratio=top).merge(lm, None, [5] * n)
        assert mp.tr == pytest.approx(max_tr(k, n))
        assert (abs(mp.tr - top) > 0.02) == bool(caught) and all("instead of" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match=r"\(K-1\)/K"):
        KTokenMerge(enc, ratio=top + 0.01)
    with pytest.raises(ValueError, match="ratio"):
        KTokenMerge(enc, ratio=-0.1)
    assert blocks_for_ratio(0.0, 17, k) == 0


@pytest.mark.parametrize("k", KS)
def test_ratio_zero_is_identity(k):
    lm = make_tiny_lm("llama", 60)
    enc = KTokenEncoder(KTokenConfig(hidden_size=32, k=k))
    enc.down.weight.data.normal_()  # a trained-looking encoder: identity must not depend on it
    ids = [i % 59 for i in range(7, 47)]
    mp = KTokenMerge(enc, ratio=0.0).merge(lm, None, ids)
    assert mp.segments == [(i, 1) for i in range(len(ids))] and mp.tr == 0.0
    with torch.no_grad():
        torch.testing.assert_close(mp.embeds, lm.get_input_embeddings()(torch.tensor(ids)), atol=0, rtol=0)
        merged_logits = lm(inputs_embeds=mp.embeds[None]).logits
        torch.testing.assert_close(merged_logits, lm(input_ids=torch.tensor([ids])).logits, atol=0, rtol=0)
        p = prompt_inputs(KTokenMerge(enc, ratio=0.0), lm, None, ids[:30])
        torch.testing.assert_close(continuation_nll_from(lm, p, ids[30:]),
                                   continuation_nll_from(lm, prompt_inputs(None, lm, None, ids[:30]), ids[30:]),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("k", KS)
def test_prompt_merger_matches_training_batches(k):
    """The eval path (one prompt) and the training path (build_merged_batch) give the same embeddings."""
    lm = make_tiny_lm("llama", 60)
    enc = KTokenEncoder(KTokenConfig(hidden_size=32, k=k))
    enc.down.weight.data.normal_(std=0.1)
    ids = [i * 7 % 59 for i in range(41)]
    mp = KTokenMerge(enc, ratio=0.4).merge(lm, None, ids)
    m = sum(ln > 1 for _, ln in mp.segments)
    starts, lens = kblock_segments(torch.tensor([41]), k, m)
    with torch.no_grad():
        batch = build_merged_batch(torch.tensor([ids]), starts, lens, lm.get_input_embeddings(), enc)
    torch.testing.assert_close(mp.embeds, batch.inputs_embeds[0], atol=1e-6, rtol=1e-6)


# -- training ----------------------------------------------------------------------------------------
def test_distillation_lowers_loss_and_keeps_lm_frozen(tiny_setup, tmp_path):
    dm = _datamodule(tiny_setup)
    module = KTokenDistillation(lm=LMSpec(str(tiny_setup / "lm")), ktoken=KTokenSettings(k=4), lr=5e-3,
                                warmup_ratio=0.0, export_dir=str(tmp_path / "export"))
    module.configure_model()
    lm_before = {n: v.clone() for n, v in module.lm.state_dict().items()}
    enc_before = {n: v.clone() for n, v in module.encoder.state_dict().items()}
    trainer = _trainer(tmp_path, 40)
    before = trainer.validate(module, dataloaders=dm.train_dataloader(), verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, dataloaders=dm.train_dataloader(), verbose=False)[0]

    assert before["val/tr"] == pytest.approx(100 * 8 * 3 / 64)  # midpoint 0.5 of 64 tokens: 8 blocks of 4
    assert after["val/loss"] < 0.92 * before["val/loss"], (before, after)  # measured: 0.86x
    for n, v in module.lm.state_dict().items():
        assert torch.equal(v, lm_before[n]), f"frozen LM parameter {n} changed"
    assert all(not p.requires_grad for p in module.lm.parameters())
    assert all(not torch.equal(v, enc_before[n]) for n, v in module.encoder.state_dict().items())
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.encoder.parameters()}
    # the export is the trained encoder
    loaded = KTokenEncoder.from_pretrained(tmp_path / "export")
    for n, v in module.encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[n], v)
    assert not (tmp_path / "export" / "adapter").exists()


def test_one_distillation_module_and_data_module_for_either_encoder(tiny_setup, tmp_path):
    """The K-token encoder cuts its own K-blocks even from batches the merge rules segmented; UMIM's
    merger refuses blocks that no segmenter has cut; the K-token data module takes no rules."""
    from umim.errors import UserError
    from umim.training.datamodule import SpanDataModule, UMIMDataModule
    from umim.training.distillation import SpanDistillation, UMIMDistillation

    assert issubclass(KTokenDistillation, SpanDistillation) and issubclass(UMIMDistillation, SpanDistillation)
    assert issubclass(KTokenDataModule, SpanDataModule) and UMIMDataModule is SpanDataModule
    lm = LMSpec(str(tiny_setup / "lm"))
    ruled = UMIMDataModule(corpus=str(tiny_setup / "corpus"), lm=lm, rules=str(tmp_path / "rules"), block_size=64,
                           batch_size=4, max_train_blocks=4, max_eval_blocks=4)
    ruled.prepare_data()
    ruled.setup("fit")
    assert "seg_start" in next(iter(ruled.val_dataloader()))
    module = KTokenDistillation(lm=lm, ktoken=KTokenSettings(k=4))
    out = _trainer(tmp_path, 1).validate(module, dataloaders=ruled.val_dataloader(), verbose=False)[0]
    assert out["val/tr"] == pytest.approx(100 * 8 * 3 / 64)  # K-blocks, not the rules' spans
    whole = _datamodule(tiny_setup)
    assert "seg_start" not in next(iter(whole.val_dataloader()))
    with pytest.raises(UserError, match="segmented by the data module"):
        _trainer(tmp_path, 1).validate(UMIMDistillation(lm=lm), dataloaders=whole.val_dataloader(), verbose=False)
    with pytest.raises(UserError, match="no rules"):
        KTokenDataModule(corpus=str(tiny_setup / "corpus"), lm=lm, rules=str(tmp_path / "rules"))


def test_lora_trains_only_adapters_and_encoder(tiny_setup, tmp_path):
    dm = _datamodule(tiny_setup)
    module = KTokenLoRA(lm=LMSpec(str(tiny_setup / "lm")), ktoken=KTokenSettings(k=2),
                        lora=LoRASettings(r=4, target_modules="all-linear"),
                        lr=1e-2, warmup_ratio=0.0, export_dir=str(tmp_path / "export"))
    module.configure_model()
    before_sd = {n: v.clone() for n, v in module.state_dict().items()}
    trainer = _trainer(tmp_path, 40)
    before = trainer.validate(module, dataloaders=dm.train_dataloader(), verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, dataloaders=dm.train_dataloader(), verbose=False)[0]
    # a random tiny LM with a frozen (tied) output layer: the task CE falls slowly (measured 0.93x at 30 steps)
    assert after["val/loss"] < 0.96 * before["val/loss"], (before, after)

    changed = {n for n, v in module.state_dict().items() if not torch.equal(v, before_sd[n])}
    lora = {n for n in before_sd if "lora_" in n}
    encoder = {n for n in before_sd if n.startswith("encoder.")}
    assert lora and {n for n in lora if "lora_B" in n} <= changed  # B starts at 0: it must have moved
    assert changed <= lora | encoder, f"non-adapter weights changed: {sorted(changed - lora - encoder)[:5]}"
    assert encoder <= changed
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    named = dict(module.named_parameters())
    assert opt_params == {id(named[n]) for n in named if n.startswith("encoder.") or "lora_" in n}

    # round trip: the exported folder, loaded into a fresh LM, scores exactly like the trained module
    fresh = load_lm(LMSpec(str(tiny_setup / "lm")))
    tok = load_tokenizer(LMSpec(str(tiny_setup / "lm")))
    method = KTokenMerge.load(tmp_path / "export", fresh, tok, ratio=0.3)
    ids = tok(" ".join(["the list of keywords in the expression"] * 4))["input_ids"]
    with torch.no_grad():
        module.eval()
        mine = continuation_nll_from(
            module.lm, prompt_inputs(KTokenMerge(module.encoder, 0.3), module.lm, tok, ids[:-5]), ids[-5:])
        theirs = continuation_nll_from(fresh, prompt_inputs(method, fresh, tok, ids[:-5]), ids[-5:])
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="LoRA adapter"):
        method.merge(load_lm(LMSpec(str(tiny_setup / "lm"))), tok, ids)


def test_task_loss_covers_the_text_after_the_prefix(tiny_setup):
    """The CE positions are exactly those that predict tokens after the merged prefix."""
    lm = load_lm(LMSpec(str(tiny_setup / "lm")))
    enc = KTokenEncoder(KTokenConfig(hidden_size=32, k=3))
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    seg_start, seg_len = kblock_segments(torch.tensor([20, 14]), 3, torch.tensor([4, 0]))
    batch = {"input_ids": ids, "lengths": torch.tensor([20, 14]), "seg_start": seg_start, "seg_len": seg_len}
    loss, merged = task_loss(lm, enc, batch)
    with torch.no_grad():
        # row 0: 12 merged tokens -> 4 elements, then tokens 12..19; the text after the prefix is 12..19
        h = lm(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask).logits
        logp = torch.log_softmax(h.float(), -1)
        row0 = -logp[0, 3:11].gather(-1, ids[0, 12:20, None]).squeeze(-1)
        row1 = -logp[1, 0:13].gather(-1, ids[1, 1:14, None]).squeeze(-1)  # nothing merged: all of it
    torch.testing.assert_close(loss, torch.cat([row0, row1]).mean(), atol=1e-5, rtol=1e-5)


def test_encoder_round_trip_and_refusals(tiny_setup, tmp_path, other_tiny_tokenizer):
    tok = load_tokenizer(LMSpec(str(tiny_setup / "lm")))
    enc = KTokenEncoder(KTokenConfig(hidden_size=32, k=3, lm_name="tiny", tokenizer=tokenizer_fingerprint(tok)))
    enc.down.weight.data.normal_()
    enc.save_pretrained(tmp_path / "enc")
    back = KTokenEncoder.from_pretrained(tmp_path / "enc", hidden_size=32, tokenizer_fp=tokenizer_fingerprint(tok))
    assert back.config == enc.config
    x = torch.randn(3, 4, 32)
    torch.testing.assert_close(back(x), enc(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="hidden size"):
        KTokenEncoder.from_pretrained(tmp_path / "enc", hidden_size=64)
    with pytest.raises(TokenizerMismatchError):
        KTokenEncoder.from_pretrained(tmp_path / "enc", tokenizer_fp=tokenizer_fingerprint(other_tiny_tokenizer))
    with pytest.raises(FileNotFoundError):
        KTokenEncoder.from_pretrained(tmp_path)


# -- the CLI -------------------------------------------------------------------------------------------
class ParseOnlyCLI(UMIMCLI):
    def instantiate_classes(self) -> None:
        pass


def test_conf_ktoken_parses_with_the_real_cli():
    cfg = build_cli(["--config", str(CONF)], cli_class=ParseOnlyCLI, run=False).config
    assert cfg.model.class_path == "umim.ktoken.training.KTokenDistillation"
    assert cfg.data.class_path == "umim.ktoken.training.KTokenDataModule"
    assert cfg.model.init_args.ktoken.k == 4 and cfg.model.init_args.lm.name_or_path == "embedded"
    data_lm = cfg.data.init_args.lm
    assert data_lm.get("init_args", data_lm).name_or_path == "embedded"  # linked from the model: one LM
    assert cfg.data.init_args.corpus == "pydoc" and 20 <= cfg.trainer.max_steps <= 100
    # the LoRA recipe is the same config with another class
    lora = build_cli(["--config", str(CONF), "--model.class_path", "umim.ktoken.training.KTokenLoRA",
                      "--model.init_args.lora.r", "4"], cli_class=ParseOnlyCLI, run=False).config
    assert lora.model.class_path.endswith("KTokenLoRA") and lora.model.init_args.lora.r == 4
    # UMIM's own configs keep their flat layout
    umim = build_cli(["--config", str(CONF.parent / "default.yaml")], cli_class=ParseOnlyCLI, run=False).config
    assert umim.model.merger.num_heads == 4


def test_umim_fit_trains_and_exports_lora_folder(tiny_setup, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
seed_everything: 0
trainer: {{accelerator: cpu, max_steps: 3, logger: false, enable_progress_bar: false, default_root_dir: {out},
           limit_val_batches: 1, enable_checkpointing: false, enable_model_summary: false}}
model:
  class_path: umim.ktoken.training.KTokenLoRA
  init_args: {{lm: {{name_or_path: {tiny_setup / 'lm'}}}, ktoken: {{k: 3}}, lora: {{r: 2}}, export_dir: {out}/ktoken}}
data:
  class_path: umim.ktoken.training.KTokenDataModule
  init_args: {{corpus: {tiny_setup / 'corpus'}, block_size: 64, batch_size: 2, max_train_blocks: 6, max_eval_blocks: 2}}
""")
    main(["fit", "--config", str(cfg)])
    lm = load_lm(LMSpec(str(tiny_setup / "lm")))
    method = KTokenMerge.load(out / "ktoken", lm, load_tokenizer(LMSpec(str(tiny_setup / "lm"))), ratio=0.5)
    assert method.k == 3 and method.adapted_lm is lm and any("lora_" in n for n, _ in lm.named_parameters())


# -- the embedded model --------------------------------------------------------------------------------
@pytest.mark.slow
def test_ktoken_distillation_lowers_loss_on_embedded_model(tmp_path):
    """A few steps on the real SmolLM2 (K = 4, 12 blocks of a 96-token row merged): the KL falls."""
    torch.set_num_threads(2)
    dm = KTokenDataModule(corpus="pydoc", lm=LMSpec("embedded"), block_size=96, batch_size=1,
                          max_train_blocks=3, max_eval_blocks=2)
    dm.prepare_data()
    dm.setup("fit")
    module = KTokenDistillation(lm=LMSpec("embedded"), ktoken=KTokenSettings(k=4), lr=2e-3, warmup_ratio=0.0)
    trainer = _trainer(tmp_path, 6, check_val_every_n_epoch=100)  # validated by hand, on the training rows
    before = trainer.validate(module, dataloaders=dm.train_dataloader(), verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, dataloaders=dm.train_dataloader(), verbose=False)[0]
    assert before["val/tr"] == pytest.approx(100 * 12 * 3 / 96)
    assert after["val/loss"] < 0.9 * before["val/loss"], (before, after)
    assert after["val/top1"] >= before["val/top1"]
