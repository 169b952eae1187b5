"""K-Token Merging: every merged block of K contiguous prompt tokens becomes ONE embedding.

Two parts, the two interfaces of :mod:`umim.merging.span_encoder`, both consumed by the shared
merged-batch machinery (:func:`umim.merging.batch.build_merged_batch`):

* :class:`KBlockSegmenter` (a :class:`~umim.merging.span_encoder.Segmenter`, built on
  :func:`kblock_segments`) -- the segmentation. A row of ``n`` valid tokens is cut into ``m`` full
  K-blocks at its START (original positions ``0 .. mK-1``), followed by ``n - mK`` single tokens.
  The earliest tokens are merged and the prompt's recent tail stays token by token, because the
  tokens just before the continuation matter most for the next prediction. Blocks never reach past
  the valid length, so padding is never merged (and never becomes a segment at all).
* :class:`KTokenEncoder` (a :class:`~umim.merging.span_encoder.SpanEncoder`) -- the lightweight
  encoder: block mean + a two-layer MLP correction of the concatenated block (``K d -> d``, ReLU,
  ``d -> d``). The last layer starts at zero, so an untrained encoder returns exactly the block mean.

K is the block size (tokens per merged block) everywhere.

Token reduction: merging ``m`` blocks of ``n`` tokens removes ``m (K - 1)`` positions, so
``TR = m (K - 1) / n`` and at most ``(K - 1) / K`` (every token in a full block).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from umim.errors import UserError
from umim.merging.span_encoder import Segmenter, SpanEncoder
from umim.module_io import config_with_digest
from umim.rules.store import MAX_N
from umim.safe_io import check_replaceable

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "encoder.safetensors"
FORMAT = "umim-ktoken"
K_CHOICES = tuple(range(2, MAX_N + 1))  # the span lengths rules may hold: both methods merge spans alike


def check_k(k: int) -> int:
    if k not in K_CHOICES:
        raise UserError(f"K (tokens per merged block) must be one of {K_CHOICES}, got {k}")
    return int(k)


def max_tr(k: int, n: int) -> float:
    """Highest TR reachable on ``n`` tokens: all ``n // k`` full blocks merged."""
    return (n // k) * (k - 1) / n if n else 0.0


def blocks_for_ratio(ratio: float, n: int, k: int) -> int:
    """Number of leading K-blocks to merge in ``n`` tokens for a target TR ``ratio``.

    ``m = round(ratio * n / (k - 1))``, capped at the ``n // k`` full blocks. The achieved
    ``m (k - 1) / n`` misses the target by at most ``(k - 1) / (2 n)`` below the cap (TR moves in
    steps of ``(k - 1) / n``), e.g. 1.5 points for K = 4 and n >= 100.
    """
    check_k(k)
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"ratio (target token reduction) must be in [0, 1), got {ratio}")
    return min(math.floor(ratio * n / (k - 1) + 0.5), n // k)


def kblock_segments(
    lengths: torch.Tensor, k: int, n_blocks: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments of a right-padded batch: ``n_blocks`` leading K-blocks, then single tokens.

    Parameters
    ----------
    lengths : [B] long, valid tokens of each row.
    k : tokens per merged block (one of ``K_CHOICES``).
    n_blocks : [B] long (or one int for every row), K-blocks to merge per row; must satisfy
        ``n_blocks * k <= lengths`` so no block reaches into padding.

    Returns
    -------
    seg_start, seg_len : [B, S] long, ``S = max_b(lengths_b - n_blocks_b (k - 1))``. Row ``b``'s
    first ``lengths_b - n_blocks_b (k - 1)`` segments tile ``[0, lengths_b)`` in order; the rest
    are padding (``seg_len = 0``, ``seg_start = 0``), the format of
    :func:`umim.merging.batch.check_segments`.
    """
    check_k(k)
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    m = torch.as_tensor(n_blocks, dtype=torch.long, device=lengths.device).expand_as(lengths)
    if (m < 0).any() or (m * k > lengths).any():
        bad = ((m < 0) | (m * k > lengths)).nonzero()[0, 0].item()
        raise UserError(
            f"row {bad}: {int(m[bad])} blocks of {k} do not fit in its {int(lengths[bad])} valid tokens "
            "(a block would merge padding)"
        )
    n_seg = lengths - m * (k - 1)  # [B]
    S = int(n_seg.max()) if len(lengths) else 0
    j = torch.arange(S, device=lengths.device)[None]  # [1, S]
    in_block = j < m[:, None]
    start = torch.where(in_block, j * k, m[:, None] * k + (j - m[:, None]))
    length = torch.where(in_block, k, 1)
    valid = j < n_seg[:, None]
    return start.masked_fill(~valid, 0), length.masked_fill(~valid, 0)


def prefix_blocks(lengths: torch.Tensor, k: int, fraction: torch.Tensor | float) -> torch.Tensor:
    """[B] long, full K-blocks in the leading ``fraction`` ([B] or scalar) of each row's ``lengths`` [B]."""
    frac = torch.as_tensor(fraction, dtype=torch.float64, device=lengths.device)
    return torch.floor(frac * lengths.double() / k).long().clamp(min=0).minimum(lengths // k)


@dataclass
class KBlockSegmenter(Segmenter):
    """The full K-blocks in a leading share of each row, then single tokens (:func:`kblock_segments`)."""

    k: int
    """Tokens per merged block K."""
    fraction: float | Sequence[float] = 1.0
    """Leading share of each row's valid tokens that is merged: one value, or ``[lo, hi]`` drawn
    uniformly per row."""
    seed: int = 0
    """Seed of those draws (the same seed draws the same shares, e.g. in a resumed run)."""

    def __post_init__(self):
        check_k(self.k)

    @property
    def max_span(self) -> int:
        return self.k

    def n_blocks(self, lengths: torch.Tensor) -> torch.Tensor:
        """[B] long, K-blocks merged in each row of ``lengths`` [B]."""
        if isinstance(self.fraction, (int, float)):
            return prefix_blocks(lengths, self.k, float(self.fraction))
        lo, hi = self.fraction
        g = torch.Generator().manual_seed(self.seed)
        shares = lo + (hi - lo) * torch.rand(len(lengths), generator=g, dtype=torch.float64)
        return prefix_blocks(lengths, self.k, shares)

    def segment_batch(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.long)
        starts, lens = kblock_segments(lengths, self.k, self.n_blocks(lengths))
        return starts.numpy(), lens.numpy()


@dataclass
class KTokenConfig:
    """Settings of a :class:`KTokenEncoder`."""

    hidden_size: int
    """Embedding size d of the target LM."""
    k: int = 4
    """Tokens per merged block K (one of ``K_CHOICES``)."""
    lm_name: str = ""
    """Name of the LM the encoder is trained for (informational)."""
    tokenizer: dict | None = None
    """Tokenizer fingerprint of that LM; the encoder refuses to load for another vocabulary."""



def is_ktoken_dir(path: Path) -> bool:
    """Whether ``path`` is a K-token folder written by :meth:`KTokenEncoder.save_pretrained`."""
    import json

    try:
        return json.loads((Path(path) / CONFIG_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class KTokenEncoder(SpanEncoder):
    """Merge K token embeddings into one: ``mean(x) + W2 relu(W1 [x_1; ...; x_K] + b1) + b2``.

    The MLP sees the blocks' tokens concatenated, in order, because the mean alone cannot tell
    "a b" from "b a". ``W2``/``b2`` start at zero (output = mean) and ``W1`` at a small random
    init, so the first gradient step already moves ``W2``.
    """

    def __init__(self, config: KTokenConfig):
        super().__init__()
        check_k(config.k)
        d, k = config.hidden_size, config.k
        self.config = config
        self.up = nn.Linear(k * d, d)
        self.down = nn.Linear(d, d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.up.weight, std=1.0 / math.sqrt(self.up.in_features))
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_span(self) -> int:
        return self.config.k  # it merges blocks of exactly K tokens

    def forward(self, span_embeds: torch.Tensor, span_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Parameters
        ----------
        span_embeds : [N, n_max, d] static token embeddings of N blocks, right-padded to ``n_max >= K``
            (``build_merged_batch`` pads every span to the segmenter's largest span).
        span_mask : [N, n_max] bool, True for real tokens; every row must hold exactly K of them, first
            (default: the first K columns).

        Returns
        -------
        [N, d] merged embeddings, in the dtype of ``span_embeds``.
        """
        N, n_max, d = span_embeds.shape
        k = self.config.k
        if n_max < k or d != self.config.hidden_size:
            raise UserError(f"expected blocks [N, >={k}, {self.config.hidden_size}], got {tuple(span_embeds.shape)}")
        if span_mask is not None:
            expected = torch.arange(n_max, device=span_mask.device)[None] < k
            if not torch.equal(span_mask.bool(), expected.expand_as(span_mask)):
                raise UserError(f"the K-token encoder merges full blocks of exactly {k} tokens")
        x = span_embeds[:, :k].to(self.up.weight.dtype)  # [N, K, d]
        correction = self.down(torch.relu(self.up(x.reshape(N, k * d))))
        return (x.mean(dim=1) + correction).to(span_embeds.dtype)

    # -- persistence -------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``encoder.safetensors`` into ``path`` (atomically); other files
        already in a K-token folder (e.g. a LoRA ``adapter/``) are kept, any other non-empty folder is
        refused (:class:`~umim.safe_io.OutputError`)."""
        from safetensors.torch import save_file

        path = Path(path)
        check_replaceable(path, is_ktoken_dir, "K-token encoder")
        path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".encoder.", dir=path))
        try:
            state = {n: v.detach().float().cpu().contiguous() for n, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(config_with_digest(asdict(self.config), FORMAT, tmp / WEIGHTS_NAME))
            # weights first: a config never points at weights from an older save
            os.replace(tmp / WEIGHTS_NAME, path / WEIGHTS_NAME)
            os.replace(tmp / CONFIG_NAME, path / CONFIG_NAME)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, hidden_size: int | None = None, tokenizer_fp: dict | None = None
    ) -> KTokenEncoder:
        """Load a saved encoder; refuse it if it was trained for another hidden size or tokenizer."""
        from umim.module_io import load_module_folder

        return load_module_folder(cls, KTokenConfig, path, FORMAT, "K-token encoder", WEIGHTS_NAME, hidden_size,
                                  tokenizer_fp, CONFIG_NAME)
