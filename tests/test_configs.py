"""Every YAML in conf/ parses against the real `umim` entry point; unknown keys are refused."""

from pathlib import Path

import pytest

from umim.cli import UMIMCLI, names_model_class
from umim.training.datamodule import UMIMDataModule
from umim.training.distillation import UMIMDistillation

# UMIM's configs; those that pick another LightningModule by class_path (conf/ktoken.yaml) are parsed
# by the tests of that module
CONF = sorted(p for p in (Path(__file__).parents[1] / "conf").glob("*.yaml")
              if not names_model_class(["--config", str(p)]))


class ParseOnlyCLI(UMIMCLI):
    """Parses and validates (class paths, init args, links) without building models or trainers."""

    def instantiate_classes(self) -> None:
        pass


def parse(*args):
    return ParseOnlyCLI(UMIMDistillation, UMIMDataModule, run=False, args=list(args)).config


@pytest.mark.parametrize("path", CONF, ids=[p.name for p in CONF])
def test_config_parses(path):
    cfg = parse("--config", str(path))
    data_lm = cfg.data.lm.get("init_args", cfg.data.lm)
    assert data_lm.name_or_path == cfg.model.lm.name_or_path  # one LM for teacher, student and tokenizer
    assert cfg.model.merger.num_heads == 4
    assert cfg.data.mining.min_count == 5


def test_paper_settings():
    assert {p.name for p in CONF} >= {"default.yaml", "gpt2xl.yaml", "llama3.2-1b.yaml", "llama3.1-8b.yaml",
                                      "deepscaler-1.5b.yaml"}
    for name in ("gpt2xl", "llama3.2-1b", "llama3.1-8b", "deepscaler-1.5b"):
        cfg = parse("--config", str(CONF[0].parent / f"{name}.yaml"))
        assert cfg.trainer.max_epochs == 15 and cfg.model.lr == 8e-4 and cfg.model.weight_decay == 1e-3
        assert cfg.data.block_size == (1024 if name == "deepscaler-1.5b" else 512)
        strategy = cfg.trainer.strategy
        if name in ("llama3.1-8b", "deepscaler-1.5b"):
            assert strategy.class_path == "umim.training.strategy.DecoderLayerFSDP"
        else:
            assert strategy == "ddp"


def test_unknown_key_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONF[0].parent / "default.yaml").read_text().replace("  block_size: 256",
                                                                         "  block_size: 256\n  blok_size: 3"))
    with pytest.raises(SystemExit):
        parse("--config", str(bad))
    assert "blok_size" in capsys.readouterr().err
