"""Writing results: one JSON file (everything, machine-readable) and one markdown table (shaped like
the paper's table) per run, written atomically so an interrupted run never leaves half a file and
never overwrites an earlier result with a broken one; and a :class:`Journal` of the pieces computed
so far, so an interrupted or failing run keeps them and a rerun resumes."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from umim.safe_io import check_writable_dir, write_text_atomic


def fmt(x, digits: int = 2) -> str:
    """A table cell: floats with ``digits`` decimals, ``None``/NaN as an en dash."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def pct(x, digits: int = 2) -> str:
    """A fraction in [0, 1] shown as a percentage cell."""
    return "–" if x is None else fmt(100.0 * float(x), digits)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; cells are formatted with :func:`fmt`."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError("every row needs one cell per header")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: str | Path, name: str, table: str | None = None) -> dict[str, Path]:
    """Write ``OUT/NAME.json`` (and ``OUT/NAME.md`` when a table is given); returns the paths."""
    out = Path(out_dir)
    check_writable_dir(out)
    paths = {"json": out / f"{name}.json"}
    write_text_atomic(paths["json"], json.dumps(result, indent=2, default=_jsonable) + "\n")
    if table is not None:
        paths["md"] = out / f"{name}.md"
        write_text_atomic(paths["md"], table)
    return paths


class Journal:
    """The pieces of a run (one example, one method, one dataset) appended as they are computed to
    ``OUT/.NAME.journal.jsonl``; a rerun with the same settings takes them from there instead of
    computing them again, a rerun with other settings starts afresh. Removed once the results are
    written. Values must be JSON-able."""

    def __init__(self, out_dir: str | Path, name: str, settings: dict):
        self.path = Path(out_dir) / f".{name}.journal.jsonl"
        stamp = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        self.records: dict[str, object] = {}
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        if lines and _loads(lines[0]) == {"settings": stamp}:
            for line in lines[1:]:
                rec = _loads(line)  # a line cut by an interruption is skipped
                if isinstance(rec, dict) and "key" in rec:
                    self.records[rec["key"]] = rec["value"]
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps({"settings": stamp}) + "\n")
        self.resumed = len(self.records)

    def get_or(self, key: str, compute):
        """The value stored under ``key``, or ``compute()`` (then stored at once)."""
        if key not in self.records:
            value = json.loads(json.dumps(compute(), default=_jsonable))  # stored and returned alike
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "value": value}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.records[key] = value
        return self.records[key]

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def _loads(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(x)
    raise TypeError(f"cannot write a {type(x).__name__} to the results JSON")
