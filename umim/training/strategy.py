"""Sharded training of a small module around a frozen LM: FSDP2 (``fully_shard``) per decoder layer.

:class:`DecoderLayerFSDP` is Lightning's ``ModelParallelStrategy`` (FSDP2, PyTorch's per-parameter
sharding) with the sharding applied by the strategy itself, so any :class:`~umim.training.frozen_lm_module.
FrozenLMModule` trains sharded without code of its own and one YAML works on 1 and on N devices:

* one FSDP unit per decoder layer (class names from YAML, default the LM's ``_no_split_modules``),
  optionally with non-reentrant activation checkpointing that applies whatever the module's
  train/eval mode (the frozen LM stays in eval mode, where Hugging Face's own checkpointing is off);
* the input embedding and the output head in units of their own, because our code calls them outside
  the LM's root ``forward`` (``embeddings(ids)``, ``lm_head(h)`` per chunk); a tied embedding/head
  (one tensor) is not sharded but replicated on each rank (see ``shard_frozen_lm_module``);
  the base model's remaining parameters (final norm, GPT-2's position table) in the base model's
  unit; the whole LM is the root unit;
* the trainable modules (the merger, the K-token encoder) in units of their own: their parameters,
  gradients and optimizer state stay fp32;
* under ``bf16-mixed``/``16-mixed`` the frozen LM's units all-gather in that dtype; buffers (RoPE
  ``inv_freq``) are never cast, and autocast computes in the low-precision dtype.

Checkpoints hold the trainable state (gathered, a single file that DDP runs write too) and the loop
state, never the frozen LM: its weights are neither gathered nor written.

Lightning's FSDP1 strategy was replaced because it refuses CPU (so CI could not run it), casts
buffers to bf16 under mixed precision, and gathers the whole frozen LM for every checkpoint.
"""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from umim.errors import UserError
from umim.training.frozen_lm_module import FrozenLMModule


def _low_precision(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))


