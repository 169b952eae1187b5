"""lm-evaluation-harness model ``umim`` (umim_eval.harness.lm_eval_model) on a real tiny Llama saved to disk
with its tokenizer, a saved merger and saved rules: merge=none equals lm-eval's ``hf`` model, the
merged paths are exact where nothing merges and report TR > 0 where spans merge, local tasks run
end to end through the lm-eval CLI with ``--model umim`` (offline), generate_until returns only the
new text, and the registration hook makes ``umim`` known without importing the model code."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from umim.fingerprint import tokenizer_fingerprint  # noqa: E402
from umim.merging.merger import MergeModule, MergerConfig  # noqa: E402
from umim.rules.store import MergeRules  # noqa: E402

DOCS = [
    "the quick brown fox jumps over the lazy dog",
    "the lazy dog sleeps while the quick brown fox runs",
    "a fox and a dog are friends in the story of the forest",
    "once upon a time in the forest there was a quick fox",
    "the story of the forest is a story of a fox and a dog",
]

MC = [
    {"question": "the quick brown fox jumps over the", "choices": ["lazy dog", "forest", "story"], "label": 0},
    {"question": "once upon a time in the", "choices": ["dog", "forest there was", "quick"], "label": 1},
    {"question": "a fox and a dog are friends in the", "choices": ["story of the forest", "fox", "lazy"], "label": 0},
    {"question": "the lazy dog sleeps while the", "choices": ["quick brown fox runs", "time", "a"], "label": 0},
]

REQS = [  # (context, continuation): contexts that contain rule n-grams, continuations of 1-4 tokens
    ("the quick brown fox jumps over the", " lazy dog"),
    ("once upon a time in the", " forest"),
    ("a fox and a dog are friends in the story of the", " forest"),
    ("the lazy dog sleeps while", " the quick brown fox runs"),
    ("fox", " dog"),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_tokenizer_factory):
    """Saved folders: ``lm`` (tiny Llama + tokenizer), ``run`` (merger/ + rules/ mined from DOCS),
    ``nomatch`` (merger/ + rules/ that never match)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lmeval")
    tok = tiny_tokenizer_factory(DOCS * 3, vocab_size=120, name="tiny-lmeval")
    tok.add_special_tokens({"eos_token": "[PAD]"})
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, initializer_range=0.2, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    lm = LlamaForCausalLM(cfg).eval()
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "lm")  # what HFLM will load
    fp = tokenizer_fingerprint(tok)
    torch.manual_seed(1)
    merger = MergeModule(MergerConfig(hidden_size=32, tokenizer=fp))
    torch.nn.init.normal_(merger.v_proj.weight, std=0.3)  # surrogates differ from every token
    grams: dict[int, set] = {2: set(), 3: set(), 4: set()}
    for d in DOCS:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        for n in grams:
            grams[n].update(tuple(ids[i : i + n]) for i in range(0, len(ids) - n + 1, n))
    rules = MergeRules(ngrams={n: np.array(sorted(g)) for n, g in grams.items()},
                       counts={n: np.ones(len(g), dtype=np.int64) for n, g in grams.items()}, tokenizer=fp)
    pad = tok.pad_token_id
    nomatch = MergeRules(ngrams={2: np.array([[pad, pad]])}, counts={2: np.ones(1, dtype=np.int64)}, tokenizer=fp)
    for name, r in (("run", rules), ("nomatch", nomatch)):
        merger.save_pretrained(root / name / "merger")
        r.save(root / name / "rules")
    return {"root": root, "lm": str(root / "lm"), "run": str(root / "run"), "nomatch": str(root / "nomatch"),
            "tok": tok, "rules": rules, "merger": merger}


def _umim(assets, **kw):
    from umim_eval.harness.lm_eval_model import UMIMLM

    return UMIMLM(pretrained=assets["lm"], device="cpu", batch_size=2, **kw)


def _ll_instances(reqs):
    return [Instance(request_type="loglikelihood", doc={}, arguments=(c, x), idx=i) for i, (c, x) in enumerate(reqs)]


