"""LightningDataModule: corpus -> packed token blocks -> segmented batches.

``prepare_data`` tokenizes and caches every split and mines the merge rules from the training
split when no rules file exists yet (then saves them, so later runs and other ranks reuse them).
Each batch is segmented in the collate function with the shared :class:`~umim.matcher.SpanMatcher`,
on CPU worker processes, and the segmentation is checked there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from .batch import check_segments
from .corpus import tokenized_corpus
from .fingerprint import tokenizer_fingerprint
from .lm import LMSpec, cache_dir, load_tokenizer
from .mining import FILTER_STAGES, mine_rules
from .rules import MergeRules


@dataclass
class MiningSettings:
    """How rules are mined when ``rules`` does not exist yet."""

    min_count: int = 5
    """Frequency threshold tau (paper: 5)."""
    min_n: int = 2
    max_n: int = 4
    filters: list[str] = field(default_factory=lambda: list(FILTER_STAGES))
    """Overlap filter stages to apply: intra, inter (paper default both); [] keeps all candidates."""
    corpus: str | None = None
    """Corpus to mine from; default the training corpus's train split."""


def pack_blocks(ids: np.ndarray, offsets: np.ndarray, block_size: int, sep: int | None) -> np.ndarray:
    """Concatenate documents (``sep`` between them) and cut into full blocks ``[n_blocks, block_size]``."""
    if sep is not None and len(offsets) > 2:
        ids = np.insert(ids, offsets[1:-1], sep)
    n = len(ids) // block_size
    return np.asarray(ids[: n * block_size], dtype=np.int64).reshape(n, block_size)


class SegmentCollator:
    """Stack blocks and segment them with the rules (picklable for worker processes)."""

    def __init__(self, rules: MergeRules):
        self.matcher = rules.matcher

    def __call__(self, blocks: list[np.ndarray]) -> dict[str, torch.Tensor]:
        ids = np.stack(blocks)
        lengths = np.full(len(ids), ids.shape[1], dtype=np.int64)
        starts, lens = self.matcher.segment_batch(ids, lengths)
        check_segments(starts, lens, lengths)
        return {
            "input_ids": torch.from_numpy(ids),
            "lengths": torch.from_numpy(lengths),
            "seg_start": torch.from_numpy(starts),
            "seg_len": torch.from_numpy(lens),
        }


class UMIMDataModule(L.LightningDataModule):
    """Packed blocks of a corpus with their segmentation under the merge rules."""

    def __init__(
        self,
        corpus: str = "pydoc",
        lm: LMSpec | None = None,
        rules: str = "runs/default/rules",
        mining: MiningSettings | None = None,
        block_size: int = 512,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_blocks: int | None = None,
        max_eval_blocks: int | None = None,
        seed: int = 0,
    ):
        """
        Parameters
        ----------
        corpus : corpus spec (see ``umim.corpus``), e.g. ``hf:Salesforce/wikitext:wikitext-103-raw-v1``.
        lm : the target LM (its tokenizer is used); linked from ``model.lm`` by the CLI.
        rules : merge-rules directory; mined from the training split and saved there if missing.
        mining : settings for that mining.
        block_size : tokens per training block (paper: 512; 1024 for DeepScaleR).
        max_train_blocks, max_eval_blocks : caps on the number of blocks (random subset, seeded).
        """
        super().__init__()
        self.corpus, self.lm, self.rules_path = corpus, lm or LMSpec(), Path(rules)
        self.mining = mining or MiningSettings()
        self.block_size, self.batch_size = block_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.max_train_blocks, self.max_eval_blocks = max_train_blocks, max_eval_blocks
        self.tokenizer = None
        self.rules: MergeRules | None = None
        self.blocks: dict[str, np.ndarray] = {}

    # -- preparation -------------------------------------------------------------------------------
    def get_tokenizer(self):
        """The target LM's tokenizer (loaded once)."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.lm)
        return self.tokenizer

    def _tokens(self, split: str, corpus: str | None = None):
        tok = self.get_tokenizer()
        return tokenized_corpus(corpus or self.corpus, split, tok, tokenizer_fingerprint(tok), cache_dir() / "tokens")

    def prepare_data(self) -> None:
        for split in ("train", "validation", "test"):
            self._tokens(split)
        if not (self.rules_path / "rules.json").is_file():
            m = self.mining
            ids, offsets = self._tokens("train", m.corpus)
            rules = mine_rules(
                ids, offsets, tokenizer_fingerprint(self.get_tokenizer()), m.min_count, m.min_n, m.max_n, m.filters,
                corpus=f"{m.corpus or self.corpus}:train",
            )
            rules.save(self.rules_path)
            print(f"mined {rules.num_rules()} rules from {rules.tokens_scanned} tokens -> {self.rules_path}")

    def setup(self, stage: str | None = None) -> None:
        tok = self.get_tokenizer()
        self.rules = self.load_rules()
        rng = np.random.default_rng(self.seed)
        for split, cap in (("train", self.max_train_blocks), ("validation", self.max_eval_blocks), ("test", self.max_eval_blocks)):
            blocks = pack_blocks(*self._tokens(split), self.block_size, tok.eos_token_id)
            if len(blocks) == 0:
                raise ValueError(f"{self.corpus} {split}: fewer tokens than one block of {self.block_size}")
            if cap is not None and len(blocks) > cap:
                blocks = blocks[np.sort(rng.choice(len(blocks), cap, replace=False))]
            self.blocks[split] = blocks

    def load_rules(self) -> MergeRules | None:
        """The rules batches are segmented with (a subclass that segments otherwise may return None)."""
        return MergeRules.load(self.rules_path, tokenizer=self.get_tokenizer())

    # -- loaders -----------------------------------------------------------------------------------
    def collator(self):
        """Collate function of every loader: stack the blocks and segment them with the rules."""
        return SegmentCollator(self.rules)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            list(self.blocks[split]),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)
