"""The one command-line mechanism: settings dataclasses parsed by jsonargparse, the library that
LightningCLI (``umim fit``) is built on. ``umim mine``, ``umim generate`` and every ``umim-eval``
runner read their dataclass from ``--config FILE.yaml`` plus ``--field value`` overrides (unknown
keys are errors; field docstrings are the ``--help``).

Spellings of the earlier argparse commands (``mine``, ``generate``) keep working there: ``--max-new-tokens`` is
``--max_new_tokens``, a bool flag alone (``--do-sample``) means true, a list option takes its values
after it (``--filters intra inter``) or repeated (``--stop a --stop b``).
"""

from __future__ import annotations

import dataclasses
import json
import types
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
    """Field name -> "bool", "strings" (a list of str), "list" or "value" (how a bare option is read)."""
    hints = typing.get_type_hints(cls)
    kinds = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if typing.get_origin(t) in (typing.Union, types.UnionType):  # X | None
            t = next(a for a in typing.get_args(t) if a is not type(None))
        if t is bool:
            kinds[f.name] = "bool"
        elif t is list or typing.get_origin(t) is list:
            kinds[f.name] = "strings" if typing.get_args(t) == (str,) else "list"
        else:
            kinds[f.name] = "value"
    return kinds


BOOLS = {"true", "false", "yes", "no", "1", "0", "on", "off"}


def _as_list(values: list[str], strings: bool) -> list:
    """The items of a list option's values: one value that is a list (JSON for a list of strings, so
    ``--stop "[/INST]"`` stays a string; YAML otherwise, as jsonargparse reads ``[intra, inter]``) is
    its items, anything else the values themselves."""
    if len(values) == 1:
        import yaml

        try:
            parsed = json.loads(values[0]) if strings else yaml.safe_load(values[0])
        except (ValueError, yaml.YAMLError):
            parsed = None
        if isinstance(parsed, list):
            return parsed
    return list(values)


def normalize_argv(cls, argv: list[str], aliases: dict[str, str] | None = None) -> list[str]:
    """``argv`` in jsonargparse's spelling (see the module docstring); ``aliases`` maps old option
    names to field names (e.g. ``{"model": "lm"}``). Every occurrence of a list option adds its items,
    in order."""
    kinds, aliases = _field_kinds(cls), aliases or {}
    out, lists, i = [], {}, 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--") or a == "--":
            out.append(a)
            i += 1
            continue
        name, eq, value = a[2:].partition("=")
        name = aliases.get(name.replace("-", "_"), name.replace("-", "_"))
        kind = kinds.get(name)
        j = i + 1
        if eq:
            values = [value]
        else:
            values = []
            while kind is not None and j < len(argv) and not (argv[j].startswith("--") and len(argv[j]) > 2):
                if kind == "bool" and argv[j].lower() not in BOOLS:
                    break  # a bare flag: the next word is not its value
                values.append(argv[j])
                j += 1
                if kind not in ("list", "strings"):
                    break
        if kind in ("list", "strings"):
            if name not in lists:
                out.append((name,))  # placeholder: the gathered list goes where the option first appeared
            lists.setdefault(name, []).extend(_as_list(values, kind == "strings"))
        elif kind == "bool" and not values:
            out += [f"--{name}", "true"]
        elif kind is None:  # --config, --help, unknown options: as given, for jsonargparse to report
            out.append(a)
        else:  # --name=value, so a value starting with "-" (--prompt -x, --top_k -1) is not read as an option
            out += [f"--{name}={values[0]}"] if values else [f"--{name}"]
        i = j
    return [x for a in out for x in ([f"--{a[0]}", json.dumps(lists[a[0]])] if isinstance(a, tuple) else [a])]


def settings_parser(cls, prog: str, description: str | None = None):
    """The jsonargparse parser of ``cls``: ``--config FILE`` plus one option per field."""
    import jsonargparse

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings as --help
    p = jsonargparse.ArgumentParser(prog=prog, description=(description or cls.__doc__ or "").strip())
    p.add_argument("--config", action=jsonargparse.ActionConfigFile, help="YAML settings file")
    p.add_class_arguments(cls)
    return p


def parse_settings(cls, argv: list[str], prog: str, aliases: dict[str, str] | None = None, legacy: bool = False):
    """An instance of settings dataclass ``cls`` from ``argv`` (``--config FILE`` and overrides);
    ``legacy``: also read the spellings of the earlier argparse command (:func:`normalize_argv`)."""
    _check_config_files(argv)
    ns = settings_parser(cls, prog).parse_args(normalize_argv(cls, argv, aliases) if legacy else argv).as_dict()
    ns.pop("config", None)
    return cls(**ns)
