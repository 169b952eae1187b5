"""Tokenizer fingerprint: ties merge rules and mergers to the vocabulary they were built with.

Token ids are meaningless without their vocabulary, so every artifact that stores ids (rules) or
was trained on one LM's embedding table (merger) records this fingerprint and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from umim.errors import UserError


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    """Name, vocabulary size and a SHA-256 of the sorted (token, id) pairs of ``tokenizer``."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "vocab_size": int(max(vocab.values()) + 1 if vocab else 0),
        "vocab_sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest(),
    }


class TokenizerMismatchError(UserError):
    """Raised when an artifact was built for another tokenizer than the one in use."""


def check_fingerprint(expected: dict | None, actual: dict, what: str) -> None:
    """Raise :class:`TokenizerMismatchError` unless the vocabularies (size and hash) agree."""
    if expected is None:
        return
    if (expected.get("vocab_size"), expected.get("vocab_sha256")) != (
        actual.get("vocab_size"),
        actual.get("vocab_sha256"),
    ):
        raise TokenizerMismatchError(
            f"{what} was built for tokenizer {expected.get('name')!r} "
            f"(vocab {expected.get('vocab_size')}, sha256 {str(expected.get('vocab_sha256'))[:12]}…) "
            f"but is used with {actual.get('name')!r} "
            f"(vocab {actual.get('vocab_size')}, sha256 {str(actual.get('vocab_sha256'))[:12]}…). "
            "Mine rules / train a merger with the same tokenizer as the target model."
        )
