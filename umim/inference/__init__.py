"""Step 4: decoding with merging. ``loading`` (:class:`ModelArgs`: the one way to load a run) ->
``generation`` (:class:`MergedLM`: prompt and online merging, ``generate`` and ``stream``) over
``kv_cache`` (:class:`MergingCache`: rollback and compaction), ``decoding`` (token picking, stop
checks; shared with the KV-policy decoder) and ``trace`` (the optional recorder)."""
