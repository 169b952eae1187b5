"""Generation with merging: prompt merging and dynamic online merging with KV-cache rollback.

Modes (paper Sec. 3.4, App. D):

* ``none`` — plain decoding; the same tokens as ``model.generate`` with the same settings.
* ``prompt`` — the prompt is segmented once by the shared matcher and prefilled as merged
  embeddings (Pseudocode 3, with the library's longest-match segmentation); decoding is normal.
* ``dynamic`` — prompt merging plus online merging (Pseudocode 4). When the token ``y`` just
  sampled completes a rule n-gram together with the previous n-1 *single-token* steps of the merged
  sequence (prompt or generated; surrogates never take part; the rules' n checked longest first),
  ``y`` is not fed: the n-1 cache entries of its predecessors are removed and ONE step is fed with
  the surrogate embedding of the n-gram, whose logits give the next token. Every generated token
  still costs exactly one forward step, and the cache shrinks by n-1. Positions stay contiguous in
  the compressed sequence, as in a merged prefill. The emitted text is exactly the sampled tokens.

Batches: rows merge at different steps, so their lengths drift apart. The cache stores them ragged
(:class:`~umim.inference.kv_cache.RaggedKV`: one slot pool per layer and each row's slot ids), so a
merging row's n-1 entries are freed at once at any batch size, the stored bytes are the sum of the
row lengths, and each step's attention reads a rectangle as wide as the longest row, gathered per
layer and dropped right after. Rows never see another row's merges: masks and positions are per row.
Batch 1 is a ragged batch of one: one code path.

After the last sampled token the loop feeds it too (one extra step), so the final cache holds the
whole text — ``kv_len_final`` equals the number of segments — and a decode can go on from it
through :meth:`MergingCache.step` (a plain model forward on it is refused).

Code: one step loop (:meth:`MergedLM._steps`) serves :meth:`MergedLM.generate` (a batch, results
at the end) and :meth:`MergedLM.stream` (one prompt, token by token). The cache, its mask and the
rows' positions live in :class:`~umim.inference.kv_cache.MergingCache`; picking and stopping in
:mod:`umim.inference.decoding` (shared with KV-policy decoding); traces in :mod:`umim.inference.trace`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from umim.errors import UserError
from umim.fingerprint import tokenizer_fingerprint
from umim.inference.decoding import StopCheck, TextPieces, TokenPicker, cut_at_stop
from umim.inference.kv_cache import MergingCache
from umim.inference.trace import NoTrace, TraceRecorder
from umim.lm import LMSpec
from umim.merging.merger import MergeModule
from umim.rules.store import MergeRules

MODES = ("none", "prompt", "dynamic")


class GenerationError(UserError):
    """Bad decoding settings or prompts."""


@dataclass
class SamplingConfig:
    """Decoding settings (HF ``generate`` semantics)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    """0 disables top-k (note: HF ``generate`` defaults to 50 when sampling)."""
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    eos_token_id: int | list[int] | None = None
    """Default: the tokenizer's EOS."""

    def __post_init__(self):
        bad = None
        kinds = {"temperature": numbers.Real, "top_p": numbers.Real, "top_k": numbers.Integral}
        wrong_type = [k for k, kind in kinds.items()
                      if isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), kind)]
        if wrong_type:
            bad = f"{wrong_type[0]} {getattr(self, wrong_type[0])!r}: give a number"
        elif type(self.max_new_tokens) is not int or self.max_new_tokens < 1:
            bad = f"max_new_tokens {self.max_new_tokens!r}: give a positive number of tokens"
        elif not 0.0 < self.top_p <= 1.0:
            bad = f"top_p {self.top_p!r}: give a probability mass in (0, 1] (1 disables top-p)"
        elif self.top_k < 0:
            bad = f"top_k {self.top_k!r}: give 0 (off) or a positive count"
        elif self.temperature < 0.0 or (self.do_sample and not self.temperature > 0.0):
            bad = f"temperature {self.temperature!r}: give a temperature above 0 (sampling divides the logits by it)"
        elif not isinstance(self.stop_strings, (list, tuple)):
            bad = f"stop_strings {self.stop_strings!r}: give a list of strings"
        elif any(not isinstance(x, str) or x == "" for x in self.stop_strings):
            bad = f"stop strings {self.stop_strings!r}: each must be a non-empty string"
        if bad:
            raise GenerationError(bad)

    @classmethod
    def from_settings(cls, sampling: SamplingConfig | None = None, settings: dict | None = None) -> SamplingConfig:
        """The settings of one decoding call: ``sampling``, or keyword ``settings`` named like the
        fields (``max_new_tokens=8, do_sample=True``), or the defaults."""
        names = [f.name for f in fields(cls)]
        if settings:
            if sampling is not None:
                raise GenerationError(f"settings {', '.join(settings)}: give them in sampling or as keywords, not both")
            unknown = [k for k in settings if k not in names]
            if unknown:
                raise GenerationError(f"unknown setting {unknown[0]!r}; choose from {', '.join(names)}")
            return cls(**settings)
        if sampling is None:
            return cls()
        if not isinstance(sampling, cls):
            raise GenerationError(f"sampling must be a SamplingConfig, not {type(sampling).__name__}")
        return sampling

    def processors(self) -> LogitsProcessorList:
        """The warpers HF ``generate`` applies, in its order (temperature, top-k, top-p)."""
        procs = LogitsProcessorList()
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                procs.append(TopKLogitsWarper(top_k=self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p=self.top_p))
        return procs