@pytest.fixture(scope="module")
def hf_lm(assets):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=assets["lm"], device="cpu", batch_size=2)


def test_merge_none_equals_hf(assets, hf_lm):
    ref = hf_lm.loglikelihood(_ll_instances(REQS), disable_tqdm=True)
    m = _umim(assets, merge="none")
    got = m.loglikelihood(_ll_instances(REQS), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ref, got):
        assert abs(a - b) < 1e-5 and ga == gb
    assert m.token_reduction == 0.0
    # the merged code path with rules that never match is the plain LM too
    nm = _umim(assets, run_dir=assets["nomatch"], merge="prompt")
    got = nm.loglikelihood(_ll_instances(REQS), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ref, got):
        assert abs(a - b) < 1e-5 and ga == gb
    docs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i) for i, d in enumerate(DOCS)]
    ref_r = hf_lm.loglikelihood_rolling(docs, disable_tqdm=True)
    for got_r in (m.loglikelihood_rolling(docs, disable_tqdm=True), nm.loglikelihood_rolling(docs, disable_tqdm=True)):
        assert np.allclose(ref_r, got_r, atol=1e-5, rtol=0)
    assert nm.token_reduction == 0.0


def test_merged_loglikelihood_reports_tr_and_matches_definition(assets):
    m = _umim(assets, run_dir=assets["run"])  # merge defaults to prompt with a run_dir
    assert m.merge == "prompt"
    got = m.loglikelihood(_ll_instances(REQS), disable_tqdm=True)
    assert all(math.isfinite(x) for x, _ in got)
    assert 0.0 < m.token_reduction < 1.0 and m.token_reduction_by_type["loglikelihood"] > 0
    # definition, one request at a time: merged context, unmerged continuation, the loss of the option
    rules, lm = assets["rules"], m.model
    emb = lm.get_input_embeddings()
    merger = m.umim.merger
    for (ctx_s, cont_s), (ll, _) in zip(REQS, got):
        ctx, cont = m._encode_pair(ctx_s, cont_s)
        elems = []
        for s, n in rules.segment(np.array(ctx)):
            e = emb(torch.tensor(ctx[s : s + n]))
            elems.append(e[0] if n == 1 else merger(e[None])[0])
        elems += list(emb(torch.tensor(cont[:-1], dtype=torch.long)))
        with torch.no_grad():
            logp = torch.log_softmax(lm(inputs_embeds=torch.stack(elems)[None]).logits[0].float(), -1)
        k = len(elems) - len(cont)
        ref = float(logp[k : k + len(cont)].gather(1, torch.tensor(cont)[:, None]).sum())
        assert abs(ref - ll) < 1e-4
    # rolling: two-stage perplexity, with TR
    docs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i) for i, d in enumerate(DOCS)]
    rolled = m.loglikelihood_rolling(docs, disable_tqdm=True)
    assert all(math.isfinite(x) and x < 0 for x in rolled)
    assert m.token_reduction_by_type["loglikelihood_rolling"] > 0
    info = m.get_model_info()
    assert info["umim_token_reduction"] == m.token_reduction and info["umim_merge"] == "prompt"


def _write_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    mc_data, ppl_data = root / "mc.jsonl", root / "ppl.jsonl"
    mc_data.write_text("".join(json.dumps(r) + "\n" for r in MC))
    ppl_data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tasks / "umim_tiny_mc.yaml").write_text(f"""task: umim_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc_data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
""")
    (tasks / "umim_tiny_ppl.yaml").write_text(f"""task: umim_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ppl_data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
""")
    return tasks


