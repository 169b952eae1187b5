"""benchmarks/gpu_decode.py on a tiny CPU model: the forced streams make HF ``generate``, UMIM ``none``
and ``dynamic`` emit the same tokens, merging saves the planted share of positions, and the KV
figures agree with the schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import benchmark_script

from umim.errors import cli_entry

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--tiny", "--device", "cpu", "--dtype", "float32", "--prompt", "64", "--new", "32"]


@pytest.fixture(scope="module")
def gpu_decode():
    with benchmark_script("gpu_decode") as mod:
        yield mod


def _records(out: str) -> list[dict]:
    return [json.loads(line[len("GPUDECODE "):]) for line in out.splitlines() if line.startswith("GPUDECODE ")]


def test_tiny_run_verifies_and_reports(gpu_decode, capsys, tmp_path):
    assert gpu_decode.main([*TINY, "--batch", "1,3", "--repeat", "2", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    records = _records(out)
    assert [r["batch"] for r in records] == [1, 3]
    for r in records:
        assert r["tokens_equal"] and r["rounds"] == 2
        assert abs(r["tr"] - 0.35) <= 0.01 and abs(r["tr_prompt"] - 0.35) <= 0.01 and abs(r["tr_new"] - 0.35) <= 0.01
        # every dynamic row ends with the schedule's (1 - TR) share of positions
        assert r["kv_len_final"] == r["expected_kv_len"]
        assert abs(sum(r["expected_kv_len"]) / (r["batch"] * (64 + 32)) - (1 - r["tr"])) < 1e-3
        assert r["hf_kv_slots"] == 64 + 32 - 1  # HF does not feed its last token
        assert r["hf_kv_bytes"] == r["kv_bytes_per_token"] * r["batch"] * r["hf_kv_slots"]
        # dynamic's KV bytes are its rows' entries (up to one spare slot per row) over HF's rectangle
        want = sum(r["expected_kv_len"]) / (r["batch"] * r["hf_kv_slots"])
        assert want <= r["kv_ratio"] + 1e-4 and r["kv_ratio"] <= want + 1 / r["hf_kv_slots"] + 1e-4
        assert r["ideal_speedup"] > 1 and r["ideal_dynamic_tok_s"] > r["ideal_unmerged_tok_s"]
        assert all(r[f"{k}_tok_s"] > 0 for k in ("hf", "none", "dynamic"))
        lo, med, hi = r["dynamic_vs_hf"]
        assert 0 < lo <= med <= hi
    assert "| 3 |" in out and json.loads((tmp_path / "r.json").read_text())["cases"] == records


def test_planted_rules_are_what_prompt_merging_finds(gpu_decode):
    """The schedule's saved positions are exactly those of the rules' longest-match segmentation,
    and rows merge at different steps."""
    rng = np.random.default_rng(0)
    tok = gpu_decode.build_tokenizer(1024, 1, 2)
    rules, fillers = gpu_decode.build_rules(rng, np.arange(3, 1024), 16, gpu_decode.tokenizer_fingerprint(tok))
    assert not set(fillers.tolist()) & {t for g in rules.ngrams.values() for t in g.ravel().tolist()}
    stream = gpu_decode.plant(rng, rules, fillers, 4, 200, 0.35)
    assert (stream.saved.sum(1) == 70).all()
    for ids, saved in zip(stream.ids.tolist(), stream.saved):
        segs = rules.segment(ids)
        ends = np.zeros(len(ids), dtype=np.int64)
        for s, n in segs:
            ends[s + n - 1] = n - 1
        assert (ends == saved).all()
    assert len({tuple(np.flatnonzero(s)) for s in stream.saved}) > 1


def test_verify_refuses_other_tokens_or_kv(gpu_decode):
    forced = np.array([[5, 6, 7]])
    run = gpu_decode.Run(1.0, 0.5, 3, [[5, 6, 8]], 0, 0, [4], None)
    with pytest.raises(gpu_decode.VerifyError, match="did not emit the forced tokens"):
        gpu_decode.verify("hf", run, forced, np.array([4]))
    run.tokens = [[5, 6, 7]]
    with pytest.raises(gpu_decode.VerifyError, match="final KV lengths"):
        gpu_decode.verify("dynamic", run, forced, np.array([3]))


def test_unforced_umim_decode_fails_the_case(gpu_decode, capsys, monkeypatch):
    """Without the forcing processor UMIM decodes the random model's own greedy tokens: the case is
    reported as failed (exit 1) and gives no figures."""
    monkeypatch.setattr(gpu_decode.ForcedSampling, "processors", lambda self: gpu_decode.LogitsProcessorList())
    assert gpu_decode.main([*TINY, "--batch", "1", "--repeat", "1"]) == 1
    out = capsys.readouterr().out
    assert "batch 1 FAILED verification" in out and not _records(out)


def test_time_guard_skips_cases(gpu_decode, capsys):
    assert gpu_decode.main([*TINY, "--batch", "1", "--max-seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert "skipped batch 1" in out and not _records(out)


@pytest.mark.parametrize("argv, says", [
    (["--batch", "1,x"], "--batch"), (["--tr", "0.9"], "--tr 0.9"), (["--new", "0"], "--new 0"),
    (["--tiny", "--rules-per-n", "200"], "--rules-per-n 200"), (["--tiny", "--new", "2"], "--new 2: too short"),
])
def test_bad_settings_are_one_line(gpu_decode, capsys, argv, says):
    assert cli_entry(gpu_decode.main, ["--device", "cpu", "--dtype", "float32", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err and "\n" not in err