@dataclass
class GenerationResult:
    """One row's output. Indices are over prompt + generated tokens (original positions)."""

    text: str
    generated_ids: list[int]
    prompt_ids: list[int]
    segments: list[tuple[int, int]]
    prompt_len: int
    prompt_len_merged: int
    kv_len_final: int
    kv_len_unmerged: int
    stop_reason: str
    trace: dict | None = None
    """With ``trace=True``: ``logits`` [steps, V] (each step's next-token logits, prefill first),
    ``position`` [steps] (compressed position of the element whose forward produced them),
    ``survives`` [steps] bool (that element is still at that position in the final sequence, i.e.
    it was not merged away later) and ``embeds`` [S_final, d] (the final compressed sequence)."""

    @property
    def token_reduction(self) -> float:
        return 1.0 - self.kv_len_final / max(self.kv_len_unmerged, 1)

    def to_json(self) -> dict:
        return {
            "text": self.text, "generated_ids": self.generated_ids, "segments": [list(s) for s in self.segments],
            "prompt_len": self.prompt_len, "prompt_len_merged": self.prompt_len_merged,
            "kv_len_final": self.kv_len_final, "kv_len_unmerged": self.kv_len_unmerged,
            "token_reduction": self.token_reduction, "stop_reason": self.stop_reason,
        }


class StreamToken(NamedTuple):
    """One token of :meth:`MergedLM.stream`."""

    id: int
    text: str
    """The text this token adds ("" while it is part of an unfinished character)."""
    stop_reason: str | None
    """Set on the last token: ``"eos"``, ``"stop_string"``, ``"max_new_tokens"`` or ``"context"``."""


class _Row:
    """Per-row bookkeeping of the merged sequence (O(1) Python work per step)."""

    def __init__(self, prompt: list[int], starts: np.ndarray, lens: np.ndarray, keep: int):
        self.prompt = prompt
        self.generated: list[int] = []
        self.segments = [(int(s), int(n)) for s, n in zip(starts, lens) if n > 0]
        self.keep = keep  # the longest rule n - 1: the most predecessors a merge takes
        tail: list[int] = []  # trailing single-token steps of the merged sequence (at most keep)
        for s, n in reversed(self.segments[-keep:] if keep else []):
            if n != 1:
                break
            tail.insert(0, prompt[s])
        self.tail = tail
        self.stop_reason: str | None = None

    def push(self, tok: int, n: int) -> tuple[int, ...] | None:
        """Add the segment of the newest generated token ``tok``; with ``n`` > 0 it merges with the
        last n-1 single-token steps into one segment, whose n-gram is returned."""
        i = len(self.prompt) + len(self.generated) - 1  # original index of tok
        if not n:
            self.segments.append((i, 1))
            self.tail = (self.tail + [tok])[-self.keep :] if self.keep else []
            return None
        gram = tuple(self.tail[len(self.tail) - n + 1 :] + [tok])
        del self.segments[len(self.segments) - n + 1 :]
        self.segments.append((i - n + 1, n))
        self.tail = []
        return gram


