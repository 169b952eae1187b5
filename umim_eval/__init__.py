"""umim_eval: the evaluation harness for UMIM, beside the library.

Read in data-flow order:

* methods — :mod:`umim_eval.methods` (registry by name), :mod:`umim_eval.baselines` (one
  ``ratio`` knob each: prompt compressors, prompt mergers, KV-cache policies),
  :mod:`umim_eval.compressed_inputs` (what the LM is fed after any method),
  :mod:`umim_eval.matched_generation` (every method generating at matched TR);
* scoring — :mod:`umim_eval.token_nll`, :mod:`umim_eval.perplexity` (two-stage PPL),
  :mod:`umim_eval.generation_metrics` (Rep/Dist, ROUGE, BERTScore, chrF, MAUVE);
* lm-eval — :mod:`umim_eval.lm_eval_model` (model ``umim``), :mod:`umim_eval.lm_eval_hook`,
  :mod:`umim_eval.local_tasks` (offline tasks and data sets);
* runners, one per paper table — :mod:`~umim_eval.language_modeling` (Table 2),
  :mod:`~umim_eval.qa` (Table 4), :mod:`~umim_eval.summarization` (Table 5),
  :mod:`~umim_eval.math_reasoning` (Table 6), :mod:`~umim_eval.gen_quality` (Tables 10, 11),
  :mod:`~umim_eval.compare` (all methods at matched TR);
* output — :mod:`umim_eval.results` (JSON + markdown), :mod:`umim_eval.cli` (``umim-eval``).
"""
