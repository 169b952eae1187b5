"""umim_eval: the evaluation harness for UMIM, beside the library. Folders in data-flow order:

* ``methods`` — the method contract (:mod:`umim_eval.methods.base`: name, label, kind, the knob
  ``ratio``; ``from_run``, ``score_continuation``, ``generate``), one class per method, and the
  registry by name (:mod:`umim_eval.methods.registry`);
* ``scoring`` — what the LM is fed after a method (:mod:`~umim_eval.scoring.prompt_inputs`), token
  NLL, KV-policy scoring and decoding, two-stage perplexity, generation at matched TR, and the
  generation metrics (Rep/Dist, ROUGE, BERTScore, chrF, MAUVE);
* ``tasks`` — one runner per paper table, each exposing ``Config`` (a
  :class:`~umim_eval.tasks.config.TaskConfig`), ``run``, ``table`` and ``NAME``;
* ``harness`` — lm-evaluation-harness: the model ``umim``, its start-up hook, offline tasks;
* :mod:`umim_eval.results` (JSON + markdown, journal) and :mod:`umim_eval.cli` (``umim-eval``, the
  one place results are written).
"""

import umim  # noqa: F401  (installs the old flat import paths, e.g. umim_eval.baselines, umim_eval.compare)
