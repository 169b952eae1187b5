"""Training-step profile: share of step time spent on merging vs the LM passes.

Runs real distillation steps of the embedded SmolLM2-135M on Python-docs blocks with rules mined
from the same corpus (the embedded default's setup) and times, per step:

* segmentation: the span matcher on the batch (the collate step),
* assembly: ``build_merged_batch`` (embedding lookups, ONE merger call on all spans, scatter),
* teacher: the frozen LM forward on the original ids (no grad),
* student: the LM forward on merged embeddings, chunked KL loss and backward into the merger.

Merging = segmentation + assembly. Usage::

    python benchmarks/bench_train_step.py [--block-size 256] [--batch-size 2] [--steps 6] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from umim.fingerprint import tokenizer_fingerprint
from umim.lm import LMSpec, load_lm, load_tokenizer
from umim.merging.batch import aligned_hidden, build_merged_batch
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.corpus import load_documents, tokenize_documents
from umim.rules.mining import mine_rules
from umim.training.datamodule import SegmentCollator, pack_blocks
from umim.training.distill_loss import distillation_loss
from umim.training.distillation import teacher_hidden


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    spec = LMSpec("embedded")
    lm, tok = load_lm(spec), load_tokenizer(spec)
    ids, offsets = tokenize_documents(load_documents("pydoc", "train"), tok, progress=False)
    rules = mine_rules(ids, offsets, tokenizer_fingerprint(tok), 5, progress=False)
    blocks = pack_blocks(ids, offsets, a.block_size, tok.eos_token_id)
    collate = SegmentCollator(rules)
    merger = MergeModule(MergerConfig(hidden_size=lm.config.hidden_size))
    opt = torch.optim.AdamW(merger.parameters(), lr=8e-4)

    times = {"segmentation": 0.0, "assembly": 0.0, "teacher": 0.0, "student": 0.0}
    tr = []
    for step in range(a.steps + 1):  # step 0 warms up and is not counted
        chunk = list(blocks[step * a.batch_size : (step + 1) * a.batch_size])
        t0 = time.perf_counter()
        batch = collate(chunk)
        t1 = time.perf_counter()
        merged = build_merged_batch(batch["input_ids"], batch["seg_start"], batch["seg_len"],
                                    lm.get_input_embeddings(), merger, batch["lengths"])
        t2 = time.perf_counter()
        th = teacher_hidden(lm, batch)
        t3 = time.perf_counter()
        sh = lm.base_model(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask).last_hidden_state
        loss = distillation_loss(*aligned_hidden(th, sh, merged), lm.get_output_embeddings())
        opt.zero_grad()
        loss.backward()
        opt.step()
        t4 = time.perf_counter()
        if step:
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[k] += dt
            tr.append(1 - merged.num_compressed / merged.num_original)
    total = sum(times.values())
    print(f"embedded SmolLM2-135M, batch {a.batch_size} x {a.block_size} tokens, {a.steps} steps, "
          f"{torch.get_num_threads()} threads, TR {100 * sum(tr) / len(tr):.1f}%")
    print(f"{'part':<14}{'s/step':>10}{'share':>9}")
    for k, v in times.items():
        print(f"{k:<14}{v / a.steps:>10.4f}{100 * v / total:>8.2f}%")
    merging = times["segmentation"] + times["assembly"]
    print(f"{'merging':<14}{merging / a.steps:>10.4f}{100 * merging / total:>8.2f}%   (goal <= 10%)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"seconds_per_step": {k: v / a.steps for k, v in times.items()},
                       "merging_share": merging / total, "tr": sum(tr) / len(tr), **vars(a)}, f, indent=2)


if __name__ == "__main__":
    main()
