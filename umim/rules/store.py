"""Merge rules: the set of frequent n-grams and its versioned on-disk format.

On disk a rule set is a directory with two files (format version 1):

* ``rules.safetensors`` — for every n, ``ngrams_{n}`` (int64 ``[k_n, n]``, token ids) and
  ``counts_{n}`` (int64 ``[k_n]``, corpus frequency), rows sorted by descending count.
* ``rules.json`` — ``format`` ("umim-merge-rules"), ``version`` (1), ``min_count`` (tau), ``n_range``,
  ``filters`` (list of filter stages applied), ``corpus`` (description), ``tokens_scanned``,
  ``num_rules`` per n, ``removed_by_filter`` per stage and n (what the stage removed from what the
  stages before it left), ``marginal_by_filter`` per stage and n (the rules the final set would hold
  without that stage but does not: 0 for a stage that a later one subsumes; absent in files written before it
  existed, read as ``{}``), and ``tokenizer`` (fingerprint: name, vocab_size, vocab_sha256).
  Optional: ``selection`` (provenance of a subset picked by ``umim select-rules``: source rules,
  costs file, target); older files without it load as before. ``umim score-rules`` writes
  ``costs.json`` beside the two files (:mod:`umim.rules.cost`).

Files are written to a temporary directory first and moved into place, so an interrupted save
never leaves a half-written rule set behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from umim.errors import UserError, one_line
from umim.fingerprint import check_fingerprint, tokenizer_fingerprint
from umim.merging.matcher import SpanMatcher
from umim.safe_io import check_replaceable, replace_dir, staging_dir

FORMAT = "umim-merge-rules"
VERSION = 1
MAX_N = 4  # the longest span a merger is trained for (umim.merging.batch builds spans of at most this many tokens)
RULES_FILES = ("rules.json", "rules.safetensors")



def is_rules_dir(path: Path) -> bool:
    """Whether ``path`` is a rules folder written by :meth:`MergeRules.save`."""
    try:
        return json.loads((Path(path) / "rules.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False

class RulesFileError(UserError):
    """A rules directory is missing, corrupted or of an unknown format."""


@dataclass
class MergeRules:
    """Frequent n-grams eligible for merging, with the metadata needed to reuse them safely."""

    ngrams: dict[int, np.ndarray]
    counts: dict[int, np.ndarray]
    tokenizer: dict
    min_count: int = 5
    n_range: tuple[int, int] = (2, 4)
    filters: list[str] = field(default_factory=list)
    corpus: str = ""
    tokens_scanned: int = 0
    removed_by_filter: dict[str, dict[int, int]] = field(default_factory=dict)
    """Per stage and n: n-grams the stage removed from what the stages before it left."""
    marginal_by_filter: dict[str, dict[int, int]] = field(default_factory=dict)
    """Per stage and n: n-grams the final set would hold without the stage but does not (what it changed)."""
    selection: dict = field(default_factory=dict)
    """Provenance of a rule subset chosen by measured cost (empty for mined rules)."""

    def __post_init__(self):
        for n in list(self.ngrams):
            g = np.asarray(self.ngrams[n], dtype=np.int64).reshape(-1, n)
            c = np.asarray(self.counts[n], dtype=np.int64).reshape(-1)
            if len(g) != len(c):
                raise RulesFileError(f"{len(g)} {n}-grams but {len(c)} counts")
            self.ngrams[n], self.counts[n] = g, c

    # -- queries -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    def __len__(self) -> int:
        return sum(len(g) for g in self.ngrams.values())

    def num_rules(self) -> dict[int, int]:
        return {n: len(self.ngrams[n]) for n in sorted(self.ngrams)}

    @cached_property
    def matcher(self) -> SpanMatcher:
        return SpanMatcher(self.ngrams, self.vocab_size)

    def segment(self, ids) -> list[tuple[int, int]]:
        """Longest-match segmentation of one sequence: ``[(start, length), ...]`` covering it."""
        return self.matcher.segment(ids)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ``TokenizerMismatchError`` if ``tokenizer`` is not the one these rules were mined with."""
        check_fingerprint(self.tokenizer, tokenizer_fingerprint(tokenizer), "these merge rules")

    # -- persistence -------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "min_count": int(self.min_count),
            "n_range": list(self.n_range),
            "filters": list(self.filters),
            "corpus": self.corpus,
            "tokens_scanned": int(self.tokens_scanned),
            "num_rules": {str(n): k for n, k in self.num_rules().items()},
            "removed_by_filter": {s: {str(n): int(k) for n, k in d.items()} for s, d in self.removed_by_filter.items()},
            "marginal_by_filter": {s: {str(n): int(k) for n, k in d.items()}
                                   for s, d in self.marginal_by_filter.items()},
            "tokenizer": self.tokenizer,
            **({"selection": self.selection} if self.selection else {}),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``rules.safetensors`` + ``rules.json`` into directory ``path`` (atomically); an earlier
        rules folder there is replaced, any other non-empty folder is refused (:class:`OutputError`)."""
        from safetensors.numpy import save_file

        check_replaceable(path, is_rules_dir, "rules")
        tmp = staging_dir(path)
        try:
            tensors = {}
            for n in sorted(self.ngrams):
                tensors[f"ngrams_{n}"] = np.ascontiguousarray(self.ngrams[n])
                tensors[f"counts_{n}"] = np.ascontiguousarray(self.counts[n])
            save_file(tensors, str(tmp / "rules.safetensors"))
            (tmp / "rules.json").write_text(json.dumps(self.metadata(), indent=2))
            return replace_dir(tmp, path, is_rules_dir, "rules")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, token: str | None = None):
        """Save these rules as :meth:`save` does and upload them to hub repo ``repo_id`` (created when
        missing) on branch ``revision``; returns the commit's ``CommitInfo``."""
        from umim.hub import push_saved

        return push_saved(self.save, repo_id, what="merge rules", private=private, revision=revision,
                          commit_message=commit_message, token=token)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, tokenizer: Any = None, *, revision: str | None = None,
                        subfolder: str | None = None) -> "MergeRules":
        """Load a rule set from a folder (or its ``rules.json``) or a hub repo id "org/name" (fetched
        into the hub cache; ``revision`` and ``subfolder`` pick the branch/tag/commit and the folder in
        it); check it against ``tokenizer`` if given."""
        from umim.hub import resolve

        return cls.load(resolve(name_or_path, revision=revision, subfolder=subfolder, files=RULES_FILES,
                                what="merge rules"), tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer: Any = None) -> "MergeRules":
        """Load a rule set directory (or its ``rules.json``, or a hub repo id as :meth:`from_pretrained`
        does); check it against ``tokenizer`` if given."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from umim.hub import resolve

        path = resolve(path, files=RULES_FILES, what="merge rules")
        if path.is_file() and path.name == "rules.json":
            path = path.parent
        meta_file, tensor_file = path / "rules.json", path / "rules.safetensors"
        if not meta_file.is_file() or not tensor_file.is_file():
            raise RulesFileError(f"{path} is not a merge-rules directory (needs rules.json and rules.safetensors)")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RulesFileError(f"{meta_file} is corrupted: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise RulesFileError(f"{meta_file} is not a UMIM merge-rules file")
        version = meta.get("version")
        if type(version) is not int or version != VERSION:
            raise RulesFileError(f"{meta_file} has format version {version!r}, this UMIM reads {VERSION} (an integer)")
        if not isinstance(meta.get("selection", {}), dict):
            raise RulesFileError(f"{meta_file}: 'selection' must be an object, got {meta['selection']!r}")
        if meta.get("tokenizer") is not None and not isinstance(meta.get("tokenizer"), dict):
            raise RulesFileError(f"{meta_file}: 'tokenizer' must be a fingerprint object, got {meta['tokenizer']!r}")
        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise RulesFileError(f"{tensor_file} is corrupted: {one_line(e)}") from e
        ngrams, counts = {}, {}
        for key, arr in tensors.items():
            kind, _, n = key.rpartition("_")
            if kind not in ("ngrams", "counts") or not n.isdigit() or not 2 <= int(n) <= MAX_N:
                raise RulesFileError(f"{tensor_file}: unexpected tensor {key!r} (rules hold ngrams_n and counts_n, "
                                     f"n = 2..{MAX_N})")
            if not np.issubdtype(arr.dtype, np.integer):
                raise RulesFileError(f"{tensor_file}: {key} has dtype {arr.dtype}, token ids and counts are integers")
            (ngrams if kind == "ngrams" else counts)[int(n)] = arr
        if set(ngrams) != set(counts) or any(ngrams[n].ndim != 2 or ngrams[n].shape[1] != n for n in ngrams):
            raise RulesFileError(f"{tensor_file} has inconsistent n-gram arrays")
        short = [n for n in ngrams if counts[n].shape != (len(ngrams[n]),)]
        if short:
            raise RulesFileError(f"{tensor_file}: counts_{short[0]} does not hold one count per {short[0]}-gram")
        if any(len(g) and (g.min() < 0) for g in ngrams.values()):
            raise RulesFileError(f"{tensor_file}: negative token ids")
        try:
            rules = cls(
                ngrams=ngrams,
                counts=counts,
                tokenizer=meta["tokenizer"],
                min_count=meta["min_count"],
                n_range=tuple(meta["n_range"]),
                filters=meta["filters"],
                corpus=meta["corpus"],
                tokens_scanned=meta["tokens_scanned"],
                removed_by_filter={s: {int(n): k for n, k in d.items()}
                                   for s, d in meta.get("removed_by_filter", {}).items()},
                marginal_by_filter={s: {int(n): k for n, k in d.items()}
                                    for s, d in meta.get("marginal_by_filter", {}).items()},
                selection=meta.get("selection", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RulesFileError(f"{meta_file} lacks or mangles a required field: {e!r}") from e
        if tokenizer is not None:
            if not isinstance(rules.tokenizer, dict):
                raise RulesFileError(f"{meta_file} records no tokenizer fingerprint, so it cannot be checked against "
                                     "this LM's vocabulary: mine the rules again with umim mine")
            check_fingerprint(rules.tokenizer, tokenizer_fingerprint(tokenizer), f"the merge rules in {path}")
            vocab = len(tokenizer)
            if any(len(g) and g.max() >= vocab for g in ngrams.values()):
                raise RulesFileError(f"{tensor_file}: token ids beyond the tokenizer's {vocab} entries")
        return rules
