"""One runner per paper table; each module exposes ``Config``, ``run`` and ``table`` (see
:mod:`umim_eval.cli`)."""
