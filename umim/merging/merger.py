"""Merge module: attention pooling with a learnable query (paper Sec. 3.2, App. B, Pseudocode 2).

Turns the static input embeddings of a span of 2..4 tokens into ONE surrogate embedding. Without
the optional token processor it has exactly ``d + 3 d^2`` parameters: the query (``h`` heads of
``d/h``), ``W_k``, ``W_v`` (all heads stacked, ``d x d`` each) and ``W_o``.

Initialisation: ``W_v = W_o = I`` and a zero query, so an untrained merger returns the mean of
the span embeddings (a sensible baseline to measure training against); ``W_k`` is random so the
query gradient is not zero.
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
    lm_name: str = ""
    """Name of the LM the merger is trained for (informational)."""
    tokenizer: dict | None = None
    """Tokenizer fingerprint of that LM; a merger refuses to load for another vocabulary."""


class MergeModule(nn.Module):
    """Pool span embeddings ``[K, n, d]`` (with padding mask) into surrogates ``[K, d]``."""

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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.query)
        nn.init.normal_(self.k_proj.weight, std=1.0 / math.sqrt(self.config.hidden_size))
        with torch.no_grad():
            self.v_proj.weight.copy_(torch.eye(self.config.hidden_size))
            self.o_proj.weight.copy_(torch.eye(self.config.hidden_size))

    def forward(self, span_embeds: torch.Tensor, span_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Parameters
        ----------
        span_embeds : [K, n_max, d] static token embeddings of K spans, right-padded.
        span_mask : [K, n_max] bool, True for real tokens (default: all real).

        Returns
        -------
        [K, d] surrogate embeddings, in the dtype of ``span_embeds``.
        """
        K, n, d = span_embeds.shape
        x = span_embeds.to(self.k_proj.weight.dtype)
        if self.token_processor is not None:
            x = self.token_processor(x)
        k = self.k_proj(x).view(K, n, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(K, n, self.num_heads, self.head_dim)
        scores = torch.einsum("knhd,hd->khn", k, self.query) / math.sqrt(self.head_dim)  # [K, h, n]
        if span_mask is not None:
            scores = scores.masked_fill(~span_mask[:, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)
        pooled = torch.einsum("khn,knhd->khd", weights, v).reshape(K, d)
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

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, hidden_size: int | None = None, tokenizer_fp: dict | None = None
    ) -> "MergeModule":
        """Load a saved merger; refuse it if it was trained for another hidden size or tokenizer."""
        from umim.module_io import load_module_folder

        return load_module_folder(cls, MergerConfig, path, "umim-merger", "UMIM merger", WEIGHTS_NAME, hidden_size,
                                  tokenizer_fp, CONFIG_NAME)
