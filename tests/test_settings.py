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
