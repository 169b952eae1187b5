"""Context-reduction methods at matched token reduction (paper Sec. 4.4, App. F.2), each a small
class with one knob, ``ratio`` (the target token reduction in the target LM's tokens):

* prompt compressors (:class:`SelectContext`, :class:`LLMLingua1`, :class:`LLMLingua2`) drop
  tokens and return a :class:`CompressedPrompt`;
* prompt mergers (:class:`~.umim_merge.UMIMMerge`, :class:`~.umim_budget.UMIMBudget`,
  :class:`~.quickmerge.QuickMerge`, :class:`~.ktoken_merge.KTokenMerge`) merge contiguous groups
  into embeddings and return a :class:`MergedPrompt`;
* KV policies (:class:`StreamingLLM`, :class:`H2O`) evict cache entries; they are scored with
  :func:`policy_nll` and decode with :func:`~.policy_generate.policy_generate`.

Methods whose native knob is not in tokens are matched to a TR with :func:`match_tr`. Runners name
methods through :mod:`umim_eval.methods.registry`; :data:`BASELINES` holds the baselines that are built from
``ratio`` alone.
"""

from umim_eval.methods.base import (
           CompressedPrompt,
           KVPolicy,
           MergedPrompt,
           PromptCompressor,
           PromptMerger,
           Scored,
           achieved_tr,
)
from umim_eval.methods.h2o import H2O
from umim_eval.methods.llmlingua1 import LLMLingua1
from umim_eval.methods.llmlingua2 import LLMLingua2
from umim_eval.methods.match_tr import match_tr
from umim_eval.methods.registry import (
           LABELS,
           METHODS,
           USES_MERGED_LM,
           check_methods,
           is_kv_policy,
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
           "CompressedPrompt",
           "KVPolicy",
           "LLMLingua1",
           "LLMLingua2",
           "MergedPrompt",
           "PolicyNLL",
           "PromptCompressor",
           "PromptMerger",
           "Scored",
           "SelectContext",
           "StreamingLLM",
           "achieved_tr",
           "continuation_nll",
           "match_tr",
           "policy_nll",
           "self_information",
           "visible_mask",
           "LABELS", "METHODS", "USES_MERGED_LM", "check_methods", "is_kv_policy", "make_method", "method_class",
]
