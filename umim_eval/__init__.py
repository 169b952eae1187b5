"""umim_eval: evaluation harness for UMIM, beside the library.

Built so far: the lm-evaluation-harness model ``umim`` (:mod:`umim_eval.lm_eval_model`, registered by
:mod:`umim_eval.lm_eval_hook`), two-stage perplexity (:mod:`umim_eval.perplexity`), baselines behind
one ratio knob (:mod:`umim_eval.baselines`) and the ``umim-eval`` command (:mod:`umim_eval.cli`).
Generation quality, CNN/DM, AIME/AMC and the comparison tables are tracked in the issues.
"""
