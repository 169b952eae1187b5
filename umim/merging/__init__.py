"""Step 2: from rules to merged sequences. ``matcher`` (longest-match segmentation, vectorised) ->
``merger`` (the span encoder: static embeddings of a span -> one surrogate) -> ``batch`` (merged
student batches and the teacher/student position alignment)."""
