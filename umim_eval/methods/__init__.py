"""Context-reduction methods at matched token reduction (paper Sec. 4.4, App. F.2): one class per
method under the contract of :mod:`umim_eval.methods.base` (name, label, kind, one knob ``ratio``;
``from_run``, ``score_continuation``, ``generate``), named through :mod:`umim_eval.methods.registry`.

* prompt compressors (:class:`SelectContext`, :class:`LLMLingua1`, :class:`LLMLingua2`, and the base
  LM as :class:`~.no_reduction.NoReduction`) drop tokens and return a :class:`CompressedPrompt`;
* prompt mergers (:class:`~.umim_merge.UMIMMerge`, :class:`~.umim_budget.UMIMBudget`,
  :class:`~.quickmerge.QuickMerge`, :class:`~.ktoken_merge.KTokenMerge` with the frozen LM and
  :class:`~.ktoken_merge.KTokenLoRAMerge` with LoRA adapters on the LM) merge contiguous groups
  into embeddings and return a :class:`MergedPrompt`;
* KV policies (:class:`StreamingLLM`, :class:`H2O`) evict cache entries while the LM reads.

Methods whose native knob is not in tokens are matched to a TR with :func:`match_tr`;
:data:`BASELINES` holds the baselines that are built from ``ratio`` alone.
"""

from umim_eval.methods.base import (
           CompressedPrompt,
           ContinuationScore,
           Generated,
           KVPolicy,
           MergedPrompt,
           Method,
           PromptCompressor,
           PromptMerger,
           PromptMethod,
           achieved_tr,
)
from umim_eval.methods.h2o import H2O
from umim_eval.methods.llmlingua1 import LLMLingua1
from umim_eval.methods.llmlingua2 import LLMLingua2
from umim_eval.methods.match_tr import match_tr
from umim_eval.methods.registry import (
           METHODS,
           check_methods,
           label,
           make_method,
           method_class,
)
from umim_eval.methods.select_context import SelectContext, self_information
from umim_eval.methods.streaming_llm import StreamingLLM
from umim_eval.scoring.policy_nll import PolicyNLL, policy_nll, visible_mask
from umim_eval.scoring.prompt_nll import continuation_nll

BASELINES = {cls.name: cls for cls in (SelectContext, LLMLingua1, LLMLingua2, StreamingLLM, H2O)}
"""name -> class; every class is built as ``BASELINES[name](ratio=r)``."""

__all__ = [
    "BASELINES",
    "H2O",
    "LLMLingua1",
    "LLMLingua2",
    "METHODS",
    "achieved_tr",
    "check_methods",
    "CompressedPrompt",
    "continuation_nll",
    "ContinuationScore",
    "Generated",
    "KVPolicy",
    "label",
    "make_method",
    "match_tr",
    "MergedPrompt",
    "Method",
    "method_class",
    "policy_nll",
    "PolicyNLL",
    "PromptCompressor",
    "PromptMerger",
    "PromptMethod",
    "SelectContext",
    "self_information",
    "StreamingLLM",
    "visible_mask",
]
