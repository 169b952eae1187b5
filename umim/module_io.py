"""Loading a saved trainable module folder (``config.json`` + ``*.safetensors``): the merger and the
K-token encoder share the checks — format tag, known settings, hidden size, tokenizer — and the
clear errors on missing or corrupted files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

from umim.errors import UserError, one_line
from umim.fingerprint import check_fingerprint

VERSION = 1


class ModuleFileError(UserError):
    """A saved merger / encoder folder is damaged or made for another LM."""


class ModuleFileMissing(ModuleFileError, FileNotFoundError):
    """A saved merger / encoder folder (or one of its files) does not exist."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_settings(config, cfg_file: Path, what: str) -> None:
    """Every int field is an int (not "576") and sizes are positive, before anything is built from them."""
    for f in fields(config):
        v = getattr(config, f.name)
        if f.type in ("int", int) and (type(v) is not int or v <= 0):
            raise ModuleFileError(f"{cfg_file}: {f.name} must be a positive integer, got {v!r}")
        if f.type in ("bool", bool) and type(v) is not bool:
            raise ModuleFileError(f"{cfg_file}: {f.name} must be true or false, got {v!r}")


def load_module_folder(build, config_cls, path, fmt: str, what: str, weights_name: str,
                       hidden_size: int | None = None, tokenizer_fp: dict | None = None,
                       config_name: str = "config.json"):
    """``build(config)`` with the weights of ``path`` loaded.

    Parameters
    ----------
    build : config -> module (usually the module class).
    config_cls : the settings dataclass stored in ``config.json`` (plus ``format``, ``version`` and
        ``weights_sha256``, the hash of the weights file written with it).
    fmt : the ``format`` tag the folder must carry; ``what`` names the module in errors.
    hidden_size, tokenizer_fp : when given, refuse a module trained for another LM width or vocabulary
        (and one that records no vocabulary).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / config_name, path / weights_name
    if not cfg_file.is_file() or not w_file.is_file():
        raise ModuleFileMissing(f"{path} is not a saved {what} (needs {config_name} and {weights_name})")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModuleFileError(f"{cfg_file} is corrupted: {one_line(e)}") from e
    if not isinstance(raw, dict) or raw.pop("format", None) != fmt:
        raise ModuleFileError(f"{cfg_file} is not a {what} config")
    version = raw.pop("version", None)
    if type(version) is not int or version != VERSION:
        raise ModuleFileError(f"{cfg_file} has format version {version!r}, this UMIM reads {VERSION}")
    digest = raw.pop("weights_sha256", None)
    try:
        config = config_cls(**raw)
    except TypeError as e:
        raise ModuleFileError(f"{cfg_file} holds unknown or missing {what} settings: {e}") from e
    _check_settings(config, cfg_file, what)
    if hidden_size is not None and hidden_size != config.hidden_size:
        raise ModuleFileError(f"{what} in {path} was trained for hidden size {config.hidden_size} "
                              f"({config.lm_name!r}), the LM has {hidden_size}")
    if tokenizer_fp is not None:
        if not isinstance(config.tokenizer, dict):
            raise ModuleFileError(f"{cfg_file} records no tokenizer fingerprint, so it cannot be checked against "
                                  "this LM's vocabulary: re-export it with umim fit")
        check_fingerprint(config.tokenizer, tokenizer_fp, f"{what} in {path}")
    if digest is not None and file_sha256(w_file) != digest:
        raise ModuleFileError(f"{w_file} is corrupted: its hash differs from the one recorded in {config_name} "
                              "(changed or damaged after saving)")
    try:
        module = build(config)
        module.load_state_dict(load_file(str(w_file)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ModuleFileError(f"{w_file} is corrupted or does not match its config: {one_line(e)}") from e
    bad = [k for k, v in module.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise ModuleFileError(f"{w_file}: non-finite weights in {bad[0]} (NaN or inf): retrain or re-export")
    return module


def config_with_digest(config: dict, fmt: str, weights_file: Path) -> str:
    """The ``config.json`` text of a saved module: format, version, settings and the weights' hash."""
    return json.dumps({"format": fmt, "version": VERSION, **config, "weights_sha256": file_sha256(weights_file)},
                      indent=2)
