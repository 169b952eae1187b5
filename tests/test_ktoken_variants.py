"""The two K-Token Merging variants as two registered methods: ``ktoken`` (encoder trained against the
frozen LM) and ``ktoken_lora`` (encoder + LoRA adapters on the LM). Each is labelled as such, takes
only its own kind of trained folder, and both can be listed in one comparison: the LoRA adapter is
switched on only while ``ktoken_lora`` scores, so the base LM and the frozen-LM variant still run the
unadapted LM (exactly the base LM's perplexity at TR 0), and ``conf/ktoken_lora.yaml`` parses with the
real ``umim fit`` CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm, make_tiny_tokenizer

from umim.errors import UserError
from umim.fingerprint import tokenizer_fingerprint
from umim.inference.generation import MergedLM
from umim.ktoken.encoder import KTokenConfig, KTokenEncoder
from umim.ktoken.lora import ADAPTER_DIR, LoRASettings, add_lora, save_adapter
from umim.rules.corpus import load_documents
from umim_eval.methods.registry import check_methods, label, make_method

CONF = Path(__file__).parents[1] / "conf" / "ktoken_lora.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama + BPE on Python's docs, a frozen-LM K-token folder and a LoRA one whose adapter is
    non-zero (a fresh adapter's B = 0 would leave the LM unchanged)."""
    root = tmp_path_factory.mktemp("ktoken-variants")
    docs = load_documents("pydoc", "train")[:1500]
    tok = make_tiny_tokenizer(docs, vocab_size=400)
    tok.add_special_tokens({"eos_token": "[PAD]"})
    fp = tokenizer_fingerprint(tok)
    for name in ("frozen", "lora", "lora2"):
        KTokenEncoder(KTokenConfig(hidden_size=32, k=2, tokenizer=fp)).save_pretrained(root / name)
    for name, seed in (("lora", 1), ("lora2", 2)):
        adapted = make_tiny_lm("llama", len(tok), context=256)
        add_lora(adapted, LoRASettings(r=2))
        torch.manual_seed(seed)
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
        save_adapter(adapted, root / name / ADAPTER_DIR)
    return {"tok": tok, "root": root}


def fresh_run(setup) -> MergedLM:
    lm = make_tiny_lm("llama", len(setup["tok"]), context=256)
    lm.config.eos_token_id = lm.config.pad_token_id = setup["tok"].eos_token_id
    return MergedLM(lm, setup["tok"])


def test_labels_name_the_variant():
    assert label("ktoken") == "K-Token Merging (frozen LM)"
    assert label("ktoken_lora") == "K-Token Merging (LoRA LM)"


def test_each_variant_takes_only_its_own_folders(setup):
    root = setup["root"]
    check_methods(["ktoken", "ktoken_lora"],
                  {"ktoken": {"path": root / "frozen"}, "ktoken_lora": {"path": root / "lora"}})
    for name, folder, hint in (("ktoken", "lora", "ktoken_lora"), ("ktoken_lora", "frozen", "'ktoken'")):
        with pytest.raises(UserError, match=hint) as e:
            check_methods([name], {name: {"path": root / folder}})
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="conf/ktoken_lora.yaml"):
        check_methods(["ktoken_lora"], {})


def test_the_adapter_is_on_only_while_ktoken_lora_scores(setup):
    m, root = fresh_run(setup), setup["root"]
    ids = setup["tok"](" ".join(load_documents("pydoc", "test")[:20]), add_special_tokens=False)["input_ids"]
    ctx, tgt = ids[:48], ids[48:64]
    base = make_method("base", merged_lm=m)
    before = base.score_continuation(m, ctx, tgt).nll
    lora = make_method("ktoken_lora", 0.0, merged_lm=m, path=root / "lora")
    torch.testing.assert_close(base.score_continuation(m, ctx, tgt).nll, before, rtol=0, atol=0)
    adapted = lora.score_continuation(m, ctx, tgt).nll
    assert (adapted - before).abs().max() > 1e-3  # the adapter changes the LM while this method runs
    frozen = make_method("ktoken", 0.0, merged_lm=m, path=root / "frozen")
    torch.testing.assert_close(frozen.score_continuation(m, ctx, tgt).nll, before, rtol=0, atol=0)
    torch.testing.assert_close(base.score_continuation(m, ctx, tgt).nll, before, rtol=0, atol=0)
    assert not any(p.requires_grad for p in m.lm.parameters())
    # a runner that builds the method again reuses the adapter in place; another adapter is refused
    again = make_method("ktoken_lora", 0.0, merged_lm=m, path=root / "lora")
    torch.testing.assert_close(again.score_continuation(m, ctx, tgt).nll, adapted, rtol=0, atol=0)
    with pytest.raises(UserError, match="separate run"):
        make_method("ktoken_lora", 0.0, merged_lm=m, path=root / "lora2")


def test_compare_lists_both_variants(setup):
    from umim_eval.tasks.compare import CompareConfig, compare_table, run_compare

    root = setup["root"]
    cfg = CompareConfig(data="pydoc", n_samples=2, context_tokens=48, target_tokens=16, targets=[0.0, 0.25],
                        methods=["ktoken", "ktoken_lora"],
                        method_options={"ktoken": {"path": str(root / "frozen")},
                                        "ktoken_lora": {"path": str(root / "lora")}})
    result = run_compare(cfg, progress=False, merged_lm=fresh_run(setup))
    rows = {(r["target"], r["method"]): r for r in result["rows"]}
    assert rows[0.0, "ktoken"]["ppl"] == pytest.approx(result["base"]["ppl"], rel=1e-6)  # the unadapted LM
    assert rows[0.0, "ktoken_lora"]["ppl"] != pytest.approx(result["base"]["ppl"], rel=1e-3)
    assert all(abs(rows[0.25, n]["achieved_tr"] - 0.25) <= 0.02 for n in ("ktoken", "ktoken_lora"))
    table = compare_table(result)
    assert "| K-Token Merging (frozen LM) |" in table and "| K-Token Merging (LoRA LM) |" in table


def test_conf_ktoken_lora_parses_with_the_real_cli():
    from umim.cli import UMIMCLI, build_cli

    class ParseOnlyCLI(UMIMCLI):
        def instantiate_classes(self) -> None:
            pass

    cfg = build_cli(["--config", str(CONF)], cli_class=ParseOnlyCLI, run=False).config
    assert cfg.model.class_path == "umim.ktoken.training.KTokenLoRA"
    assert cfg.model.init_args.lm.name_or_path == "embedded" and cfg.model.init_args.ktoken.k == 4
    assert cfg.model.init_args.lora.r == 8
    assert cfg.model.init_args.export_dir == "runs/ktoken_lora/ktoken"
    assert cfg.data.class_path == "umim.ktoken.training.KTokenDataModule"
