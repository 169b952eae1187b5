"""LoRA adapters for K-Token Merging's own recipe (:class:`umim.ktoken.training.KTokenLoRA`): inject
fresh adapters for training, save them in peft's format beside the encoder (``adapter/``), inject
saved ones into an LM for evaluation. No Lightning here, so evaluating a trained folder does not
load it; ``peft`` is imported only by the functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from umim.errors import UserError

ADAPTER_DIR = "adapter"
"""Folder of the adapter inside a trained K-token folder."""


@dataclass
class LoRASettings:
    """LoRA adapters on the LM (``peft.LoraConfig``)."""

    r: int = 8
    """Rank of each adapter."""
    alpha: int = 16
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input during training."""
    target_modules: list[str] | str | None = None
    """Module names to adapt, or "all-linear"; None: peft's default for the architecture (q_proj,
    v_proj for Llama)."""


def add_lora(lm, settings: LoRASettings) -> None:
    """Inject fresh LoRA adapters into ``lm`` in place; the base weights stay frozen.

    The model stays a plain Hugging Face model (``lm.base_model``, ``lm.generate`` work as before),
    and only the adapter parameters have ``requires_grad``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, bias="none")
    lm.requires_grad_(False)
    inject_adapter_in_model(config, lm)
    for name, p in lm.named_parameters():
        p.requires_grad_("lora_" in name)


def save_adapter(lm, path: str | Path, lm_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``lm``'s LoRA adapter in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``);
    ``lm_state``: the LM's (gathered) state dict to take the adapter weights from, default its own."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not hasattr(lm, "peft_config"):
        raise UserError("the LM carries no LoRA adapter to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lm.peft_config["default"].save_pretrained(str(path))
    if lm_state is None:
        state = get_peft_model_state_dict(lm)
    else:  # peft's get_peft_model_state_dict(lm, state_dict=...) returns {} once the layers are wrapped for
        # activation checkpointing (peft 0.21): name the adapter weights as peft does (no adapter name)
        state = {k.replace(".default.", "."): v for k, v in lm_state.items() if "lora_" in k}
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(path / "adapter_model.safetensors"))
    return path


def load_adapter(lm, path: str | Path) -> None:
    """Inject the saved LoRA adapter at ``path`` into ``lm`` in place (frozen, inference only)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a saved LoRA adapter")
    if hasattr(lm, "peft_config"):
        raise UserError("the LM already carries a LoRA adapter; load the adapter into a fresh LM")
    inject_adapter_in_model(LoraConfig.from_pretrained(str(path)), lm)
    result = set_peft_model_state_dict(lm, load_file(str(path / "adapter_model.safetensors")))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise UserError(f"adapter in {path} does not match the LM: {len(missing)} adapter weights missing, "
                        f"e.g. {missing[0]}")
    lm.requires_grad_(False)
