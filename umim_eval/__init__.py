"""umim_eval: evaluation harness for UMIM (lm-eval model, perplexity, downstream tasks, baselines).

Only the alignment report of :mod:`umim.report` exists so far; the harness is tracked in its own issue.
"""
