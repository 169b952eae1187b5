"""Writing results: one JSON file (everything, machine-readable) and one markdown table (shaped like
the paper's table) per run, written atomically so an interrupted run never leaves half a file and
never overwrites an earlier result with a broken one."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


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


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_results(result: dict, out_dir: str | Path, name: str, table: str | None = None) -> dict[str, Path]:
    """Write ``OUT/NAME.json`` (and ``OUT/NAME.md`` when a table is given); returns the paths."""
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json"}
    _atomic_write(paths["json"], json.dumps(result, indent=2, default=_jsonable) + "\n")
    if table is not None:
        paths["md"] = out / f"{name}.md"
        _atomic_write(paths["md"], table)
    return paths


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(x)
    raise TypeError(f"cannot write a {type(x).__name__} to the results JSON")
