"""Step 4: decoding with merging. ``loading`` (:class:`ModelArgs`: the one way to load a run) ->
``generation`` (:class:`MergedLM`: prompt and online merging, ``generate`` and ``stream``) over
``kv_cache`` (:class:`MergingCache` over the ragged per-row :class:`RaggedKV`: a rollback frees a
row's slots), ``decoding`` (token picking, stop checks; shared with the KV-policy decoder) and
``trace`` (the optional recorder)."""
