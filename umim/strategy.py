"""Multi-GPU FSDP strategy that shards the frozen LM by decoder layer, configurable from YAML.

Lightning's ``FSDPStrategy`` takes its wrapping policy as a set of classes, which a YAML config
cannot name; this subclass takes class *names* instead (e.g. ``LlamaDecoderLayer``). The merge
module gets a unit of its own so the trainable fp32 merger never shares a flat parameter with the
frozen LM, and ``use_orig_params`` is on because a unit may mix frozen and trainable tensors.
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


class _ByClassName:
    """Picklable FSDP ``lambda_fn``: wrap modules whose class name is listed."""

    def __init__(self, names: list[str]):
        self.names = frozenset(names)

    def __call__(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.names


class DecoderLayerFSDP(FSDPStrategy):
    """FSDP with one unit per decoder layer (and one for the merger), optional layer checkpointing."""

    def __init__(
        self,
        wrap_layers: list[str] = ("LlamaDecoderLayer",),
        checkpoint_layers: bool = True,
        sharding_strategy: str = "FULL_SHARD",
        **kwargs,
    ):
        """
        Parameters
        ----------
        wrap_layers : class names of the LM's decoder layers (LlamaDecoderLayer, Qwen2DecoderLayer, GPT2Block, ...).
        checkpoint_layers : recompute decoder-layer activations in the student's backward pass.
        sharding_strategy : FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD or NO_SHARD.
        """
        from functools import partial

        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        names = list(wrap_layers)
        policy = partial(lambda_auto_wrap_policy, lambda_fn=_ByClassName(names + ["MergeModule"]))
        if checkpoint_layers:
            kwargs.setdefault("activation_checkpointing_policy", partial(lambda_auto_wrap_policy, lambda_fn=_ByClassName(names)))
        kwargs.setdefault("use_orig_params", True)
        super().__init__(auto_wrap_policy=policy, sharding_strategy=sharding_strategy, **kwargs)
