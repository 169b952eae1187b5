"""umim_eval: the evaluation harness for UMIM, beside the library.

Read in data-flow order:

* methods — :mod:`umim_eval.methods.registry` (registry by name), :mod:`umim_eval.methods` (one
  ``ratio`` knob each: prompt compressors, prompt mergers, KV-cache policies),
  :mod:`umim_eval.scoring.prompt_inputs` (what the LM is fed after any method),
  :mod:`umim_eval.scoring.matched_generation` (every method generating at matched TR);
* scoring — :mod:`umim_eval.scoring.token_nll`, :mod:`umim_eval.scoring.perplexity` (two-stage PPL),
  :mod:`umim_eval.scoring.generation_metrics` (Rep/Dist, ROUGE, BERTScore, chrF, MAUVE);
* lm-eval — :mod:`umim_eval.harness.lm_eval_model` (model ``umim``), :mod:`umim_eval.harness.lm_eval_hook`,
  :mod:`umim_eval.harness.local_tasks` (offline tasks and data sets);
* runners, one per paper table — :mod:`~umim_eval.tasks.ppl` (Table 2),
  :mod:`~umim_eval.tasks.qa` (Table 4), :mod:`~umim_eval.tasks.summarize` (Table 5),
  :mod:`~umim_eval.tasks.math_reasoning` (Table 6), :mod:`~umim_eval.tasks.gen_quality` (Tables 10, 11),
  :mod:`~umim_eval.tasks.compare` (all methods at matched TR);
* output — :mod:`umim_eval.results` (JSON + markdown), :mod:`umim_eval.cli` (``umim-eval``).
"""

import umim  # noqa: F401  (installs the old flat import paths, e.g. umim_eval.baselines, umim_eval.compare)
