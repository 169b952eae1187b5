"""Context-reduction baselines at matched token reduction (paper Sec. 4.4, App. F.2).

Every baseline is a small class with one knob, ``ratio`` (the target token reduction in the target
LM's tokens): prompt compressors (:class:`SelectContext`, :class:`LLMLingua1`, :class:`LLMLingua2`) return a :class:`CompressedPrompt`; KV
policies (:class:`StreamingLLM`, :class:`H2O`) are scored with :func:`policy_nll`. Methods whose
native knob is not in tokens are matched to a TR with :func:`match_tr`.
"""

from .base import CompressedPrompt, KVPolicy, PromptCompressor, Scored, achieved_tr
from .h2o import H2O
from .llmlingua1 import LLMLingua1
from .llmlingua2 import LLMLingua2
from .match_tr import match_tr
from .policy_nll import PolicyNLL, policy_nll, visible_mask
from .prompt_nll import continuation_nll
from .select_context import SelectContext, self_information
from .streaming_llm import StreamingLLM

BASELINES = {cls.name: cls for cls in (SelectContext, LLMLingua1, LLMLingua2, StreamingLLM, H2O)}
"""name -> class; every class is built as ``BASELINES[name](ratio=r)``."""

__all__ = [
           "BASELINES",
           "H2O",
           "CompressedPrompt",
           "KVPolicy",
           "LLMLingua1",
           "LLMLingua2",
           "PolicyNLL",
           "PromptCompressor",
           "Scored",
           "SelectContext",
           "StreamingLLM",
           "achieved_tr",
           "continuation_nll",
           "match_tr",
           "policy_nll",
           "self_information",
           "visible_mask",
]
