"""Generation with merging: prompt merging and dynamic online merging with KV-cache rollback.

Modes (paper Sec. 3.4, App. D):

* ``none`` — plain decoding; the same tokens as ``model.generate`` with the same settings.
* ``prompt`` — the prompt is segmented once by the shared matcher and prefilled as merged
  embeddings (Pseudocode 3, with the library's longest-match segmentation); decoding is normal.
* ``dynamic`` — prompt merging plus online merging (Pseudocode 4). When the token ``y`` just
  sampled completes a rule n-gram together with the previous n-1 *single-token* steps of the merged
  sequence (prompt or generated; surrogates never take part; n = 4, 3, 2 checked in that order),
  ``y`` is not fed: the n-1 cache entries of its predecessors are removed and ONE step is fed with
  the surrogate embedding of the n-gram, whose logits give the next token. Every generated token
  still costs exactly one forward step, and the cache shrinks by n-1. Positions stay contiguous in
  the compressed sequence, as in a merged prefill. The emitted text is exactly the sampled tokens.

Batches: with one row the n-1 entries are cut off the cache at once. With several rows, which merge
at different steps, a merging row's n-1 last slots are masked out instead (its positions continue
from its own valid count), and the cache is compacted — valid slots gathered to the right — every
``compact_every`` steps and at the end. Trade-off: between compactions masked slots still occupy
memory and are read by attention; compaction costs one gather of the cache. Rows never see another
row's merges: masks and positions are per row.

After the last sampled token the loop feeds it too (one extra step), so the final cache holds the
whole text — ``kv_len_final`` equals the number of segments — ready to continue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from umim.errors import UserError
from umim.fingerprint import tokenizer_fingerprint
from umim.inference import kv_cache
from umim.lm import LMSpec, cache_kwargs
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
        if type(self.max_new_tokens) is not int or self.max_new_tokens < 1:
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


class _Row:
    """Per-row bookkeeping of the merged sequence (O(1) Python work per step)."""

    def __init__(self, prompt: list[int], starts: np.ndarray, lens: np.ndarray):
        self.prompt = prompt
        self.generated: list[int] = []
        self.segments = [(int(s), int(n)) for s, n in zip(starts, lens) if n > 0]
        tail: list[int] = []  # trailing single-token steps of the merged sequence (at most 3)
        for s, n in reversed(self.segments[-3:]):
            if n != 1:
                break
            tail.insert(0, prompt[s])
        self.tail = tail
        self.stop_reason = "max_new_tokens"
        self.trace: dict | None = None


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
        return ModelArgs(spec.name_or_path, spec.gguf_file, spec.dtype, device, run_dir and str(run_dir),
                         merger and str(merger), rules and str(rules)).load()

    def require_merging(self, what: str = "UMIM merging") -> None:
        """Raise a user error naming ``what`` when this LM has no merger or no rules."""
        if self.merger is None or self.rules is None:
            raise UserError(f"{what} needs a merger and rules (run_dir, or merger + rules)")

    def token_reduction(self, ids: list[int]) -> float:
        """UMIM's TR on one sequence: ``1 - segments / tokens`` of its longest-match segmentation."""
        self.require_merging("UMIM's token reduction")
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
        mask = torch.arange(n_max, device=ids.device)[None] < torch.tensor([len(g) for g in todo], device=ids.device)[:, None]
        out = self.merger(self.embed(ids).float(), mask).to(self.embed.weight.dtype)  # [K, d]
        self._surrogates.update(zip(todo, out))

    def segment_embeds(self, ids: list[int], segments: list[tuple[int, int]]) -> torch.Tensor:
        """[S, d] embeddings of a segmented sequence; spans take their (cached) surrogates."""
        dev = self.lm.device
        spans = [(i, tuple(ids[s : s + n])) for i, (s, n) in enumerate(segments) if n > 1]
        with torch.no_grad():
            starts = torch.tensor([s for s, _ in segments], device=dev)
            out = self.embed(torch.tensor(ids, device=dev)[starts])
            self._fill_surrogates([g for _, g in spans])
            for i, g in spans:
                out[i] = self._surrogates[g]
        return out

    def _merge_length(self, tail: list[int], tok: int) -> int:
        """n of the longest rule n-gram formed by the last n-1 single-token steps and ``tok`` (0: none)."""
        for n in self._rule_ns:  # the rules' own n range, longest first
            if len(tail) >= n - 1 and tuple(tail[len(tail) - n + 1 :] + [tok]) in self._rule_set(n):
                return n
        return 0

    @staticmethod
    def _record(row: "_Row", logits: torch.Tensor, position: int) -> None:
        t = row.trace
        t["logits"].append(logits.clone())
        t["position"].append(position)
        t["element"].append(t["ids"][position])

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

    @torch.no_grad()
    def generate(self, prompts, mode: str = "dynamic", sampling: SamplingConfig | None = None,
                 compact_every: int = 16, trace: bool = False) -> list[GenerationResult]:
        """Generate for a batch of prompts (strings or token-id lists)."""
        if mode not in MODES:
            raise GenerationError(f"unknown merge mode {mode!r}; choose from {MODES}")
        if mode != "none":
            self.require_merging(f"merge mode {mode!r}")
        cfg = sampling or SamplingConfig()
        if not isinstance(cfg, SamplingConfig):
            raise GenerationError(f"sampling must be a SamplingConfig, not {type(cfg).__name__}")
        ids_list = self._prompt_ids(prompts)
        stop_window = 16 + max(map(len, cfg.stop_strings), default=0)  # tokens enough to spell any stop string
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.tokenizer.eos_token_id
        eos_set = set([eos] if isinstance(eos, int) else (eos or []))
        procs = cfg.processors()
        if cfg.do_sample and cfg.seed is not None:
            torch.manual_seed(cfg.seed)  # HF generate samples from the global generator too

        # prompt segmentation: the shared matcher, or single tokens
        B = len(ids_list)
        if mode == "none":
            segs = [(np.arange(len(p)), np.ones(len(p), dtype=np.int64)) for p in ids_list]
        else:
            L = max(map(len, ids_list))
            padded = np.zeros((B, L), dtype=np.int64)
            for b, p in enumerate(ids_list):
                padded[b, : len(p)] = p
            starts, lens = self.rules.matcher.segment_batch(padded, np.array([len(p) for p in ids_list]))
            segs = list(zip(starts, lens))
        rows = [_Row(p, s, n) for p, (s, n) in zip(ids_list, segs)]
        S = max(len(r.segments) for r in rows)
        if self.context and S + 1 > self.context:
            raise GenerationError(f"prompt needs {S} positions after merging; the model's context is {self.context}")

        # left-padded prefill of the (merged) prompts
        dev, dtype = self.lm.device, self.embed.weight.dtype
        embeds = torch.zeros(B, S, self.embed.embedding_dim, dtype=dtype, device=dev)
        mask = torch.zeros(B, S, dtype=torch.long, device=dev)
        for b, r in enumerate(rows):
            e = self.segment_embeds(r.prompt, r.segments)
            embeds[b, S - len(e) :] = e
            mask[b, S - len(e) :] = 1
            if trace:  # element ids identify what each compressed position holds
                r.trace = {"logits": [], "position": [], "element": [], "embeds": list(e), "ids": list(range(len(e))),
                           "next_id": len(e) - 1}
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = DynamicCache(config=self.lm.config)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **cache_kwargs(self.lm, cache),
                      use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        next_pos = [len(r.segments) for r in rows]  # compressed position of each row's next step (host)
        if trace:
            for b, r in enumerate(rows):
                self._record(r, logits[b], next_pos[b] - 1)

        done = [cfg.max_new_tokens <= 0] * B
        prev_ids = torch.tensor([r.prompt[-1:] for r in rows], device=dev)
        single, since_compact = B == 1, 0
        while not all(done):
            scores = procs(prev_ids, logits)
            y = torch.multinomial(scores.softmax(-1), 1).squeeze(1) if cfg.do_sample else scores.argmax(-1)
            y_list = y.tolist()
            step_embeds = self.embed(y)[:, None, :]  # [B, 1, d]
            merges, live = [0] * B, [not d for d in done]
            for b, r in enumerate(rows):
                if done[b]:  # finished rows feed a masked dummy slot until the batch ends
                    continue
                tok = y_list[b]
                r.generated.append(tok)
                done[b] = True
                if tok in eos_set:
                    r.stop_reason = "eos"
                elif cfg.stop_strings and any(x in self.tokenizer.decode(r.generated[-stop_window:])
                                              for x in cfg.stop_strings):
                    r.stop_reason = "stop_string"
                elif len(r.generated) >= cfg.max_new_tokens:
                    r.stop_reason = "max_new_tokens"
                elif self.context and next_pos[b] + 2 > self.context:
                    r.stop_reason = "context"
                else:
                    done[b] = False
                n_merge = self._merge_length(r.tail, tok) if mode == "dynamic" else 0
                i = len(r.prompt) + len(r.generated) - 1  # original index of tok
                if n_merge:
                    gram = tuple(r.tail[len(r.tail) - n_merge + 1 :] + [tok])
                    step_embeds[b, 0] = self.surrogate(gram)
                    del r.segments[len(r.segments) - n_merge + 1 :]
                    r.segments.append((i - n_merge + 1, n_merge))
                    r.tail, merges[b] = [], n_merge - 1
                else:
                    r.segments.append((i, 1))
                    r.tail = (r.tail + [tok])[-3:]
                if trace:
                    t = r.trace
                    del t["embeds"][len(t["embeds"]) - merges[b] :], t["ids"][len(t["ids"]) - merges[b] :]
                    t["embeds"].append(step_embeds[b, 0].clone())
                    t["next_id"] += 1
                    t["ids"].append(t["next_id"])
            if any(merges):  # roll back the merged predecessors' cache entries
                if single:
                    kv_cache.drop_last(cache, merges[0])
                    mask = mask[:, : mask.shape[1] - merges[0]]
                else:
                    T = mask.shape[1]
                    for b, k in enumerate(merges):
                        if k:
                            mask[b, T - k :] = 0
                next_pos = [p - k for p, k in zip(next_pos, merges)]
            mask = torch.cat([mask, torch.tensor(live, device=dev, dtype=mask.dtype)[:, None]], dim=1)
            out = self.lm(inputs_embeds=step_embeds, attention_mask=mask,
                          position_ids=torch.tensor(next_pos, device=dev)[:, None], **cache_kwargs(self.lm, cache),
                          use_cache=True)
            logits = out.logits[:, -1, :].float()
            if trace:
                for b, r in enumerate(rows):
                    if live[b]:
                        self._record(r, logits[b], next_pos[b])
            next_pos = [p + int(v) for p, v in zip(next_pos, live)]
            prev_ids = y[:, None]
            since_compact += 1
            if not single and (all(done) or since_compact >= compact_every) and bool((mask == 0).any()):
                mask = kv_cache.compact(cache, mask)
                since_compact = 0

        results = []
        for b, r in enumerate(rows):
            text = self.tokenizer.decode(r.generated, skip_special_tokens=False)
            if r.stop_reason == "stop_string":
                cut = min(text.find(x) for x in cfg.stop_strings if x in text)
                text = text[:cut]
            tr = None
            if trace:
                t = r.trace
                final = t["ids"]
                tr = {"logits": torch.stack(t["logits"]), "position": torch.tensor(t["position"]),
                      "survives": torch.tensor([p < len(final) and final[p] == e for p, e in zip(t["position"], t["element"])]),
                      "embeds": torch.stack(t["embeds"])}
            results.append(GenerationResult(
                text=text, generated_ids=list(r.generated), prompt_ids=list(r.prompt), segments=list(r.segments),
                prompt_len=len(r.prompt), prompt_len_merged=sum(1 for s, _ in r.segments if s < len(r.prompt)),
                kv_len_final=int(mask[b].sum()), kv_len_unmerged=len(r.prompt) + len(r.generated),
                stop_reason=r.stop_reason, trace=tr,
            ))
        self.last_cache = cache
        return results
