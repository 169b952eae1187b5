"""Step 2: from rules to merged sequences. ``matcher`` (longest-match segmentation, vectorised) ->
``span_encoder`` (the :class:`SpanEncoder` and :class:`Segmenter` interfaces) -> ``merger`` (UMIM's
span encoder: static embeddings of a span -> one surrogate) -> ``batch`` (merged student batches and
the teacher/student position alignment)."""
