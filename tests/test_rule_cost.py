"""Measured rule cost and selection by cost (umim.rules.cost) on a real tiny Llama with a random merger
and frequency rules mined from pydoc text: every fired rule gets a cost, a rule that never fires gets
none, the charged KL equals merging that one span by hand, the costs file round-trips and refuses
another rule set, selection hits its target TR on the scoring text and writes a loadable subset,
``umim_budget`` with ``score="cost"`` merges the cheapest match first, and bad inputs are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama_run, make_tiny_lm, pydoc_paragraphs

from umim.cli import main as umim_main
from umim.errors import UserError
from umim.fingerprint import tokenizer_fingerprint
from umim.inference.generation import MergedLM, SamplingConfig
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.corpus import tokenize_documents
from umim.rules.cost import (
    RuleCosts,
    RuleCostsError,
    assign_passes,
    cost_order,
    count_order,
    measured_tr,
    min_passes,
    rule_list,
    rules_digest,
    score_rules,
    select_by_order,
    subset_rules,
)
from umim.rules.mining import mine_rules
from umim.rules.store import MergeRules
from umim.training.datamodule import pack_blocks
from umim_eval.methods.umim_budget import UMIMBudget

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_merger(fp: dict) -> MergeModule:
    torch.manual_seed(1)
    merger = MergeModule(MergerConfig(hidden_size=32, tokenizer=fp))
    torch.nn.init.normal_(merger.v_proj.weight, std=0.3)  # far from the mean, so merges visibly cost KL
    return merger.eval()


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_factory):
    train = pydoc_paragraphs(0, 40)
    tok = tiny_tokenizer_factory(train, vocab_size=300)
    fp = tokenizer_fingerprint(tok)
    ids, off = tokenize_documents(train, tok, progress=False)
    mined = mine_rules(ids, off, fp, min_count=3, progress=False)
    # one extra rule that cannot fire: the unknown token twice
    ngrams = {n: g.copy() for n, g in mined.ngrams.items()}
    counts = {n: c.copy() for n, c in mined.counts.items()}
    ngrams[2], counts[2] = np.vstack([ngrams[2], [[0, 0]]]), np.append(counts[2], 1)
    rules = MergeRules(ngrams=ngrams, counts=counts, tokenizer=fp, corpus="pydoc paragraphs")
    lm = make_tiny_lm("llama", len(tok))
    blocks = pack_blocks(ids, off, 64, None)[:24]
    return lm, tok, _random_merger(fp), rules, blocks


@pytest.fixture(scope="module")
def costs(tiny):
    lm, _, merger, rules, blocks = tiny
    return score_rules(lm, merger, rules, blocks, window=3, batch_size=8, progress=False)


def test_every_fired_rule_gets_a_cost_and_unfired_rules_none(tiny, costs):
    _, _, _, rules, blocks = tiny
    starts, lens = rules.matcher.segment_batch(blocks)
    merges = lens > 1
    assert costs.fires.sum() == merges.sum()  # every occurrence scored exactly once over the passes
    assert (costs.saved.sum() == (lens[merges] - 1).sum())
    assert costs.tr() == pytest.approx(measured_tr(rules, blocks))
    fired = costs.fires > 0
    assert fired.sum() > 20
    cost = costs.cost
    assert np.isfinite(cost[fired]).all() and (cost[fired] > -1e-5).all()
    assert np.isnan(cost[~fired]).all()
    unk = rule_list(rules).index((0, 0))
    assert costs.fires[unk] == 0 and (0, 0) not in costs.table()
    assert costs.kl_sum[fired].max() > 0.01  # a random merger does change the predictions


@pytest.mark.parametrize("window", [0, 1, 3, 6])
def test_merges_of_one_pass_stay_out_of_each_others_window(tiny, window):
    _, _, _, rules, blocks = tiny
    starts, lens = rules.matcher.segment_batch(blocks)
    P = min_passes(window)
    which = assign_passes(lens, P, np.random.default_rng(0))
    b, s = np.nonzero(lens > 1)
    st, ln = starts[b, s], lens[b, s]
    assert which.min() >= 0 and which.max() < P and len(which) == len(b)
    for p in range(P):
        m = which == p
        same_row = b[m][1:] == b[m][:-1]
        # the next merge of the pass starts after this span and the k single tokens charged to it
        assert (st[m][1:] - st[m][:-1] >= ln[m][:-1] + window)[same_row].all()
    if window:
        assert len(set(which.tolist())) == P  # the passes really split the merges


def test_charged_kl_equals_merging_that_span_alone(tiny):
    """One rule that fires once: its kl_sum is the KL at its aligned position and the next k, as
    computed here from full logits of a hand-built merged input."""
    lm, _, merger, rules, blocks = tiny
    row = blocks[3]
    pairs = np.stack([row[:-1], row[1:]], 1)
    keys = pairs[:, 0] * 10_000 + pairs[:, 1]
    uniq, first, cnt = np.unique(keys, return_index=True, return_counts=True)
    i = int(next(p for p in sorted(first[cnt == 1]) if 5 < p < len(row) - 10))
    gram = row[i : i + 2]
    one = MergeRules(ngrams={2: gram[None]}, counts={2: np.array([7])}, tokenizer=rules.tokenizer)
    k = 3
    got = score_rules(lm, merger, one, row[None], window=k, progress=False)
    assert got.fires.tolist() == [1]

    ids = torch.from_numpy(row)[None]
    embed = lm.get_input_embeddings()
    with torch.no_grad():
        e = embed(ids)[0]
        sur = merger(embed(ids[:, i : i + 2]), torch.ones(1, 2, dtype=torch.bool))[0]
        student_in = torch.cat([e[:i], sur[None], e[i + 2 :]])[None]
        t = torch.log_softmax(lm(input_ids=ids).logits[0].float(), -1)
        s = torch.log_softmax(lm(inputs_embeds=student_in).logits[0].float(), -1)
    # student position i + j predicts what the teacher predicts at original position i + 1 + j
    want = sum(float((t[i + 1 + j].exp() * (t[i + 1 + j] - s[i + j])).sum()) for j in range(k + 1))
    assert got.kl_sum[0] == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_costs_file_round_trips_and_refuses_other_rules(tiny, costs, tmp_path):
    _, _, _, rules, _ = tiny
    path = costs.save(tmp_path / "costs.json")
    back = RuleCosts.load(path, rules)
    assert back.ngrams == costs.ngrams
    np.testing.assert_array_equal(back.fires, costs.fires)
    np.testing.assert_allclose(back.kl_sum, costs.kl_sum)
    np.testing.assert_array_equal(np.isnan(back.cost), np.isnan(costs.cost))
    assert back.table() == pytest.approx(costs.table())
    assert back.meta["rules_sha256"] == rules_digest(rules) and back.meta["settings"]["window"] == 3
    rows = json.loads(path.read_text())["rules"]
    assert any(r["cost"] is None and r["fires"] == 0 for r in rows)
    other = subset_rules(rules, np.arange(10))
    with pytest.raises(RuleCostsError, match="another rule set"):
        RuleCosts.load(path, other)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RuleCostsError, match="corrupted"):
        RuleCosts.load(tmp_path / "bad.json")
    (tmp_path / "v9.json").write_text(json.dumps({**json.loads(path.read_text()), "version": 9}))
    with pytest.raises(RuleCostsError, match="version"):
        RuleCosts.load(tmp_path / "v9.json")
    with pytest.raises(RuleCostsError, match="score-rules"):
        RuleCosts.load(tmp_path / "missing")


@pytest.mark.parametrize("target", [0.05, 0.10])
def test_selection_hits_target_tr_and_is_a_subset(tiny, costs, tmp_path, target):
    _, tok, _, rules, blocks = tiny
    order = cost_order(costs)
    keep, tr = select_by_order(rules, order, blocks, target, tolerance=0.005)
    assert abs(tr - target) <= 0.005
    chosen = subset_rules(rules, keep, {"method": "cost", "target_tr": target})
    assert measured_tr(chosen, blocks) == pytest.approx(tr)
    assert set(rule_list(chosen)) <= set(rule_list(rules)) and len(chosen) == len(keep)
    # the cheapest rules are kept first: nothing kept costs more than the dearest rule left out of the prefix
    assert np.nanmax(costs.cost[keep]) <= np.nanmax(costs.cost[order]) + 1e-12
    chosen.save(tmp_path / "sel")
    back = MergeRules.load(tmp_path / "sel", tokenizer=tok)
    assert back.selection["target_tr"] == target and back.tokenizer == rules.tokenizer
    for n in back.ngrams:
        np.testing.assert_array_equal(back.ngrams[n], chosen.ngrams[n])


def test_selection_refuses_a_target_beyond_the_rules(tiny, costs):
    _, _, _, rules, blocks = tiny
    with pytest.raises(UserError, match="lower the target"):
        select_by_order(rules, cost_order(costs), blocks, 0.95)


def test_selection_never_saves_an_empty_rule_set(tiny, costs):
    """A target below what the cheapest rule alone removes is refused, not answered with no rules."""
    _, _, _, rules, blocks = tiny
    with pytest.raises(UserError, match="raise the target"):
        select_by_order(rules, cost_order(costs), blocks, 1e-6, tolerance=1e-7)


def test_budget_refuses_costs_scored_for_another_rule_set(tiny, costs, tmp_path):
    lm, tok, merger, rules, blocks = tiny
    other = subset_rules(rules, cost_order(costs)[:5], {"method": "cost"})
    with pytest.raises(UserError, match="another rule set"):
        UMIMBudget(MergedLM(lm, tok, merger, other), 0.1, score="cost", costs=costs)
    costs.save(tmp_path / "costs.json")
    with pytest.raises(UserError, match="another rule set"):
        UMIMBudget(MergedLM(lm, tok, merger, other), 0.1, score="cost", costs=tmp_path / "costs.json")


def test_budget_takes_the_costs_of_the_rules_a_subset_was_selected_from(tiny, costs, tmp_path):
    """A fit's rules/ is selected from its mined rules, whose costs it writes: those costs serve the subset."""
    lm, tok, merger, rules, blocks = tiny
    keep = cost_order(costs)[:5]
    costs.save(tmp_path / "costs.json")
    chosen = subset_rules(rules, keep, {"method": "cost", "source_rules_sha256": rules_digest(rules)})
    budget = UMIMBudget(MergedLM(lm, tok, merger, chosen), 0.1, score="cost", costs=tmp_path / "costs.json")
    table = costs.table()
    assert set(rule_list(chosen)) <= set(budget._costs) and all(budget._costs[g] == table[g] for g in rule_list(chosen))
    # a subset of another rule set is refused
    stranger = subset_rules(rules, keep, {"method": "cost", "source_rules_sha256": "0" * 64})
    with pytest.raises(UserError, match="another rule set"):
        UMIMBudget(MergedLM(lm, tok, merger, stranger), 0.1, score="cost", costs=tmp_path / "costs.json")


