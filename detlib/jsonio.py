"""Reading and writing JSON files with errors that name the file; writes are atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_json(path: str | Path, what: str = "file", invalid: type[Exception] = ValueError) -> object:
    """Parse a JSON file. A missing file is a ``FileNotFoundError`` ("WHAT not found: PATH"); a folder
    ("WHAT PATH is a folder, not a file") and a malformed file ("PATH: not valid JSON (...)") are an ``invalid``."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.json"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise invalid(f"{what} {path} is a folder, not a file: name the JSON file itself{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"{path}: not valid JSON ({e})") from e


def write_json(path: str | Path, obj: object, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (``indent``; None: compact) through a temp file and ``os.replace`` (readers never
    see half a file), creating the parent folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)
    return path


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append ``record`` as one line of JSON (``metrics.jsonl``: one line per log step or evaluation)."""
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: str | Path, max_iteration: int) -> None:
    """Drop the lines of ``path`` past ``max_iteration`` (and a half-written last line): a resumed run
    writes those iterations again, so the file holds each once."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("iteration", 0) <= max_iteration:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)
