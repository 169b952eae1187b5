"""LightningDataModule: corpus -> packed token blocks -> segmented batches.

``prepare_data`` tokenizes and caches every split and mines the merge rules from the training
split when no rules file exists yet (then saves them, so later runs and other ranks reuse them).
Each batch is segmented in the collate function by the rules'
:class:`~umim.merging.span_encoder.RuleSegmenter`, on CPU worker processes, and the segmentation is
checked there. A data module whose model cuts its own spans (K-token blocks: K is an encoder
setting) leaves the blocks whole and mines nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from umim.errors import UserError
from umim.fingerprint import tokenizer_fingerprint
from umim.lm import LMSpec, cache_dir, context_length, load_tokenizer
from umim.merging.batch import add_segments
from umim.merging.span_encoder import RuleSegmenter, Segmenter
from umim.rules.corpus import tokenized_corpus
from umim.rules.mining import FILTER_STAGES, mine_rules
from umim.rules.store import MergeRules, is_rules_dir
from umim.safe_io import check_replaceable, check_writable_dir


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
    """Stack blocks and segment them (picklable for worker processes).

    ``segmenter``: a :class:`~umim.merging.span_encoder.Segmenter`, merge rules (their longest-match
    segmenter), or None to leave the blocks whole for the model's own segmenter.
    """

    def __init__(self, segmenter: Segmenter | MergeRules | None):
        self.segmenter = RuleSegmenter(segmenter) if isinstance(segmenter, MergeRules) else segmenter

    def __call__(self, blocks: list[np.ndarray]) -> dict:
        ids = np.stack(blocks)
        batch = {"input_ids": torch.from_numpy(ids), "lengths": torch.full((len(ids),), ids.shape[1], dtype=torch.long)}
        return batch if self.segmenter is None else add_segments(batch, self.segmenter)


class ResumableSampler(DistributedSampler):
    """This rank's share of a seeded per-epoch permutation that can start mid-epoch (``start`` samples in)."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a resumed position belongs to its own epoch only
        super().set_epoch(epoch)

    def __iter__(self):
        indices = list(super().__iter__())
        yield from indices[min(self.start, len(indices)) :]
        self.start = 0  # the next pass over the data is a whole epoch

    # __len__ stays the whole epoch's: Lightning restores its own batch counter to the saved position
    # and counts the epoch's batches from the loader's length


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position is part of Lightning's checkpoints
    (``state_dict``/``load_state_dict``), so a run resumed mid-epoch sees exactly the batches the
    uninterrupted run would have seen next.

    ``progress`` (optional) returns the batches of this epoch that training has completed; it is the
    position saved when given, since a checkpoint taken between fetching a batch and finishing it
    must not count that batch. Without it, the batches yielded so far are saved.
    """

    def __init__(self, *args, progress=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def __iter__(self):
        self.batches_done = self.sampler.start // self.batch_size
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        done = self.progress() if self.progress is not None else getattr(self, "batches_done", 0)
        return {"epoch": int(self.sampler.epoch), "batches_done": int(done), "batch_size": int(self.batch_size),
                "num_replicas": int(self.sampler.num_replicas), "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = {k: state[k] for k in ("batch_size", "num_replicas", "dataset_size") if k in state}
        mine = {"batch_size": self.batch_size, "num_replicas": self.sampler.num_replicas,
                "dataset_size": len(self.dataset)}
        changed = {k: (v, mine[k]) for k, v in saved.items() if v != mine[k]}
        if changed:  # the saved position would point into another permutation or batching
            raise UserError("the checkpoint's data position was saved with another setup (saved, now): "
                            + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in changed.items())
                            + "; resume with the same devices, batch size and data")
        self.sampler.set_epoch(state["epoch"])
        self.sampler.start = state["batches_done"] * self.batch_size


class SpanDataModule(L.LightningDataModule):
    """Packed blocks of a corpus with their segmentation under the merge rules (or, for a model that
    cuts its own spans, without: see ``uses_rules``)."""

    uses_rules: ClassVar[bool] = True
    """Whether blocks are segmented here, by the merge rules (mined when missing); False leaves them
    whole for the model's own segmenter and takes no ``rules``/``mining``."""

    def __init__(
        self,
        corpus: str = "pydoc",
        lm: LMSpec | None = None,
        rules: str | None = None,
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
        corpus : corpus spec (see ``umim.rules.corpus``), e.g. ``hf:Salesforce/wikitext:wikitext-103-raw-v1``.
        lm : the target LM (its tokenizer is used); linked from ``model.lm`` by the CLI.
        rules : merge-rules directory; mined from the training split and saved there if missing
            (default: ``<trainer.default_root_dir>/rules``). The longest span is the rules' longest n-gram.
        mining : settings for that mining.
        block_size : tokens per training block (paper: 512; 1024 for DeepScaleR).
        max_train_blocks, max_eval_blocks : caps on the number of blocks (random subset, seeded).
        """
        super().__init__()
        if not self.uses_rules and (rules is not None or mining is not None):
            raise UserError(f"{type(self).__name__} leaves segmentation to the model (K-token blocks): "
                            "it takes no rules or mining settings")
        self.corpus, self.lm = corpus, lm or LMSpec()
        self.mining = mining or MiningSettings()
        self.block_size, self.batch_size = block_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.max_train_blocks, self.max_eval_blocks = max_train_blocks, max_eval_blocks
        self.tokenizer = None
        self.rules_dir = rules
        self.rules: MergeRules | None = None
        self.blocks: dict[str, np.ndarray] = {}
        self._collators: list[SegmentCollator] = []  # every loader's, so use_rules reaches them

    @property
    def rules_path(self) -> Path:
        """The rules folder: ``rules`` as given, else ``rules/`` in the trainer's ``default_root_dir``."""
        if self.rules_dir is not None:
            return Path(self.rules_dir)
        if self.trainer is None:
            raise UserError(f"{type(self).__name__}: give rules=FOLDER when it is used without a Trainer")
        return Path(self.trainer.default_root_dir) / "rules"

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
        if self.uses_rules and not (self.rules_path / "rules.json").is_file():
            check_writable_dir(self.rules_path)  # before mining, not after it
            check_replaceable(self.rules_path, is_rules_dir, "rules")
            m = self.mining
            ids, offsets = self._tokens("train", m.corpus)
            rules = mine_rules(
                ids, offsets, tokenizer_fingerprint(self.get_tokenizer()), m.min_count, m.min_n, m.max_n, m.filters,
                corpus=f"{m.corpus or self.corpus}:train",
            )
            rules.save(self.rules_path)
            print(f"mined {rules.num_rules()} rules from {rules.tokens_scanned} tokens -> {self.rules_path}")

    def setup(self, stage: str | None = None) -> None:
        limit = context_length(self.lm)
        if limit and self.block_size > limit:
            raise UserError(f"data.block_size {self.block_size} exceeds the LM's context of {limit} positions: "
                            "lower --data.block_size")
        tok = self.get_tokenizer()
        self.rules = self.load_rules() if self.uses_rules else None
        rng = np.random.default_rng(self.seed)
        for split, cap in (("train", self.max_train_blocks), ("validation", self.max_eval_blocks),
                           ("test", self.max_eval_blocks)):
            blocks = pack_blocks(*self._tokens(split), self.block_size, tok.eos_token_id)
            if len(blocks) == 0:
                raise UserError(f"{self.corpus} {split}: fewer tokens than one block of {self.block_size}")
            if cap is not None and len(blocks) > cap:
                blocks = blocks[np.sort(rng.choice(len(blocks), cap, replace=False))]
            self.blocks[split] = blocks

    def load_rules(self) -> MergeRules:
        """The rules batches are segmented with, checked against the LM's tokenizer."""
        return MergeRules.load(self.rules_path, tokenizer=self.get_tokenizer())

    # -- loaders -----------------------------------------------------------------------------------
    def segmenter(self) -> Segmenter | None:
        """The segmenter of every batch: the rules' longest match (None: the model segments)."""
        return RuleSegmenter(self.rules) if self.rules is not None else None

    def collator(self) -> SegmentCollator:
        """Collate function of every loader: stack the blocks and segment them."""
        c = SegmentCollator(self.segmenter())
        self._collators.append(c)
        return c

    def use_rules(self, rules: MergeRules, path: str | Path) -> None:
        """Segment every later batch of every loader (built or not) with ``rules``, saved at ``path``.
        Loaders with worker processes hold copies of their collator, so only ``num_workers: 0`` follows."""
        if self.num_workers:
            raise UserError("changing the rules during a fit needs data.num_workers: 0")
        self.rules, self.rules_dir = rules, str(path)
        for c in self._collators:
            c.segmenter = RuleSegmenter(rules)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(list(self.blocks[split]), batch_size=self.eval_batch_size, collate_fn=self.collator(),
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch (seeded), this rank's share, resumable mid-epoch."""
        shards = {"num_replicas": 1, "rank": 0}
        if self.trainer is not None:
            shards = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or shards
        blocks = list(self.blocks["train"])
        sampler = ResumableSampler(blocks, shards["num_replicas"], shards["rank"], shuffle=True, seed=self.seed)
        return ResumableLoader(blocks, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collator(),
                               num_workers=self.num_workers,
                               progress=self._batches_completed if self.trainer is not None else None)

    def _batches_completed(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.completed

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


UMIMDataModule = SpanDataModule
"""UMIM's data module: the blocks segmented by the merge rules."""