def decoder_layer_names(lm: nn.Module, names: list[str] | None) -> set[str]:
    """Class names of the LM's decoder layers: ``names`` if given, else the model's ``_no_split_modules``."""
    found = set(names or getattr(lm, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in lm.modules()}
    if not found & present:
        raise UserError(f"no decoder layer of classes {sorted(found)} in {type(lm).__name__}; "
                        "name them with wrap_layers (e.g. LlamaDecoderLayer, Qwen2DecoderLayer, GPT2Block)")
    return found


def shard_frozen_lm_module(
    module: FrozenLMModule, mesh, layer_names: list[str] | None = None, checkpoint_layers: bool = True,
    reshard_after_forward: bool = True, compute_dtype: torch.dtype | None = None,
) -> None:
    """Apply activation checkpointing and ``fully_shard`` to ``module.lm`` and the trainable submodules (in place)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        fully_shard = None
    if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise UserError(f"the sharded strategy needs torch >= 2.7 (this is {torch.__version__}): upgrade torch, "
                        "or train with --trainer.strategy ddp")

    lm = module.lm
    names = decoder_layer_names(lm, layer_names)
    if checkpoint_layers:
        apply_activation_checkpointing(
            lm, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: type(m).__name__ in names,
        )
        layers = [m for m in lm.modules() if isinstance(m, CheckpointWrapper)]
    else:
        layers = [m for m in lm.modules() if type(m).__name__ in names]
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    # A tied embedding/head stays replicated (FSDP2 ignores it): one unit over both modules unshards on
    # the first of them to run and reshards after the last, and torch 2.11 leaves it sharded for good
    # once a pass runs only one of them (our report calls the embedding alone): "aten.embedding.default
    # got mixed torch.Tensor and DTensor". Tied LMs are the small ones (1-3B), so the cost is small: the
    # weight in the LM's dtype on every rank (FSDP2's mixed precision skips it; autocast casts per call).
    frozen = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                  mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype),
                  ignored_params={emb.weight} if tied else None)
    for layer in layers:
        fully_shard(layer, **frozen)
    if not tied:
        fully_shard(emb, **frozen)
        if head is not None:
            fully_shard(head, **frozen)
    fully_shard(lm.base_model, **frozen)
    fully_shard(lm, **frozen)
    # FSDP2 takes the first unit that runs forward as the root of all units below it; our code calls
    # the embedding or the base model directly, and an embedding/head group cannot be a root ("FSDP
    # requires a single root module"): make the whole LM the root now
    lm._get_fsdp_state()._lazy_init()
    for name, child in module.named_children():
        if child is not lm and any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh, reshard_after_forward=reshard_after_forward)  # fp32 params and grads


def trainable_state_dict(module: nn.Module, keep) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the entries of ``module.state_dict()`` for which ``keep(name)``; sharded
    tensors are gathered (a collective: every rank calls this), the others are never touched."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in module.state_dict().items():
        if keep(k):
            out[k] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
    return out


def load_trainable_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into ``module``'s (possibly sharded) parameters and buffers; every key must exist."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = module.state_dict(keep_vars=True)
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise UserError(f"the checkpoint holds entries this model does not have (another model?): {unknown[:3]}")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise UserError(f"the checkpoint's {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, this model's "
                        f"{tuple(own[wrong[0]].shape)} (another model?)")
    with torch.no_grad():
        for k, full in state.items():
            target = own[k]
            if isinstance(target, DTensor):
                full = full.to(target.device, target.dtype)
                target.copy_(distribute_tensor(full, target.device_mesh, target.placements))
            else:
                target.copy_(full.to(target.device, target.dtype))


class DecoderLayerFSDP(ModelParallelStrategy):
    """FSDP2 over all devices: one unit per decoder layer, embeddings/head and each trainable module
    in units of their own, optional layer checkpointing (see the module docstring)."""

    def __init__(
        self,
        wrap_layers: list[str] | None = None,
        checkpoint_layers: bool = True,
        reshard_after_forward: bool = True,
        **kwargs,
    ):
        """
        Parameters
        ----------
        wrap_layers : class names of the LM's decoder layers (LlamaDecoderLayer, Qwen2DecoderLayer, GPT2Block, ...);
            default the model's own ``_no_split_modules``.
        checkpoint_layers : recompute decoder-layer activations in the student's backward pass.
        reshard_after_forward : free gathered layer weights after each forward (FULL_SHARD); False keeps
            them until the backward (SHARD_GRAD_OP: more memory, fewer all-gathers).
        kwargs : ``ModelParallelStrategy`` settings (``timeout``, ``process_group_backend``).
        """
        kwargs.pop("save_distributed_checkpoint", None)  # checkpoints are always one small file
        super().__init__(save_distributed_checkpoint=False, **kwargs)
        self.wrap_layers = list(wrap_layers) if wrap_layers else None
        self.checkpoint_layers, self.reshard_after_forward = checkpoint_layers, reshard_after_forward

    def setup_environment(self) -> None:
        # pure data parallelism over every process (no tensor parallelism)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer) -> None:
        module = self.lightning_module
        if not isinstance(module, FrozenLMModule):
            raise TypeError(f"{type(self).__name__} trains FrozenLMModule subclasses, not {type(module).__name__}")
        shard_frozen_lm_module(
            module, self.device_mesh["data_parallel"], self.wrap_layers, self.checkpoint_layers,
            self.reshard_after_forward, _low_precision(trainer.precision),
        )
        super().setup(trainer)

    # -- checkpoints: trainable state only, one file -----------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        module = self.lightning_module
        return trainable_state_dict(module, module.keeps_in_checkpoint)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, optimizer, options=options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        checkpoint = torch.load(path, map_location="cpu", weights_only=bool(weights_only))
        self.lightning_module.check_checkpoint(checkpoint)  # before any tensor is copied
        load_trainable_state_dict(self.lightning_module, checkpoint.pop("state_dict"))
        states = checkpoint.pop("optimizer_states", [])
        if self.lightning_module.trainer.state.fn == "fit":
            for optimizer, state in zip(self.optimizers, states):
                set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return checkpoint
