"""JSON files: atomic writes and the metrics.jsonl log a resumed run rewrites from its checkpoint."""

from __future__ import annotations

import json

from detlib.jsonio import append_jsonl, truncate_jsonl


def test_truncate_keeps_lines_up_to_the_resumed_iteration_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for it in (20, 40, 60, 80):
        append_jsonl(path, {"iteration": it, "train/loss": 1.0 / it})
    with path.open("a") as f:
        f.write('{"iteration": 100, "train/lo')  # killed mid-write
    truncate_jsonl(path, 40)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [20, 40]
    append_jsonl(path, {"iteration": 60, "train/loss": 0.5})  # the resumed run writes 60 again, once
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [20, 40, 60]
    truncate_jsonl(tmp_path / "absent.jsonl", 10)  # nothing to do
    assert not (tmp_path / "absent.jsonl").exists()
