"""TR-quality frontier of rule subsets: most frequent rules vs cheapest by measured cost.

A run's rules are cut down to subsets that reach each target TR on the *scoring* text (the run's
training corpus, train split: the text ``umim score-rules`` measures costs on), two ways, both with
:func:`umim.rules.cost.select_by_order` (prefix of an order, TR re-measured with the subset's own
longest match, adjusted to within 0.5 points):

* ``count``: rules by mining-corpus frequency, most frequent first (what a smaller tau gives);
* ``cost``:  rules by measured KL per saved position, cheapest first (``umim select-rules``).

Each subset then merges the *test* split (never scored on) with the run's trained merger; the table
gives the TR reached there, the mean KL(teacher || merged student) over every student position
(aligned with the teacher's position at its segment's last token) and the rise in next-token NLL
(nats) at those positions. The full rule set is the last row.

Costs come from ``--costs FILE`` (a ``costs.json`` of ``umim score-rules`` on these rules; its text
settings are reused for selection), else they are scored here on ``--score_blocks`` train blocks.

Usage (writing where ``notebooks/tr_vs_quality.ipynb`` plots it, RESULTS being its ``UMIM_RESULTS``)::

    python benchmarks/rule_frontier.py --costs /path/costs.json --json RESULTS/rule_frontier/rule_frontier.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def evaluate(lm, merger, subsets: dict, blocks: np.ndarray, batch_size: int = 4) -> dict:
    """Per subset: TR on ``blocks`` [N, L], mean KL over all student positions, and at the student
    positions that have a next original token: mean NLL of it for student and teacher (``dnll``, and
    ``ppl_rise`` = exp(dnll) - 1, the perplexity increase) and the top-1 agreement of their argmaxes."""
    from umim.merging.batch import build_merged_batch
    from umim.merging.span_encoder import RuleSegmenter
    from umim.rules.cost import position_kl
    from umim.training.distillation import teacher_hidden

    head, embed = lm.get_output_embeddings(), lm.get_input_embeddings()
    acc = {k: {"kl": 0.0, "pos": 0, "nll_s": 0.0, "nll_t": 0.0, "top1": 0, "tgt": 0, "tokens": 0} for k in subsets}
    N, L = blocks.shape
    for i in range(0, N, batch_size):
        ids = torch.from_numpy(blocks[i : i + batch_size]).to(lm.device)
        B = len(ids)
        lengths = torch.full((B,), L, device=lm.device)
        with torch.no_grad():
            t_h = teacher_hidden(lm, {"input_ids": ids, "lengths": lengths})
            for name, rules in subsets.items():
                seg = RuleSegmenter(rules)
                starts, lens = seg.segment_batch(blocks[i : i + batch_size], np.full(B, L))
                mb = build_merged_batch(ids, torch.from_numpy(starts), torch.from_numpy(lens), embed, merger,
                                        lengths, max(seg.max_span, 2))
                s_h = lm.base_model(inputs_embeds=mb.inputs_embeds, attention_mask=mb.attention_mask,
                                    use_cache=False).last_hidden_state
                b, s = (mb.seg_len > 0).nonzero(as_tuple=True)
                tp = mb.teacher_pos[b, s]
                th, sh = t_h[b, tp], s_h[b, s]
                a = acc[name]
                a["kl"] += float(position_kl(th, sh, head).double().sum())
                a["pos"] += len(b)
                a["tokens"] += B * L
                has = tp + 1 < L  # the next original token exists
                tgt = ids[b[has], tp[has] + 1]
                sh_t, th_t = sh[has], th[has]
                for j in range(0, len(tgt), 256):
                    part = slice(j, j + 256)
                    ls, lt = (torch.log_softmax(head(h[part]).float(), -1) for h in (sh_t, th_t))
                    a["nll_s"] += float(-ls.gather(1, tgt[part, None]).sum())
                    a["nll_t"] += float(-lt.gather(1, tgt[part, None]).sum())
                    a["top1"] += int((ls.argmax(-1) == lt.argmax(-1)).sum())
                a["tgt"] += int(has.sum())
    return {k: {"tr": 1 - a["pos"] / a["tokens"], "kl": a["kl"] / a["pos"],
                "dnll": (a["nll_s"] - a["nll_t"]) / a["tgt"], "nll_teacher": a["nll_t"] / a["tgt"],
                "ppl_rise": math.exp((a["nll_s"] - a["nll_t"]) / a["tgt"]) - 1, "top1": a["top1"] / a["tgt"]}
            for k, a in acc.items()}


def _ratio(x: float, y: float) -> float:
    return x / y if y else math.nan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run_dir", default="runs/default")
    p.add_argument("--rules", help="rules folder cut into subsets (default: the run's rules/; a fit with rule "
                                   "selection keeps all it mined in mined_rules/, their costs in rule_costs.json)")
    p.add_argument("--costs", help="costs.json from `umim score-rules` on these rules (default: score here)")
    p.add_argument("--score_blocks", type=int, default=48, help="train blocks scored when --costs is not given")
    p.add_argument("--test_blocks", type=int, default=16, help="test-split blocks evaluated")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--trs", type=float, nargs="+", default=[0.05, 0.10, 0.15, 0.20])
    p.add_argument("--priors", type=float, nargs="*", default=[4.0],
                   help="also rank by costs shrunk by these pseudo saved positions (select-rules --prior)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument("--json", default="rule_frontier.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from umim.inference.loading import ModelArgs
    from umim.rules.cost import (
        RuleCosts,
        cost_order,
        count_order,
        run_corpus,
        score_rules,
        select_by_order,
        subset_rules,
        text_blocks,
    )

    t0 = time.perf_counter()
    model = ModelArgs(run_dir=a.run_dir, rules=a.rules).load()
    corpus = (run_corpus(a.run_dir) or ("pydoc", a.block_size))[0]
    if a.costs:
        costs = RuleCosts.load(a.costs, model.rules)
        scored_here = 0.0
    else:
        score = text_blocks(model.tokenizer, corpus, "train", a.block_size, a.score_blocks, 0)
        ts = time.perf_counter()
        costs = score_rules(model.lm, model.merger, model.rules, score)
        costs.meta["text"] = {"data": corpus, "split": "train", "block_size": a.block_size,
                              "max_blocks": a.score_blocks, "blocks": len(score), "seed": 0}
        scored_here = time.perf_counter() - ts
    t = costs.meta["text"]  # TR is measured on the whole scoring split, as `umim select-rules` does
    select_on = text_blocks(model.tokenizer, t["data"], t["split"], t["block_size"], None, t["seed"])
    test = text_blocks(model.tokenizer, corpus, "test", a.block_size, a.test_blocks, 0)

    subsets, chosen = {}, {}
    orders = {"count": count_order(model.rules), "cost": cost_order(costs)}
    orders.update({f"cost_prior{m:g}": cost_order(costs, prior=m) for m in a.priors})
    for tr in a.trs:
        for kind, order in orders.items():
            keep, got = select_by_order(model.rules, order, select_on, tr)
            subsets[(kind, tr)] = subset_rules(model.rules, keep)
            chosen[(kind, tr)] = {"rules": len(keep), "tr_scoring_text": got}
    subsets[("all", None)] = model.rules
    t1 = time.perf_counter()
    res = evaluate(model.lm, model.merger, subsets, test)
    t2 = time.perf_counter()

    print(f"run {a.run_dir}: {len(model.rules)} rules; costs from {a.costs or 'this run'} "
          f"({costs.meta['text']['blocks']} {costs.meta['text']['split']} blocks scored, "
          f"{int((costs.fires > 0).sum())} rules fired); subsets reach each target on all {len(select_on)} "
          f"{t['split']} blocks; test: {len(test)} x {a.block_size} tokens of {corpus}:test")
    f = res[("all", None)]

    def frontier(kind: str, metric: str, x: float) -> float:
        """``metric`` of method ``kind`` at test TR ``x``, linear between its points, TR 0 (the teacher:
        top-1 1, else 0) and all rules."""
        pts = sorted([(0.0, float(metric == "top1")), (f["tr"], f[metric])]
                     + [(res[(kind, t)]["tr"], res[(kind, t)][metric]) for t in a.trs])
        return float(np.interp(x, *zip(*pts)))

    head = (f"{'method':>14} {'target':>6} {'rules':>6} {'TR sel':>6} {'TR test':>7} {'KL':>7} {'dNLL':>7} "
            f"{'ppl+':>6} {'top1':>6} | "
            f"{'vs count at same test TR: KL':>28} {'dNLL':>6}")
    print(head)
    print("-" * len(head))
    rows = []
    for kind in orders:
        for tr in a.trs:
            r = res[(kind, tr)]
            ck, cn = frontier("count", "kl", r["tr"]), frontier("count", "dnll", r["tr"])
            print(f"{kind:>14} {tr:6.0%} {chosen[(kind, tr)]['rules']:6d} {chosen[(kind, tr)]['tr_scoring_text']:6.1%} "
                  f"{r['tr']:7.1%} {r['kl']:7.4f} {r['dnll']:7.4f} {r['ppl_rise']:6.1%} {r['top1']:6.1%} | "
                  f"{_ratio(r['kl'], ck):28.2f} "
                  f"{_ratio(r['dnll'], cn):6.2f}")
            rows.append({"method": kind, "target_tr": tr, **chosen[(kind, tr)],
                         **{f"test_{m}": v for m, v in r.items()},
                         "count_kl_at_same_test_tr": ck, "count_dnll_at_same_test_tr": cn})
    print(f"{'all rules':>14} {'':>6} {len(model.rules):6d} {'':>6} {f['tr']:7.1%} {f['kl']:7.4f} {f['dnll']:7.4f} "
          f"{f['ppl_rise']:6.1%} {f['top1']:6.1%} | "
          f"teacher NLL {f['nll_teacher']:.3f} nats/token")
    rows.append({"method": "all", "target_tr": None, "rules": len(model.rules),
                 **{f"test_{m}": v for m, v in f.items()}})
    # every curve ends at the all-rules point: past its TR there is nothing to interpolate
    at = sorted(x for x in {0.05, 0.10} | set(a.trs) if x <= f["tr"])
    print("\nfrontiers at equal test TR (interpolated; KL / dNLL / top-1):")
    for x in at:
        print(f"  TR {x:4.0%}: " + "; ".join(f"{kind} {frontier(kind, 'kl', x):.4f} / {frontier(kind, 'dnll', x):.4f}"
                                            f" / {frontier(kind, 'top1', x):.1%}" for kind in orders))
    equal = {f"{x:.2f}": {kind: {m: frontier(kind, m, x) for m in ("kl", "dnll", "top1")} for kind in orders}
             for x in at}
    print(f"wall: load, blocks, selection {t1 - t0 - scored_here:.0f} s, "
          f"scoring {scored_here:.0f} s, evaluation {t2 - t1:.0f} s ({a.threads} thread(s))")
    out = {"run_dir": a.run_dir, "costs": a.costs, "costs_text": costs.meta["text"],
           "test": {"data": corpus, "split": "test", "blocks": len(test), "block_size": a.block_size},
           "metric": "mean KL(teacher || student) over all student positions; dNLL = student - teacher next-token "
                     "NLL (nats) at those positions", "rows": rows, "at_equal_test_tr": equal,
           "seconds": {"scoring": scored_here, "evaluation": t2 - t1}}
    from umim.safe_io import write_text_atomic

    write_text_atomic(Path(a.json), json.dumps(out, indent=2))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
