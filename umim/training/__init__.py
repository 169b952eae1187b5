"""Step 3: distillation. ``datamodule`` (blocks, resumable order) -> ``frozen_lm_module`` +
``distillation`` (teacher on tokens, student on merged embeddings; ``distill_loss``,
``alignment_metrics``) under ``strategy`` (DDP or FSDP2 per decoder layer) with ``checkpoint``
(exact resume); at the end ``export`` writes merger, rules and ``report``."""
