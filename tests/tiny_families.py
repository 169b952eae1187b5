"""Tiny random-weight models of each paper family (GPT-2; Llama tied and untied; Qwen2), saved as
Hugging Face folders with a real BPE tokenizer trained in-process, and a local English corpus.

Also runnable as a script (``python tests/tiny_families.py OUT``) to build them by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

# paper config -> (family, strategy it names)
PAPER_CONFIGS = {
    "gpt2xl": "gpt2",
    "llama3.2-1b": "llama-tied",
    "llama3.1-8b": "llama-untied",
    "deepscaler-1.5b": "qwen2",
}


def corpus_texts(n: int = 120) -> list[str]:
    """Paragraphs of Python's own documentation (always installed)."""
    import re
    from pydoc_data.topics import topics

    pars = [p.strip() for k in sorted(topics) for p in re.split(r"\n\s*\n", topics[k]) if len(p.strip()) > 80]
    return pars[:n]


def build_tokenizer(texts: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[EOS]"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")


def build_model(family: str, vocab: int, context: int = 256):
    """A seeded tiny causal LM of ``family`` (peaked outputs, so merging visibly changes them)."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=context, initializer_range=0.1)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=context,
                                          initializer_range=0.1, bos_token_id=1, eos_token_id=1))
    if family == "llama-tied":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    if family == "llama-untied":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **common))
    raise ValueError(family)


def build_all(root: Path) -> dict[str, Path]:
    """Write ``root/corpus`` (one .txt per paragraph) and ``root/<family>`` model folders; return their paths."""
    root = Path(root)
    texts = corpus_texts()
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (corpus / f"{i:03d}.txt").write_text(t + "\n")
    tok = build_tokenizer(texts)
    out = {"corpus": corpus}
    for family in sorted(set(PAPER_CONFIGS.values())):
        folder = root / family
        build_model(family, len(tok)).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[family] = folder
    return out


if __name__ == "__main__":
    print(build_all(Path(sys.argv[1])))


def _sigterm_callback():
    import os
    import signal

    import lightning as L

    class SigtermAtStep(L.Callback):
        """Each rank sends itself SIGTERM after optimizer step ``step`` (a deterministic interruption)."""

        def __init__(self, step: int):
            self.step = step

        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGTERM)

    return SigtermAtStep


SigtermAtStep = _sigterm_callback()


def _buffer_check_callback():
    import lightning as L
    import torch

    class CheckPrecision(L.Callback):
        """Fail the run unless, with training running, every LM buffer (RoPE ``inv_freq``) and every
        trainable parameter is fp32 (mixed precision must compute in low precision, not store in it)."""

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            bad = [n for n, b in pl_module.lm.named_buffers() if b.is_floating_point() and b.dtype != torch.float32]
            bad += [n for n, p in pl_module.named_parameters() if p.requires_grad and p.dtype != torch.float32]
            if bad:
                raise RuntimeError(f"not fp32: {bad}")

    return CheckPrecision


CheckPrecision = _buffer_check_callback()
