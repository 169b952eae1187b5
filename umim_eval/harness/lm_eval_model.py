"""lm-evaluation-harness model ``umim``: a frozen causal LM with UMIM span merging.

Use::

    lm_eval --model umim --model_args pretrained=DIR,run_dir=runs/x,merge=prompt --tasks ...
    umim-eval lm-eval --model umim --model_args pretrained=embedded,merger=M,rules=R --tasks ...

    from umim_eval.harness.lm_eval_model import UMIMLM
    lm_eval.simple_evaluate(model=UMIMLM(pretrained=..., run_dir=...), tasks=[...])

(How ``--model umim`` is found without importing anything: :mod:`umim_eval.harness.lm_eval_hook`.)

Model args: ``pretrained`` (hub id, local folder or ``embedded``; ``gguf_file`` too), ``merger``
and ``rules`` folders, or ``run_dir`` holding ``merger/`` and ``rules/``, and
``merge=none|prompt|dynamic`` (default ``prompt`` when a merger and rules are given, else
``none``). Every other argument is :class:`lm_eval.models.huggingface.HFLM`'s (``device``,
``batch_size``, ``dtype``, ``max_length``, ...); ``device`` defaults to CUDA when available, else CPU.

Request types with merging on (``merge=none`` is exactly HFLM for the two loglikelihood types):

* ``loglikelihood``: the *context* is segmented by the shared matcher and fed merged (surrogates
  for rule n-grams); the *continuation* tokens are fed and scored unmerged, one position each — the
  option's own loss decides, as in the paper. The element at the context's last compressed position
  (a surrogate when the context ends in a merged span) scores the first continuation token.
  Truncation is HFLM's (left, to ``max_length + 1`` original tokens).
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows (one context token each, of at most
  ``max_length`` tokens in all) scored with the two-stage perplexity of
  :func:`umim_eval.scoring.perplexity.two_stage_nll` (every token of a document scored exactly once).
* ``generate_until``: the project's own decoding loop :meth:`umim.inference.generation.MergedLM.generate`
  (``merge=prompt``: merged prompt; ``dynamic``: prompt + online merging; ``none``: plain), greedy
  unless ``do_sample``; returns only the new text, cut at the first ``until`` string (and the EOS
  text, as HFLM does), at most ``max_gen_toks`` tokens. Rows with equal generation settings are
  batched.

Baselines and other compressors (``compressor=NAME``, a name of :data:`umim_eval.methods.registry.METHODS`
that reduces prompts, e.g. ``select_context``, ``llmlingua2``, ``quickmerge``): for
``loglikelihood`` the context is reduced by that method and the continuation scored unmerged, as
above. ``ratio=umim`` (the default when rules are given) drives the method, per request, to the TR
the rules give on that context (the paper's matched-TR protocol); ``ratio=0.1`` fixes it;
``compressor_path=`` names a trained compressor's folder (``ktoken``). Requests
are scored one at a time on this path (a compressor may return embeddings, not ids).

Token reduction: every request adds its original and compressed position counts; for
``loglikelihood`` these are the CONTEXT's positions only (the continuation is never reduced, and
counting it would dilute the TR), so the TR is removed context positions / context tokens, the
definition every runner uses; ``loglikelihood_rolling`` counts whole documents and
``generate_until`` the final KV cache against the unmerged text. :attr:`UMIMLM.token_reduction` is
``1 - compressed / original`` over all of them and
:attr:`UMIMLM.token_reduction_by_type` per request type. ``get_model_info`` puts both into the
results JSON (``config.umim_token_reduction``, ``config.umim_token_counts``) and logs them when
lm-eval collects it at the end of the run.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from umim.errors import UserError, one_line
from umim.inference.generation import MODES, MergedLM, SamplingConfig
from umim.inference.loading import ModelArgs, load_merging
from umim.lm import LMSpec, resolve
from umim.merging.batch import build_merged_batch
from umim_eval.scoring.perplexity import two_stage_nll

log = logging.getLogger("lm_eval.models.umim")  # under lm-eval's logger: shown by its CLI

KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


class ModelArgsError(UserError):
    """Bad ``--model_args`` of the umim model."""


@functools.cache
def _hflm_arguments() -> set[str]:
    return set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


@register_model("umim")
class UMIMLM(HFLM):
    """HFLM with UMIM merging (see the module docstring)."""

    def __init__(self, pretrained="embedded", merger: str | None = None, rules: str | None = None,
                 run_dir: str | None = None, merge: str | None = None, device: str | None = None,
                 gguf_file: str | None = None, compressor: str | None = None, ratio: str | float | None = None,
                 compressor_path: str | None = None,
                 **kwargs):
        unknown = sorted(set(kwargs) - _hflm_arguments())
        if unknown:
            raise ModelArgsError(f"unknown model_args {', '.join(unknown)}: the umim model takes pretrained, run_dir, "
                                 "merger, rules, merge, compressor, ratio, compressor_path, gguf_file and HFLM's "
                                 "arguments (device, dtype, batch_size, max_length, ...)")
        if merge is not None and merge not in MODES:
            raise ModelArgsError(f"merge={merge}: choose one of {', '.join(MODES)}")
        if isinstance(pretrained, str):
            pretrained, extra = resolve(LMSpec(pretrained, gguf_file=gguf_file))
            gguf_file = extra.get("gguf_file")
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        super().__init__(pretrained=pretrained, device=device, **kwargs)
        if self.backend != "causal":
            raise ValueError("the umim model needs a causal (decoder-only) LM")
        merger, rules = ModelArgs(run_dir=run_dir, merger=merger, rules=rules).merging_paths()
        if merge is None:  # UMIM merges by default; a compressor= replaces it
            merge = "prompt" if (merger and rules and compressor is None) else "none"
        if merge != "none" and not (merger and rules):
            raise ModelArgsError(f"merge={merge} needs merger= and rules= (or run_dir=)")
        tok = self.tokenizer
        loaded_merger, loaded_rules = load_merging(self.model, tok, merger, rules)
        self.merge = merge
        self.umim = MergedLM(self.model, tok, loaded_merger, loaded_rules)
        self.compressor, self.ratio = compressor, self._check_ratio(compressor, ratio, loaded_rules)
        self.compressor_options = {"path": compressor_path} if compressor_path else {}
        self._method = None
        self.umim_paths = {"merger": str(merger) if merger else None, "rules": str(rules) if rules else None}
        self._counts = {k: [0, 0] for k in KINDS}  # [original, compressed] positions fed
        self._kind = "loglikelihood"

    def _check_ratio(self, compressor, ratio, rules):
        if compressor is None:
            if ratio is not None:
                raise ModelArgsError("ratio= applies to compressor= only")
            return None
        if self.merge != "none":
            raise ModelArgsError("compressor= replaces UMIM merging: leave merge unset or set merge=none")
        from umim_eval.methods.registry import method_class

        try:
            cls = method_class(compressor)  # unknown names fail here, before any request
        except (KeyError, ValueError) as e:
            raise ModelArgsError(f"compressor={compressor}: {one_line(e)}") from e
        if cls.kind == "kv_policy":  # loglikelihood needs the argmax of every continuation token
            raise ModelArgsError(f"compressor={compressor} is a KV-cache policy; QA scoring takes prompt methods")
        ratio = "umim" if ratio is None and rules is not None else ratio
        if ratio is None or (ratio == "umim" and rules is None):
            raise ModelArgsError("compressor= needs ratio= (a TR in [0, 1), or umim with rules=/run_dir=)")
        if ratio != "umim":
            try:
                value = float(ratio)
            except ValueError:
                value = -1.0
            if not 0.0 <= value < 1.0:
                raise ModelArgsError(f"ratio={ratio}: give a token reduction in [0, 1) or umim")
            ratio = value
        return ratio

    # -- token reduction ---------------------------------------------------------------------------
    def _count(self, kind: str, original: int, compressed: int) -> None:
        c = self._counts[kind]
        c[0] += int(original)
        c[1] += int(compressed)

    @property
    def token_reduction(self) -> float:
        """``1 - compressed / original`` positions over every request so far (0.0 before any)."""
        orig = sum(c[0] for c in self._counts.values())
        return 1.0 - sum(c[1] for c in self._counts.values()) / orig if orig else 0.0

    @property
    def token_reduction_by_type(self) -> dict[str, float]:
        return {k: 1.0 - c[1] / c[0] for k, c in self._counts.items() if c[0]}

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update({
            "umim_merge": self.merge, "umim_compressor": self.compressor, "umim_ratio": self.ratio,
            **{f"umim_{k}": v for k, v in self.umim_paths.items()},
            "umim_token_reduction": self.token_reduction,
            "umim_token_reduction_by_type": self.token_reduction_by_type,
            "umim_token_counts": {k: {"original": c[0], "compressed": c[1]} for k, c in self._counts.items() if c[0]},
        })
        log.info("umim (merge=%s): token reduction %.4f %s", self.merge, self.token_reduction,
                 json.dumps(self.token_reduction_by_type))
        return info

    @contextlib.contextmanager
    def _as_kind(self, kind: str):
        old, self._kind = self._kind, kind
        try:
            yield
        finally:
            self._kind = old

    def _bs(self) -> int:
        bs = self.batch_size
        return int(bs) if str(bs).isdigit() and int(bs) > 0 else int(self.max_batch_size or 1)

    # -- loglikelihood -----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.compressor is not None:
            return self._compressed_loglikelihood_tokens(requests, disable_tqdm)
        if self.merge == "none":
            for _, ctx, cont in requests:  # the context as HFLM truncates it, unreduced
                n = max(min(len(ctx) + len(cont), self.max_length + 1) - len(cont), 0)
                self._count(self._kind, n, n)
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        return self._merged_loglikelihood_tokens(requests, disable_tqdm, override_bs)

    @torch.no_grad()
    def _merged_loglikelihood_tokens(self, requests, disable_tqdm: bool, override_bs: int | None):
        """Merged context, unmerged continuation; one forward per batch (right-padded, explicit
        positions over the compressed sequence)."""
        lm, rules, dev = self.model, self.umim.rules, self.device
        bs = override_bs or self._bs()
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        res: list = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running loglikelihood requests (umim)")
        for c0 in range(0, len(order), bs):
            idx = order[c0 : c0 + bs]
            ctxs, conts = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                assert len(ctx) > 0 and 0 < len(cont) <= self.max_length
                full = (ctx + cont)[-(self.max_length + 1):]  # HFLM's left truncation
                ctxs.append(full[: len(full) - len(cont)])
                conts.append(list(cont))
            B = len(idx)
            # segment the contexts only
            Lc = max(map(len, ctxs))
            padded = np.zeros((B, Lc), dtype=np.int64)
            for b, c in enumerate(ctxs):
                padded[b, : len(c)] = c
            c_starts, c_lens = rules.matcher.segment_batch(padded, np.array([len(c) for c in ctxs]))
            rows_start, rows_len, inps = [], [], []
            for b in range(B):
                keep = c_lens[b] > 0
                st = list(c_starts[b][keep]) + [len(ctxs[b]) + j for j in range(len(conts[b]) - 1)]
                ln = list(c_lens[b][keep]) + [1] * (len(conts[b]) - 1)
                rows_start.append(st)
                rows_len.append(ln)
                inps.append(ctxs[b] + conts[b][:-1])
            S, L = max(map(len, rows_start)), max(map(len, inps))
            ids = torch.zeros(B, L, dtype=torch.long)
            seg_start = torch.zeros(B, S, dtype=torch.long)
            seg_len = torch.zeros(B, S, dtype=torch.long)
            for b in range(B):
                ids[b, : len(inps[b])] = torch.tensor(inps[b])
                seg_start[b, : len(rows_start[b])] = torch.tensor(rows_start[b])
                seg_len[b, : len(rows_len[b])] = torch.tensor(rows_len[b])
            lengths = torch.tensor([len(x) for x in inps])
            mb = build_merged_batch(ids.to(dev), seg_start, seg_len, lm.get_input_embeddings(), self.umim.merger,
                                    lengths.to(dev))
            out = lm(inputs_embeds=mb.inputs_embeds, attention_mask=mb.attention_mask,
                     position_ids=torch.arange(S, device=dev).expand(B, S))
            logp = F.log_softmax(out.logits.float(), dim=-1)
            for b, i in enumerate(idx):
                n_ctx_seg = len(rows_start[b]) - (len(conts[b]) - 1)
                first = n_ctx_seg - 1
                lp = logp[b, first : first + len(conts[b])]  # [cont, V]
                cont_t = torch.tensor(conts[b], device=dev)
                greedy = bool((lp.argmax(-1) == cont_t).all())
                answer = (float(lp.gather(1, cont_t[:, None]).sum()), greedy)
                res[i] = answer
                self._count(self._kind, len(inps[b]) - (len(conts[b]) - 1), n_ctx_seg)  # context positions
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                pbar.update(1)
        pbar.close()
        return res

    @torch.no_grad()
    def _compressed_loglikelihood_tokens(self, requests, disable_tqdm: bool):
        """Context reduced by ``self.compressor`` (per request), continuation unmerged."""
        from umim_eval.methods.registry import make_method

        res = []
        for key, ctx, cont in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                   desc=f"Running loglikelihood requests ({self.compressor})"):
            full = (ctx + cont)[-(self.max_length + 1):]  # HFLM's left truncation
            ctx = full[: len(full) - len(cont)]
            if self._method is None:  # built once (a method may load a model), re-aimed per request
                self._method = make_method(self.compressor, 0.0, merged_lm=self.umim, **self.compressor_options)
            self._method.aim(self.umim.token_reduction(ctx) if self.ratio == "umim" else self.ratio)
            s = self._method.score_continuation(self.umim, ctx, cont)  # the options of a question share ctx
            answer = (-float(s.nll.sum()), s.greedy)
            res.append(answer)
            self._count(self._kind, len(ctx), s.n_fed)  # context positions, as for UMIM's merged contexts
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return res

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        with self._as_kind("loglikelihood"):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    # -- loglikelihood_rolling ---------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if self.compressor is not None:
            raise ValueError("compressor= applies to loglikelihood (QA) tasks; perplexity tasks use merge=")
        if self.merge == "none":
            with self._as_kind("loglikelihood_rolling"):
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        return self._merged_rolling(requests, disable_tqdm)

    @torch.no_grad()
    def _merged_rolling(self, requests, disable_tqdm: bool):
        """Two-stage perplexity over lm-eval's disjoint rolling windows. A window is fed whole
        (context token + predicted tokens, at most ``max_length``), so it is one token shorter than
        HFLM's (which feeds ``max_length + 1`` tokens minus the last)."""
        windows = []  # (request index, context, predicted)
        for r, req in enumerate(requests):
            (string,) = req.args
            for ctx, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1, context_len=1)):
                windows.append((r, ctx, pred))
        totals = [0.0] * len(requests)
        bs = self._bs()
        for c0 in tqdm(range(0, len(windows), bs), disable=disable_tqdm or self.rank != 0,
                       desc="Running loglikelihood_rolling requests (umim)"):
            chunk = windows[c0 : c0 + bs]
            rows = [ctx + pred for _, ctx, pred in chunk]
            lengths = torch.tensor([len(x) for x in rows])
            ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
            for b, x in enumerate(rows):
                ids[b, : len(x)] = torch.tensor(x)
            r = two_stage_nll(self.model, self.umim.merger, self.umim.rules, ids, lengths)
            for b, (ri, ctx, pred) in enumerate(chunk):
                nll = r.token_nll[b, len(ctx) : len(ctx) + len(pred)]
                assert not torch.isnan(nll).any()
                totals[ri] -= float(nll.sum())
            self._count("loglikelihood_rolling", int(r.n_original.sum()), int(r.n_compressed.sum()))
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generate_until ----------------------------------------------------------------------------
    def _sampling(self, gen_kwargs: dict) -> tuple[SamplingConfig, list[str]]:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        if eos and eos not in until:
            until.append(eos)
        max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
        do_sample = _as_bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
        if temperature == 0.0:
            do_sample, temperature = False, 1.0
        cfg = SamplingConfig(max_new_tokens=max_gen, do_sample=do_sample, temperature=temperature,
                             top_k=int(kw.pop("top_k", 0) or 0), top_p=float(kw.pop("top_p", 1.0) or 1.0),
                             stop_strings=[u for u in until if u], eos_token_id=self.eot_token_id)
        if kw:
            log.debug("umim generate_until ignores generation kwargs %s", sorted(kw))
        return cfg, until

    def generate_until(self, requests, disable_tqdm: bool = False):
        if self.compressor is not None:
            raise ValueError("compressor= applies to loglikelihood (QA) tasks; use umim-eval summarize/math "
                             "to generate with baselines")
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        res: list = [None] * len(requests)
        bs = self._bs()
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                    desc="Running generate_until requests (umim)")
        for idxs in groups.values():
            cfg, until = self._sampling(requests[idxs[0]].args[1])
            left = max(self.max_length - cfg.max_new_tokens, 1)
            for c0 in range(0, len(idxs), bs):
                chunk = idxs[c0 : c0 + bs]
                prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=left) or [self.prefix_token_id]
                           for i in chunk]
                outs = self.umim.generate(prompts, self.merge, cfg)
                for i, o in zip(chunk, outs):
                    text = o.text
                    for u in until:
                        if u:
                            text = text.split(u)[0]
                    res[i] = text
                    self._count("generate_until", o.kv_len_unmerged, o.kv_len_final)
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    pbar.update(1)
        pbar.close()
        return res