class MergedLM:
    """A causal LM paired with a trained merger and a rule set, with a merging decode loop."""

    def __init__(self, lm, tokenizer, merger: MergeModule | None = None, rules: MergeRules | None = None):
        self.lm, self.tokenizer = lm.eval(), tokenizer
        self.embed = lm.get_input_embeddings()
        fp = tokenizer_fingerprint(tokenizer)
        if rules is not None:
            rules.check_tokenizer(tokenizer)
        if merger is not None:
            from umim.fingerprint import check_fingerprint

            check_fingerprint(merger.config.tokenizer, fp, "the merger")
            if merger.config.hidden_size != self.embed.embedding_dim:
                raise UserError(f"merger hidden size {merger.config.hidden_size} != LM's {self.embed.embedding_dim}")
            merger = merger.to(device=lm.device, dtype=torch.float32).eval()
        self.merger, self.rules = merger, rules
        self._rule_sets: dict[int, set] | None = None
        self._rule_ns = sorted(rules.ngrams, reverse=True) if rules is not None else []  # longest first
        self._surrogates: dict[tuple, torch.Tensor] = {}
        self.context = int(getattr(lm.config, "max_position_embeddings", 0) or 0)

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, lm: LMSpec | str = "embedded", merger: str | Path | None = None, rules: str | Path | None = None,
             run_dir: str | Path | None = None, device: str | None = None) -> "MergedLM":
        """Load in one call: the LM, and the merger + rules from ``run_dir`` (``merger/``, ``rules/``)
        or from separate paths, on ``device`` (default: CUDA when available, else CPU).
        The same as :meth:`umim.inference.loading.ModelArgs.load`."""
        from umim.inference.loading import ModelArgs

        spec = lm if isinstance(lm, LMSpec) else LMSpec(str(lm))
        # paths stay as given: a Path is always a local folder, a string may be a hub repo id
        return ModelArgs(spec.name_or_path, spec.gguf_file, spec.dtype, device, run_dir, merger, rules).load()

    def require_merging(self, what: str = "UMIM merging") -> None:
        """Raise a user error naming ``what`` when this LM has no merger or no rules."""
        if self.merger is None or self.rules is None:
            from umim.inference.loading import merging_missing

            raise merging_missing(what)

    def token_reduction(self, ids: list[int]) -> float:
        """UMIM's TR on one sequence: ``1 - segments / tokens`` of its longest-match segmentation
        (the rules alone decide it)."""
        if self.rules is None:
            from umim.inference.loading import merging_missing

            raise merging_missing("UMIM's token reduction")
        return 1.0 - len(self.rules.segment(list(ids))) / len(ids) if len(ids) else 0.0

    # -- rules and surrogates ----------------------------------------------------------------------
    def _rule_set(self, n: int) -> set:
        if self._rule_sets is None:  # built once: O(1) membership for the incremental check
            self._rule_sets = {m: set(map(tuple, g.tolist())) for m, g in self.rules.ngrams.items()}
        return self._rule_sets.get(n, set())

    def surrogate(self, ngram: tuple[int, ...]) -> torch.Tensor:
        """[d] surrogate embedding of ``ngram`` (cached: the merger sees static embeddings only)."""
        if ngram not in self._surrogates:
            self._fill_surrogates([ngram])
        return self._surrogates[ngram]

    @torch.no_grad()
    def _fill_surrogates(self, ngrams: list[tuple[int, ...]]) -> None:
        """Compute the uncached surrogates of ``ngrams`` in ONE merger call (padded spans + mask)."""
        todo = list(dict.fromkeys(g for g in ngrams if g not in self._surrogates))
        if not todo:
            return
        n_max = max(map(len, todo))
        ids = torch.tensor([list(g) + [g[0]] * (n_max - len(g)) for g in todo], device=self.lm.device)
        lengths = torch.tensor([len(g) for g in todo], device=ids.device)
        mask = torch.arange(n_max, device=ids.device)[None] < lengths[:, None]
        out = self.merger(self.embed(ids).float(), mask).to(self.embed.weight.dtype)  # [K, d]
        self._surrogates.update(zip(todo, out))

    def segment_embeds(self, ids: list[int], segments: list[tuple[int, int]]) -> torch.Tensor:
        """[S, d] embeddings of a segmented sequence; spans take their (cached) surrogates."""
        dev = self.lm.device
        at = [i for i, (_, n) in enumerate(segments) if n > 1]  # segment index of each span
        grams = [tuple(ids[s : s + n]) for s, n in segments if n > 1]
        with torch.no_grad():
            # both index copies first: a host-to-device copy waits for the work queued before it (the merger)
            first, at = (torch.tensor(x, dtype=torch.long, device=dev) for x in ([ids[s] for s, _ in segments], at))
            out = self.embed(first)
            if grams:  # one scatter of the stacked surrogates, not one copy per span
                self._fill_surrogates(grams)
                out[at] = torch.stack([self._surrogates[g] for g in grams])
        return out

    def _merge_length(self, tail: list[int], tok: int) -> int:
        """n of the longest rule n-gram formed by the last n-1 single-token steps and ``tok`` (0: none)."""
        for n in self._rule_ns:  # the rules' own n range, longest first
            if len(tail) >= n - 1 and tuple(tail[len(tail) - n + 1 :] + [tok]) in self._rule_set(n):
                return n
        return 0

    # -- decoding ----------------------------------------------------------------------------------
    def _prompt_ids(self, prompts) -> list[list[int]]:
        """Token ids of each prompt: a string, a list of token ids, or a list of either."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and
                                        all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise GenerationError(f"prompts: give a string, a list of token ids, or a list of those, "
                                  f"not {type(prompts).__name__}")
        out = []
        for p in prompts:
            if isinstance(p, str):
                ids = list(self.tokenizer(p, add_special_tokens=False)["input_ids"])
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                ids = list(p)
            else:
                raise GenerationError(f"prompt of type {type(p).__name__}: give a string or a list of token ids "
                                      "(decode bytes first)")
            if not ids:
                raise GenerationError("empty prompt: give at least one token to condition on")
            if min(ids) < 0 or max(ids) >= self.embed.num_embeddings:
                raise GenerationError(f"prompt token ids must lie in [0, {self.embed.num_embeddings}), "
                                      f"got {min(ids)}..{max(ids)}")
            out.append(ids)
        return out

    def _start(self, prompts, mode: str, sampling: SamplingConfig | None, settings: dict
               ) -> tuple[list[_Row], SamplingConfig]:
        """Check the call; each prompt segmented by the shared matcher (single tokens in mode ``none``)."""
        if mode not in MODES:
            raise GenerationError(f"unknown merge mode {mode!r}; choose from {MODES}")
        if mode != "none":
            self.require_merging(f"merge mode {mode!r}")
        cfg = SamplingConfig.from_settings(sampling, settings)
        ids_list = self._prompt_ids(prompts)
        if mode == "none":
            segs = [(np.arange(len(p)), np.ones(len(p), dtype=np.int64)) for p in ids_list]
        else:
            padded = np.zeros((len(ids_list), max(map(len, ids_list))), dtype=np.int64)
            for b, p in enumerate(ids_list):
                padded[b, : len(p)] = p
            segs = zip(*self.rules.matcher.segment_batch(padded, np.array([len(p) for p in ids_list])))
        keep = max(self._rule_ns, default=1) - 1 if mode == "dynamic" else 0
        rows = [_Row(p, s, n, keep) for p, (s, n) in zip(ids_list, segs)]
        S = max(len(r.segments) for r in rows)
        if self.context and S + 1 > self.context:
            raise GenerationError(f"prompt needs {S} positions after merging; the model's context is {self.context}")
        return rows, cfg

    def _prefill(self, rows: list[_Row], cache: MergingCache) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each row's merged prompt embeddings [S_b, d] (surrogates from the merger) and the [B, V]
        logits of prefilling them."""
        embeds = [self.segment_embeds(r.prompt, r.segments) for r in rows]
        return embeds, cache.prefill(embeds)

    @torch.no_grad()
    def prefill(self, prompts, mode: str = "dynamic") -> tuple[torch.Tensor, MergingCache]:
        """Everything before the first token: segment ``prompts`` (the matcher; none in mode
        ``"none"``), embed the segments (the merger), prefill the cache.

        Returns
        -------
        [B, V] float logits of each row's first new token, and the filled cache (``next_pos`` [B]:
        each merged prompt's length).
        """
        rows, _ = self._start(prompts, mode, None, {})
        cache = MergingCache(self.lm)
        return self._prefill(rows, cache)[1], cache

    def _steps(self, rows: list[_Row], cache: MergingCache, mode: str, cfg: SamplingConfig,
               recorder: NoTrace) -> Iterator[list[int]]:
        """The decode loop of the module docstring, shared by :meth:`generate` and :meth:`stream`.

        Yields each step's sampled tokens [B] (a finished row's entry is a dummy) once the rows have
        taken them, before they are fed; when it ends every row has its tokens, segments and stop
        reason, and ``cache`` holds the whole texts."""
        pick = TokenPicker(cfg)
        stop = StopCheck(cfg, self.context, self.tokenizer, self.tokenizer.eos_token_id)
        embeds, logits = self._prefill(rows, cache)
        recorder.start(embeds)
        recorder.record(logits, [p - 1 for p in cache.next_pos], [True] * len(rows))
        done = [False] * len(rows)
        prev_ids = torch.tensor([r.prompt[-1:] for r in rows], device=self.lm.device)
        while not all(done):
            y = pick(prev_ids, logits)
            y_list, live = y.tolist(), [not d for d in done]
            step_embeds = self.embed(y)[:, None, :]  # [B, 1, d]
            merged = [0] * len(rows)
            for b, r in enumerate(rows):
                if done[b]:  # finished rows feed a masked dummy slot until the batch ends
                    continue
                r.generated.append(y_list[b])
                r.stop_reason = stop(r.generated, cache.next_pos[b] + 1)
                done[b] = r.stop_reason is not None
                n = self._merge_length(r.tail, y_list[b]) if mode == "dynamic" else 0
                gram = r.push(y_list[b], n)
                if gram:  # feed the n-gram's surrogate in place of its n-1 cached predecessors
                    step_embeds[b, 0] = self.surrogate(gram)
                    merged[b] = n - 1
            yield y_list  # a stream shows the tokens before their forward
            recorder.step(step_embeds, merged, live)
            cache.rollback(merged)
            at = list(cache.next_pos)
            logits = cache.step(step_embeds, live)
            recorder.record(logits, at, live)
            prev_ids = y[:, None]
        cache.finish()

    def _result(self, r: _Row, kv_len: int, cfg: SamplingConfig, trace: dict | None) -> GenerationResult:
        text = self.tokenizer.decode(r.generated, skip_special_tokens=False)
        return GenerationResult(
            text=cut_at_stop(text, cfg.stop_strings) if r.stop_reason == "stop_string" else text,
            generated_ids=list(r.generated), prompt_ids=list(r.prompt), segments=list(r.segments),
            prompt_len=len(r.prompt), prompt_len_merged=sum(1 for s, _ in r.segments if s < len(r.prompt)),
            kv_len_final=kv_len, kv_len_unmerged=len(r.prompt) + len(r.generated), stop_reason=r.stop_reason,
            trace=trace)

    @torch.no_grad()
    def generate(self, prompts, mode: str = "dynamic", sampling: SamplingConfig | None = None,
                 trace: bool = False, **settings) -> list[GenerationResult]:
        """Generate for one prompt or a batch.

        Parameters
        ----------
        prompts : a string, a list of token ids, or a list of those (B rows).
        mode : ``"none"``, ``"prompt"`` or ``"dynamic"`` (see the module docstring).
        sampling : decoding settings; or give them as keywords instead (``max_new_tokens=8,
            do_sample=True``, any :class:`SamplingConfig` field).
        trace : record each row's :attr:`GenerationResult.trace`.

        Returns
        -------
        B :class:`GenerationResult`, in prompt order. ``self.last_cache`` is the final KV cache (a
        :class:`~umim.inference.kv_cache.RaggedKV`).
        """
        rows, cfg = self._start(prompts, mode, sampling, settings)
        cache, recorder = MergingCache(self.lm), TraceRecorder() if trace else NoTrace()
        for _ in self._steps(rows, cache, mode, cfg, recorder):
            pass
        self.last_cache = cache.kv
        return [self._result(r, n, cfg, recorder.result(b)) for b, (r, n) in enumerate(zip(rows, cache.lengths()))]

    def stream(self, prompt, mode: str = "dynamic", sampling: SamplingConfig | None = None,
               **settings) -> Iterator[StreamToken]:
        """Generate for ONE prompt, yielding each token as soon as it is sampled: the tokens of
        :meth:`generate` with the same arguments. Bad arguments raise here, before any decoding.

        The pieces join to the decoded text of all generated tokens, a stop string included (the
        text of :meth:`generate` cuts it); the last token carries the stop reason.
        """
        rows, cfg = self._start(prompt, mode, sampling, settings)
        if len(rows) != 1:
            raise GenerationError(f"stream takes one prompt, got {len(rows)}: use generate for a batch")
        return self._stream(rows[0], mode, cfg)

    @torch.no_grad()
    def _stream(self, row: _Row, mode: str, cfg: SamplingConfig) -> Iterator[StreamToken]:
        cache, pieces = MergingCache(self.lm), TextPieces(self.tokenizer)
        for y in self._steps([row], cache, mode, cfg, NoTrace()):
            text = pieces.push(y[0]) + (pieces.flush() if row.stop_reason else "")
            yield StreamToken(y[0], text, row.stop_reason)
        self.last_cache = cache.kv