def test_shrunk_costs_pull_rare_rules_toward_the_mean(costs):
    raw, fired = costs.cost, costs.fires > 0
    np.testing.assert_allclose(costs.shrunk_cost(0.0)[fired], raw[fired])
    mean = costs.kl_sum.sum() / costs.saved.sum()
    shrunk = costs.shrunk_cost(8.0)
    assert np.isnan(shrunk[~fired]).all()
    # every cost moves toward the mean, and rules seen on fewer merges move further
    assert (np.abs(shrunk[fired] - mean) <= np.abs(raw[fired] - mean) + 1e-12).all()
    far = np.abs(raw - mean) > 1e-3
    moved = np.abs(shrunk - raw) / np.abs(raw - mean)
    one, many = fired & far & (costs.saved == costs.saved[fired].min()), fired & far & (costs.saved >= 4)
    assert one.any() and many.any() and moved[one].min() > moved[many].max() - 1e-12
    assert (np.diff(shrunk[cost_order(costs, prior=8.0)]) >= 0).all()
    with pytest.raises(UserError, match="prior"):
        costs.shrunk_cost(-1.0)


def test_count_order_is_by_frequency(tiny):
    _, _, _, rules, _ = tiny
    counts = np.concatenate([rules.counts[n] for n in sorted(rules.ngrams)])
    assert (np.diff(counts[count_order(rules)]) <= 0).all()


