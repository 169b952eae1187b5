"""Loading a saved trainable module folder (``config.json`` + ``*.safetensors``): the merger and the
K-token encoder share the checks — format tag, known settings, hidden size, tokenizer — and the
clear errors on missing or corrupted files."""

from __future__ import annotations

import json
from pathlib import Path

from .fingerprint import check_fingerprint


def load_module_folder(build, config_cls, path, fmt: str, what: str, weights_name: str,
                       hidden_size: int | None = None, tokenizer_fp: dict | None = None,
                       config_name: str = "config.json"):
    """``build(config)`` with the weights of ``path`` loaded.

    Parameters
    ----------
    build : config -> module (usually the module class).
    config_cls : the settings dataclass stored in ``config.json`` (plus ``format`` and ``version``).
    fmt : the ``format`` tag the folder must carry; ``what`` names the module in errors.
    hidden_size, tokenizer_fp : when given, refuse a module trained for another LM width or vocabulary.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / config_name, path / weights_name
    if not cfg_file.is_file() or not w_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved {what} (needs {config_name} and {weights_name})")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is corrupted: {e}") from e
    if not isinstance(raw, dict) or raw.pop("format", None) != fmt:
        raise ValueError(f"{cfg_file} is not a {what} config")
    raw.pop("version", None)
    try:
        config = config_cls(**raw)
    except TypeError as e:
        raise ValueError(f"{cfg_file} holds unknown or missing {what} settings: {e}") from e
    if hidden_size is not None and hidden_size != config.hidden_size:
        raise ValueError(f"{what} in {path} was trained for hidden size {config.hidden_size} "
                         f"({config.lm_name!r}), the LM has {hidden_size}")
    if tokenizer_fp is not None:
        check_fingerprint(config.tokenizer, tokenizer_fp, f"{what} in {path}")
    module = build(config)
    try:
        module.load_state_dict(load_file(str(w_file)))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{w_file} is corrupted or does not match its config: {e}") from e
    return module
