"""GPU check of paper-scale training (one GPU, no downloads, at most ~8 minutes).

Builds a random-weight model with Llama-3.2-1B's configuration (d 2048, 16 layers, GQA 32/8 heads,
vocab 128,256, tied embeddings, RoPE llama3 scaling) and a tokenizer trained in-process on Python's
documentation, then runs `umim fit --config conf/llama3.2-1b.yaml` for a few bf16-mixed steps,
once with DDP on 1 device and once with the sharded strategy (`umim.training.strategy.DecoderLayerFSDP`,
FSDP2 with layer checkpointing) on 1 device, and prints tokens/s (teacher + student forwards and
the student backward, after warm-up) and peak GPU memory for each, plus the checkpoint size.

    python benchmarks/gpu_check.py [--steps 30] [--block-size 512] [--batch-size 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Throughput(L.Callback):
    """Tokens/s of the training steps after ``warmup`` steps, and their peak GPU memory; printed as JSON
    when training ends (measured up to the last batch: the end-of-fit export is not counted)."""

    def __init__(self, warmup: int = 5):
        self.warmup, self.tokens, self.t0, self.t_end, self.peak = warmup, 0, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.t0 is None:
            _sync()
            self.t0, self.tokens = time.perf_counter(), 0
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.t0 is not None:
            _sync()  # one sync per step: the loss logging syncs anyway
            self.tokens += int(batch["lengths"].sum())
            self.t_end = time.perf_counter()
            self.peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0

    def on_train_end(self, trainer, pl_module) -> None:
        print("GPUCHECK " + json.dumps({
            "strategy": type(trainer.strategy).__name__, "steps_timed": trainer.global_step - self.warmup,
            "tokens_per_s": round(self.tokens / (self.t_end - self.t0), 1),
            "peak_memory_gib": round(self.peak / 2**30, 2),
        }), flush=True)


def llama32_1b_config():
    """Llama-3.2-1B's configuration (random weights are built from it: nothing is downloaded)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
    )


def build_model(folder: Path) -> None:
    from tiny_families import build_tokenizer, corpus_texts
    from transformers import LlamaForCausalLM

    config = llama32_1b_config()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    build_tokenizer(corpus_texts(2000), vocab_size=4000).save_pretrained(folder)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 2
    work = Path(a.out or tempfile.mkdtemp(prefix="umim-gpu-check-"))
    t0 = time.perf_counter()
    build_model(work / "lm")
    corpus = work / "corpus"
    corpus.mkdir(exist_ok=True)
    from tiny_families import corpus_texts

    for i, t in enumerate(corpus_texts(2000)):
        (corpus / f"{i:04d}.txt").write_text(t + "\n")
    print(f"model and corpus built in {time.perf_counter() - t0:.0f} s", flush=True)
    figures = []
    strategies = {"ddp": ["--trainer.strategy", "ddp"],
                  "sharded": ["--trainer.strategy.class_path", "umim.training.strategy.DecoderLayerFSDP"]}
    for name, strategy in strategies.items():
        run = work / name
        cmd = [sys.executable, "-m", "umim.cli", "fit", "--config", str(ROOT / "conf" / "llama3.2-1b.yaml"),
               *strategy, "--trainer.devices", "1", "--trainer.default_root_dir", str(run),
               "--model.lm.name_or_path", str(work / "lm"), "--data.corpus", str(corpus),
               "--data.block_size", str(a.block_size), "--data.batch_size", str(a.batch_size),
               "--data.max_eval_blocks", "8", "--trainer.max_steps", str(a.steps), "--trainer.val_check_interval",
               str(a.steps), "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=gpu_check.Throughput"]
        path = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), str(ROOT / "tests"),
                                             os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "UMIM_CACHE": str(work / "cache")}
        t1 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GPUCHECK ")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", file=sys.stderr)
            return 1
        fig = json.loads(lines[-1][len("GPUCHECK "):])
        fig["wall_s"] = round(time.perf_counter() - t1, 1)
        fig["checkpoint_mib"] = round((run / "checkpoints" / "last.ckpt").stat().st_size / 2**20, 1)
        figures.append(fig)
        print(json.dumps(fig), flush=True)
    print("\n| strategy | tokens/s | peak GPU memory (GiB) | last.ckpt (MiB) | wall (s) |\n|---|---|---|---|---|")
    for f in figures:
        print(f"| {f['strategy']} | {f['tokens_per_s']:,.0f} | {f['peak_memory_gib']} | "
              f"{f['checkpoint_mib']} | {f['wall_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