def test_cli_end_to_end(assets, monkeypatch):
    from umim_eval.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = assets["root"]
    tasks, out = _write_tasks(root), root / "out"
    rc = main(["lm-eval", "--model", "umim",
               "--model_args", f"pretrained={assets['lm']},run_dir={assets['run']},merge=prompt",
               "--tasks", "umim_tiny_mc,umim_tiny_ppl", "--include_path", str(tasks), "--device", "cpu",
               "--batch_size", "2", "--output_path", str(out)])
    assert rc == 0
    files = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    assert len(files) == 1
    res = json.loads(Path(files[0]).read_text())
    acc = res["results"]["umim_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    wp = res["results"]["umim_tiny_ppl"]["word_perplexity,none"]
    assert math.isfinite(wp) and wp > 1.0
    cfg = res["config"]
    assert cfg["umim_merge"] == "prompt" and cfg["umim_token_reduction"] > 0
    assert set(cfg["umim_token_reduction_by_type"]) == {"loglikelihood", "loglikelihood_rolling"}


def test_generate_until_new_text_and_stops(assets, hf_lm):
    def gen(m, ctx, **kw):
        return m.generate_until([Instance(request_type="generate_until", doc={}, arguments=(ctx, kw), idx=0)],
                                disable_tqdm=True)[0]

    ctx = "the quick brown fox"
    plain = _umim(assets, merge="none")
    full = gen(plain, ctx, until=[], max_gen_toks=12)
    assert full == gen(hf_lm, ctx, until=[], max_gen_toks=12)  # the project's loop = HF greedy
    ids = plain.tok_encode(ctx)
    res = plain.umim.generate(
        [ids], "none", __import__("umim.inference.generation", fromlist=["x"]).SamplingConfig(max_new_tokens=12))[0]
    assert full == res.text.split("[PAD]")[0] and full.strip() and not full.startswith(ctx)
    # a stop string from the middle of the generation: the text ends right before it
    toks = res.generated_ids
    stop = plain.tokenizer.decode(toks[3:5])
    cut = gen(plain, ctx, until=[stop], max_gen_toks=12)
    assert cut == full.split(stop)[0] and stop not in cut and len(cut) < len(full)
    # max_gen_toks bounds the new tokens
    short = gen(plain, ctx, until=[], max_gen_toks=2)
    assert short == plain.tokenizer.decode(toks[:2]).split("[PAD]")[0]
    # merged prompt: same contract, TR counted
    merged = _umim(assets, run_dir=assets["run"], merge="dynamic")
    out = merged.generate_until(
        [Instance(request_type="generate_until", doc={}, arguments=(c, {"until": ["\n"], "max_gen_toks": 6}), idx=i)
         for i, c in enumerate([ctx, DOCS[2], DOCS[3]])], disable_tqdm=True)
    assert len(out) == 3 and all(isinstance(t, str) and "\n" not in t for t in out)
    assert merged.token_reduction_by_type["generate_until"] > 0


def test_registration_hook_is_lazy(tmp_path):
    """The .pth start-up hook: `umim` (and the built-ins) known once lm-eval's registry is imported,
    without importing torch or the model module."""
    import shutil

    from umim_eval.harness.lm_eval_hook import pth_path

    shutil.copy(pth_path(), tmp_path / "umim-lm-eval.pth")
    root = str(Path(__file__).resolve().parents[1])
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]); "
        "assert 'torch' not in sys.modules and 'lm_eval' not in sys.modules; "
        "import lm_eval.api.registry as r; "
        "assert 'umim' in r.model_registry and 'hf' in r.model_registry, list(r.model_registry); "
        "assert r.model_registry.origin('umim') is None or 'umim_eval' in str(r.model_registry.origin('umim')); "
        "assert 'torch' not in sys.modules and 'umim_eval.harness.lm_eval_model' not in sys.modules; print('ok')"
    )
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("UMIM_NO_LM_EVAL_HOOK", None)
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_simple_evaluate_with_instance(assets):
    """The Python route: ``lm_eval.simple_evaluate(model=UMIMLM(...))``."""
    from lm_eval.tasks import TaskManager

    tasks = _write_tasks(assets["root"])
    m = _umim(assets, run_dir=assets["run"])
    res = lm_eval.simple_evaluate(model=m, tasks=["umim_tiny_mc"], task_manager=TaskManager(include_path=str(tasks)),
                                  limit=2)
    assert 0.0 <= res["results"]["umim_tiny_mc"]["acc,none"] <= 1.0
    assert res["config"]["umim_token_reduction"] == m.token_reduction > 0
