"""Step 3: distillation. ``datamodule`` (blocks, resumable order, segmented by the merge rules or left
for the model's own segmenter) -> ``frozen_lm_module`` (frozen LM + a span encoder) + ``distillation``
(teacher on tokens, student on merged embeddings; ``distill_loss``, ``alignment_metrics``; one module for
any span encoder: UMIM's merger, the K-token encoder) under ``strategy`` (DDP or FSDP2 per decoder
layer) with ``checkpoint`` (exact resume); at the end ``export`` writes merger, rules and ``report``."""
