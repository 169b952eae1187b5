"""The one command-line mechanism: settings dataclasses parsed by jsonargparse, the library that
LightningCLI (``umim fit``) is built on. ``umim mine``, ``umim generate`` and every ``umim-eval``
runner read their dataclass from ``--config FILE.yaml`` plus ``--field value`` overrides (unknown
keys are errors; field docstrings are the ``--help``).

Spellings of the earlier argparse commands keep working: ``--max-new-tokens`` is
``--max_new_tokens``, a bool flag alone (``--do-sample``) means true, a list option takes its values
after it (``--filters intra inter``) or repeated (``--stop a --stop b``).
"""

from __future__ import annotations

import dataclasses
import typing

from umim.errors import UserError


def _check_config_files(argv: list[str]) -> None:
    """Name a missing or unreadable ``--config`` file (jsonargparse's message does not name it)."""
    import yaml

    for i, a in enumerate(argv):
        path = a.partition("=")[2] if a.startswith("--config=") else (argv[i + 1] if a == "--config" and
                                                                       i + 1 < len(argv) else None)
        if path is None:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                yaml.safe_load(f)
        except OSError as e:
            raise UserError(f"--config {path}: {e.strerror or e}") from e
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"--config {path} is not valid YAML: {' '.join(str(e).split())[:200]}") from e


def _field_kinds(cls) -> dict[str, str]:
    """Field name -> "bool", "list" or "value" (how a bare command-line option is read)."""
    hints = typing.get_type_hints(cls)
    kinds = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        base = typing.get_origin(args[0]) if args and typing.get_origin(t) is typing.Union else typing.get_origin(t)
        kinds[f.name] = "bool" if t is bool or args == [bool] else "list" if base is list else "value"
    return kinds


def normalize_argv(cls, argv: list[str], aliases: dict[str, str] | None = None) -> list[str]:
    """``argv`` in jsonargparse's spelling (see the module docstring); ``aliases`` maps old option
    names to field names (e.g. ``{"model": "lm"}``)."""
    kinds, aliases = _field_kinds(cls), aliases or {}
    out, lists, i = [], {}, 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--") or a == "--":
            out.append(a)
            i += 1
            continue
        name, eq, value = a[2:].partition("=")
        name = name.replace("-", "_")
        name = aliases.get(name, name)
        kind = kinds.get(name)
        if eq or kind is None:  # --x=v, --config, --help, unknown options: jsonargparse reports them
            out.append(f"--{name}{eq}{value}")
            i += 1
            continue
        j = i + 1
        values = []
        while j < len(argv) and not (argv[j].startswith("--") and len(argv[j]) > 2):
            values.append(argv[j])
            j += 1
            if kind != "list":
                break
        if kind == "bool" and not values:
            values = ["true"]
        if kind == "list" and not (len(values) == 1 and values[0].lstrip().startswith("[")):
            lists.setdefault(name, []).extend(values)  # argparse's nargs and append, gathered
            i = j
            continue
        out += [f"--{name}", *values]
        i = j
    for name, values in lists.items():
        import json

        out += [f"--{name}", json.dumps(values)]
    return out


def settings_parser(cls, prog: str, description: str | None = None):
    """The jsonargparse parser of ``cls``: ``--config FILE`` plus one option per field."""
    import jsonargparse

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings as --help
    p = jsonargparse.ArgumentParser(prog=prog, description=(description or cls.__doc__ or "").strip())
    p.add_argument("--config", action=jsonargparse.ActionConfigFile, help="YAML settings file")
    p.add_class_arguments(cls)
    return p


def parse_settings(cls, argv: list[str], prog: str, aliases: dict[str, str] | None = None):
    """An instance of settings dataclass ``cls`` from ``argv`` (``--config FILE`` and overrides)."""
    _check_config_files(argv)
    ns = settings_parser(cls, prog).parse_args(normalize_argv(cls, argv, aliases)).as_dict()
    ns.pop("config", None)
    return cls(**ns)
