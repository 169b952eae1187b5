"""Merge module: attention pooling with a learnable query (paper Sec. 3.2, App. B, Pseudocode 2).

Turns the static input embeddings of a span of 2..4 tokens into ONE surrogate embedding. Without
the optional token processor it has exactly ``d + 3 d^2`` parameters: the query (``h`` heads of
``d/h``), ``W_k``, ``W_v`` (all heads stacked, ``d x d`` each) and ``W_o``.

Initialisation: ``W_v = W_o = I`` and a zero query, so an untrained merger returns the mean of
the span embeddings (a sensible baseline to measure training against); ``W_k`` is random so the
query gradient is not zero.

The paper's pooling is permutation-invariant: "a b" and "b a" get one surrogate, and it cannot tell
the span's last token (the one the LM predicts from) from the others. ``span_positions`` (our
extension, off by default) adds a learned vector per distance from the span's end to each token
before pooling: ``MAX_N * d`` parameters, zero at initialisation, so it starts as the paper's module.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from umim.errors import UserError
from umim.merging.span_encoder import SpanEncoder
from umim.module_io import config_with_digest
from umim.safe_io import check_replaceable, replace_dir, staging_dir

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "merger.safetensors"



def is_merger_dir(path: Path) -> bool:
    """Whether ``path`` is a merger folder written by :meth:`MergeModule.save_pretrained`."""
    try:
        return json.loads((Path(path) / CONFIG_NAME).read_text()).get("format") == "umim-merger"
    except (OSError, ValueError, AttributeError):
        return False

@dataclass
class MergerConfig:
    """Settings of a :class:`MergeModule`."""

    hidden_size: int
    """Embedding size d of the target LM."""
    num_heads: int = 4
    """Attention heads h (paper: 4); must divide hidden_size."""
    token_processor: bool = False
    """Apply Pseudocode 2's per-token MLP + GELU + LayerNorm before pooling."""
    span_positions: bool = False
    """Add a learned embedding of each token's distance from the span's end before pooling."""
    lm_name: str = ""
    """Name of the LM the merger is trained for (informational)."""
    tokenizer: dict | None = None
    """Tokenizer fingerprint of that LM; a merger refuses to load for another vocabulary."""


class MergeModule(SpanEncoder):
    """Pool span embeddings ``[N, n, d]`` (with padding mask) into surrogates ``[N, d]``."""

    def __init__(self, config: MergerConfig):
        super().__init__()
        d, h = config.hidden_size, config.num_heads
        if type(d) is not int or type(h) is not int or d < 1 or h < 1 or d % h:
            raise UserError(f"hidden_size {d!r} must be a positive integer divisible by num_heads {h!r}")
        self.config = config
        self.num_heads, self.head_dim = h, d // h
        self.query = nn.Parameter(torch.zeros(h, d // h))
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.token_processor = (
            nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d)) if config.token_processor else None
        )
        self.span_position = nn.Parameter(torch.zeros(self.max_span, d)) if config.span_positions else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.query)
        if self.span_position is not None:
            nn.init.zeros_(self.span_position)
        nn.init.normal_(self.k_proj.weight, std=1.0 / math.sqrt(self.config.hidden_size))
        with torch.no_grad():
            self.v_proj.weight.copy_(torch.eye(self.config.hidden_size))
            self.o_proj.weight.copy_(torch.eye(self.config.hidden_size))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_span(self) -> int:
        """Attention pooling takes spans of any length; rules hold at most the format's ``MAX_N``."""
        # imported here: the rules store may import this module
        from umim.rules.store import MAX_N

        return MAX_N

    def forward(self, span_embeds: torch.Tensor, span_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, d] surrogates of N right-padded spans ``span_embeds`` [N, n_max, d] whose real tokens
        ``span_mask`` [N, n_max] marks (default: all), in their dtype (:meth:`SpanEncoder.forward`)."""
        N, n, d = span_embeds.shape
        x = span_embeds.to(self.k_proj.weight.dtype)
        if self.span_position is not None:  # row j of the table: j tokens before the span's last one
            real = torch.full((N,), n, device=x.device) if span_mask is None else span_mask.sum(-1)
            from_end = (real[:, None] - 1 - torch.arange(n, device=x.device)[None]).clamp(0, self.max_span - 1)
            x = x + self.span_position[from_end]
        if self.token_processor is not None:
            x = self.token_processor(x)
        k = self.k_proj(x).view(N, n, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(N, n, self.num_heads, self.head_dim)
        scores = torch.einsum("knhd,hd->khn", k, self.query) / math.sqrt(self.head_dim)  # [N, h, n]
        if span_mask is not None:
            scores = scores.masked_fill(~span_mask[:, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)
        pooled = torch.einsum("khn,knhd->khd", weights, v).reshape(N, d)
        return self.o_proj(pooled).to(span_embeds.dtype)

    # -- persistence -------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``merger.safetensors`` into ``path`` (atomically); an earlier merger
        folder there is replaced, any other non-empty folder is refused (:class:`OutputError`)."""
        from safetensors.torch import save_file

        check_replaceable(path, is_merger_dir, "merger")
        tmp = staging_dir(path)
        try:
            state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(config_with_digest(asdict(self.config), "umim-merger", tmp / WEIGHTS_NAME))
            return replace_dir(tmp, path, is_merger_dir, "merger")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, token: str | None = None):
        """Save this merger as :meth:`save_pretrained` does and upload it to hub repo ``repo_id``
        (created when missing) on branch ``revision``; returns the commit's ``CommitInfo``."""
        from umim.hub import push_saved

        return push_saved(self.save_pretrained, repo_id, what="merger", private=private, revision=revision,
                          commit_message=commit_message, token=token)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, hidden_size: int | None = None, tokenizer_fp: dict | None = None, *,
        revision: str | None = None, subfolder: str | None = None,
    ) -> "MergeModule":
        """Load a saved merger from a folder or a hub repo id "org/name" (fetched into the hub cache;
        ``revision`` and ``subfolder`` pick the branch/tag/commit and the folder in it); refuse it if
        it was trained for another hidden size or tokenizer."""
        from umim.hub import resolve
        from umim.module_io import load_module_folder

        folder = resolve(path, revision=revision, subfolder=subfolder, files=(CONFIG_NAME, WEIGHTS_NAME), what="merger")
        return load_module_folder(cls, MergerConfig, folder, "umim-merger", "UMIM merger", WEIGHTS_NAME, hidden_size,
                                  tokenizer_fp, CONFIG_NAME)
