"""Pieces every decode loop shares: picking the next token, deciding when to stop, and spelling
tokens as text while they stream. Used by :meth:`umim.inference.generation.MergedLM.generate` and
by KV-policy decoding (:func:`umim_eval.scoring.policy_generate.policy_generate`), so both sample
and stop the same way as Hugging Face ``generate``.
"""

from __future__ import annotations

import torch


class TokenPicker:
    """The next token from logits: greedy, or sampled after the config's warpers.

    Creating one seeds the global generator when ``cfg.seed`` is set and sampling is on (HF
    ``generate`` samples from the global generator too, so equal seeds give equal texts).

    Parameters
    ----------
    cfg : a :class:`~umim.inference.generation.SamplingConfig`.
    """

    def __init__(self, cfg):
        self.processors, self.do_sample = cfg.processors(), cfg.do_sample
        if cfg.do_sample and cfg.seed is not None:
            torch.manual_seed(cfg.seed)

    def __call__(self, prev_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[B] next token ids from ``logits`` [B, V] (float) given ``prev_ids`` [B, t] (the warpers'
        input ids; temperature, top-k and top-p do not read them)."""
        scores = self.processors(prev_ids, logits)
        return torch.multinomial(scores.softmax(-1), 1).squeeze(1) if self.do_sample else scores.argmax(-1)


class StopCheck:
    """Why one row's generation ends after its newest token, or ``None`` to go on.

    Reasons, in this order: ``"eos"`` (the token is in the EOS set), ``"stop_string"`` (a stop
    string appears in the text of the last tokens), ``"max_new_tokens"``, ``"context"`` (no
    position left to feed another token at).

    Parameters
    ----------
    cfg : a :class:`~umim.inference.generation.SamplingConfig` (``eos_token_id``,
        ``stop_strings``, ``max_new_tokens``).
    context : the model's position limit; 0 for none.
    tokenizer : decodes the recent tokens for ``stop_strings``; needed only when there are some.
    default_eos : the EOS id(s) used when ``cfg.eos_token_id`` is None (e.g. the tokenizer's).
    """

    def __init__(self, cfg, context: int = 0, tokenizer=None, default_eos: int | list[int] | None = None):
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else default_eos
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        self.stop_strings, self.tokenizer = list(cfg.stop_strings), tokenizer
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the generated tokens")
        # tokens enough to spell any stop string (a token spells at least one character)
        self.window = 16 + max(map(len, self.stop_strings), default=0)
        self.max_new_tokens, self.context = cfg.max_new_tokens, context

    def __call__(self, generated: list[int], next_position: int) -> str | None:
        """The stop reason after ``generated`` (this row's new tokens so far, possibly none), when
        its next token would be fed at ``next_position``; ``None`` while decoding goes on."""
        if generated and generated[-1] in self.eos:
            return "eos"
        if self.stop_strings and generated:
            text = self.tokenizer.decode(generated[-self.window :])
            if any(x in text for x in self.stop_strings):
                return "stop_string"
        if len(generated) >= self.max_new_tokens:
            return "max_new_tokens"
        if self.context and next_position >= self.context:
            return "context"
        return None


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    """``text`` up to its first stop string (whole when it holds none)."""
    return text[: min((text.find(x) for x in stop_strings if x in text), default=len(text))]


class TextPieces:
    """Incremental detokenization: the text each new token adds, for streaming.

    Each piece is the difference between decoding a short window of recent tokens with and without
    the new one, so tokenizers that join tokens with spaces or strip a leading one come out right
    and the work per token stays constant. A piece ending in an incomplete UTF-8 character
    (``"\\ufffd"``) is held back until the character completes; :meth:`flush` gives what is left.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0  # ids[prefix:read] were spelled already; they give the context

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token: int) -> str:
        """The text ``token`` adds after the tokens pushed before ("" while held back)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """The held-back text, if any (call after the last token)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
