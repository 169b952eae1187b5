"""The one command-line mechanism (:mod:`umim.settings`): the earlier argparse spellings reach the
same settings as jsonargparse's own."""

from __future__ import annotations

import pytest

from umim.cli import GenerateConfig, MineConfig
from umim.errors import UserError
from umim.settings import parse_settings


def mine(*argv):
    return parse_settings(MineConfig, ["--tokenizer", "t", "--data", "d", "--out", "o", *argv], "umim mine",
                          legacy=True)


def generate(*argv):
    return parse_settings(GenerateConfig, ["--prompt", "p", *argv], "umim generate", aliases={"model": "lm"},
                          legacy=True)


@pytest.mark.parametrize("argv, filters", [
    ((), ["intra", "inter"]),
    (("--filters", "intra"), ["intra"]),
    (("--filters", "intra", "inter"), ["intra", "inter"]),
    (("--filters",), []),
    (("--filters", "[inter]"), ["inter"]),
    (("--no-filter",), []),
    (("--no_filter", "true"), []),
    (("--model-prob", "0.5"), []),
])
def test_mine_filters(argv, filters):
    assert mine(*argv).filters == filters


def test_mine_defaults_follow_model_prob():
    assert mine().min_count == 5 and mine("--model_prob", "0.5").min_count == 1
    assert mine("--model-prob", "0.5", "--min-count", "3").min_count == 3


def test_generate_spellings():
    a = generate("--model", "m", "--max-new-tokens", "3", "--do-sample", "--top-p", "0.5", "--stop", "a",
                 "--stop", "[/INST]", "--stop=-->", "--json")
    assert (a.lm, a.max_new_tokens, a.do_sample, a.top_p, a.json) == ("m", 3, True, 0.5, True)
    assert a.stop == ["a", "[/INST]", "-->"]
    b = generate("--lm", "m", "--max_new_tokens", "3", "--do_sample", "true", "--stop", '["a", "b"]')
    assert (b.lm, b.max_new_tokens, b.do_sample, b.stop) == ("m", 3, True, ["a", "b"])
    assert generate("--prompt", "-x").prompt == "-x"
    assert generate("--do_sample", "--temperature", "-1").temperature == -1.0  # SamplingConfig refuses it later


def test_generate_needs_a_prompt():
    with pytest.raises(UserError, match="--prompt"):
        parse_settings(GenerateConfig, [], "umim generate")


def test_command_listings_and_unknown_commands(capsys):
    from umim.cli import main as umim_main
    from umim_eval.cli import main as eval_main

    assert umim_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {c} " in out for c in ("fit", "validate", "test", "mine", "generate"))
    assert eval_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {c} " in out for c in ("compare", "ppl", "qa", "lm-eval"))
    assert umim_main(["bogus"]) == 2 and eval_main(["bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: unknown command 'bogus'") for e in err)


def test_install_hook_into_a_missing_folder_is_one_line(tmp_path, capsys):
    from umim_eval.cli import main

    assert main(["install-lm-eval-hook", "--site", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --site") and "nope" in err and "\n" not in err
    assert not (tmp_path / "nope").exists()