def test_budget_cost_score_merges_the_cheapest_match_first(tiny, costs):
    lm, tok, merger, rules, blocks = tiny
    m = MergedLM(lm, tok, merger, rules)
    ids = blocks[5].tolist()
    matches = [(s, n) for s, n in rules.segment(ids) if n > 1]
    assert len(matches) >= 3
    for pick in (matches[0], matches[-1]):
        grams = {tuple(ids[s : s + n]) for s, n in matches}
        table = {g: 5.0 for g in grams}
        table[tuple(ids[pick[0] : pick[0] + pick[1]])] = 0.1
        b = UMIMBudget(m, 0.0, score="cost", costs=table, split_matches=False)
        spans, _ = b.select(ids, pick[1] - 1)
        assert spans == [pick]  # cheapest first; it uses the whole budget
    # stored costs work as the source too, and the dearer rule never goes before a cheaper one
    b = UMIMBudget(m, 0.0, score="cost", costs=costs, split_matches=False)
    table = costs.table()
    first = sorted(matches, key=lambda x: (table.get(tuple(ids[x[0] : x[0] + x[1]]), np.inf), -x[1], x[0]))[0]
    assert b.select(ids, first[1] - 1)[0] == [first]
    with pytest.raises(UserError, match="score='cost' needs"):
        UMIMBudget(m, 0.1, score="cost")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder (merger + rules) for the tiny Llama saved on disk, for the commands."""
    from transformers import AutoTokenizer

    root = make_tiny_llama_run(tmp_path_factory.mktemp("cost"))
    assert umim_main(["mine", "--tokenizer", str(root / "lm"), "--data", str(root / "corpus"), "--min_count", "2",
                      "--out", str(root / "run" / "rules")]) == 0
    fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(root / "lm"))
    _random_merger(fp).save_pretrained(root / "run" / "merger")
    return root


def test_commands_score_then_select(tiny_run, capsys):
    root = tiny_run
    run, rules_dir = root / "run", root / "run" / "rules"
    rc = umim_main(["score-rules", "--lm", str(root / "lm"), "--run_dir", str(run), "--data", str(root / "corpus"),
                    "--block_size", "64", "--max_blocks", "64", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    costs = RuleCosts.load(rules_dir, MergeRules.load(rules_dir))
    assert costs.meta["text"]["blocks"] == 64 and costs.meta["merger_sha256"]
    assert (costs.fires > 0).any()
    out = root / "selected"
    rc = umim_main(["select-rules", "--rules", str(rules_dir), "--target_tr", "0.06", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "lm")
    chosen, source = MergeRules.load(out, tokenizer=tok), MergeRules.load(rules_dir)
    assert set(rule_list(chosen)) < set(rule_list(source))
    assert chosen.selection["method"] == "cost" and chosen.selection["source_rules_sha256"] == rules_digest(source)
    from umim.rules.cost import text_blocks

    t = costs.meta["text"]
    blocks = text_blocks(tok, t["data"], t["split"], t["block_size"], None, progress=False)  # TR on the whole split
    assert abs(measured_tr(chosen, blocks) - 0.06) <= 0.005
    assert chosen.selection["measured_tr"] == pytest.approx(measured_tr(chosen, blocks))
    # training reads it as data.rules (segmented batches), inference merges with it
    from umim.lm import LMSpec
    from umim.training.datamodule import UMIMDataModule

    dm = UMIMDataModule(corpus=str(root / "corpus"), lm=LMSpec(str(root / "lm")), rules=str(out), block_size=64,
                        batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert any((b["seg_len"] > 1).any() for b in batches) and batches[0]["max_span"] == max(chosen.ngrams)
    m = MergedLM.load(root / "lm", merger=run / "merger", rules=out, device="cpu")
    prompt = max(blocks.tolist(), key=m.token_reduction)  # a scored block: the kept rules fire there
    r = m.generate(prompt, "prompt", SamplingConfig(max_new_tokens=2))[0]
    assert r.prompt_len_merged < r.prompt_len == len(prompt)


@pytest.mark.parametrize("argv, needle", [
    (["select-rules", "--rules", "<rules>", "--out", "<tmp>/x"], "exactly one of --target_tr"),
    (["select-rules", "--rules", "<rules>", "--target_tr", "10", "--out", "<tmp>/x"], "fraction"),
    (["select-rules", "--rules", "<rules>", "--max_cost", "-1", "--out", "<tmp>/x"], "--max_cost"),
    (["select-rules", "--rules", "<rules>", "--target_tr", "0.1", "--costs", "<tmp>/none.json", "--out", "<tmp>/x"],
     "no rule costs"),
    (["select-rules", "--rules", "<rules>", "--target_tr", "0.1", "--out", "<rules>"], "source rules folder"),
    (["select-rules", "--rules", "<tmp>/nothing", "--target_tr", "0.1", "--out", "<tmp>/x"], "merge-rules"),
    (["select-rules", "--rules", "<rules>", "--target_tr", "0.1", "--prior", "-2", "--out", "<tmp>/x"], "--prior"),
    (["select-rules", "--rules", "<rules>", "--target_tr", "0.1", "--tr_blocks", "0", "--out", "<tmp>/x"],
     "--tr_blocks"),
    (["score-rules", "--run_dir", "<run>", "--window", "-1"], "--window"),
    (["score-rules", "--run_dir", "<run>", "--window", "3", "--passes", "2"], "--passes"),
    (["score-rules", "--run_dir", "<tmp>/no-run"], "no merger"),
    (["score-rules", "--run_dir", "<run>", "--out", "<rules>/rules.json"], "not a rule-costs file"),
])
def test_bad_inputs_are_one_line(tiny_run, tmp_path, capsys, argv, needle):
    subs = {"<rules>": str(tiny_run / "run" / "rules"), "<run>": str(tiny_run / "run"), "<tmp>": str(tmp_path)}
    for k, v in subs.items():
        argv = [a.replace(k, v) for a in argv]
    assert umim_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and needle in err, err
