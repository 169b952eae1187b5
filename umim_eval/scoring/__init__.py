"""How an LM is scored after a method ran: ``prompt_inputs`` (what the LM is fed), ``token_nll``,
``prompt_nll`` / ``policy_nll`` (continuation NLL after a reduced prompt or under a KV policy),
``perplexity`` (two-stage PPL), ``policy_generate`` and ``matched_generation`` (decoding at matched
TR), ``generation_metrics`` (Rep/Dist, ROUGE, BERTScore, chrF, MAUVE)."""
