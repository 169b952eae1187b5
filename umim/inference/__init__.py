"""Step 4: decoding with merging. ``generation`` (:class:`MergedLM`: prompt and online merging) over
``kv_cache`` (rollback and compaction of the cache)."""
