"""The two interfaces every span-merging method is built from.

* :class:`Segmenter` cuts each row of a batch into segments (the spans to merge and single tokens):
  the merge rules' longest match (:class:`RuleSegmenter`), K-Token Merging's leading K-blocks
  (:class:`umim.ktoken.encoder.KBlockSegmenter`).
* :class:`SpanEncoder` turns the static embeddings of each span into ONE embedding: UMIM's
  :class:`~umim.merging.merger.MergeModule`, the :class:`~umim.ktoken.encoder.KTokenEncoder`.

:func:`umim.merging.batch.build_merged_batch` joins the two. Each reports its largest span
(``max_span``): spans are padded to the segmenter's, so no code assumes a fixed longest n.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from umim.rules.store import MergeRules


class SpanEncoder(nn.Module, ABC):
    """Static embeddings of N right-padded spans ``[N, n_max, d]`` + mask ``[N, n_max]`` -> ``[N, d]``."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Embedding size d of the LM it encodes for."""

    @property
    @abstractmethod
    def max_span(self) -> int:
        """Longest span it merges (its input is padded to at least this many positions by default)."""

    @abstractmethod
    def forward(self, span_embeds: torch.Tensor, span_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Parameters
        ----------
        span_embeds : [N, n_max, d] static token embeddings of N spans, right-padded.
        span_mask : [N, n_max] bool, True for real tokens (default: all real).

        Returns
        -------
        [N, d] one embedding per span, in the dtype of ``span_embeds``.
        """


class Segmenter(ABC):
    """Token ids of a batch -> per-row segments ``(start, length)`` that tile each row in order."""

    @property
    @abstractmethod
    def max_span(self) -> int:
        """Longest segment it produces (1: it never merges)."""

    @abstractmethod
    def segment_batch(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """
        Parameters
        ----------
        ids : int array [B, L], right-padded token ids.
        lengths : int array [B], valid tokens of each row.

        Returns
        -------
        starts, lens : int64 arrays [B, S]; row b's real segments come first and tile ``[0, lengths_b)``,
        the rest is padding (start 0, length 0), as :func:`umim.merging.batch.check_segments` expects.
        """


class RuleSegmenter(Segmenter):
    """Longest match of the merge rules' n-grams, left to right (the rules' shared matcher).

    Holds only the matcher (numpy arrays), so it pickles cheaply into data-loader workers.
    """

    def __init__(self, rules: MergeRules):
        self.matcher = rules.matcher

    @property
    def max_span(self) -> int:
        return self.matcher.max_n  # the longest n-gram the rules hold

    def segment_batch(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.matcher.segment_batch(ids, lengths)
