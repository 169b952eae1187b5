"""lm-evaluation-harness: the ``umim`` model, its start-up hook, and offline tasks."""
