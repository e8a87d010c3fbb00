"""What every benchmark records next to its numbers, and how it writes them.

A benchmark on a rented GPU may run under a time limit (gpu_suite.sh) that stops it at any moment. So the
results are on disk from the first row on: :class:`ResultFile` rewrites the JSON file atomically (a
temporary file, then a rename) each time a row is measured, with ``"complete": false`` and the stage the
run had reached, and appends each row to a JSON Lines file beside it (``<out>.jsonl``), flushed and
fsynced. A stopped run leaves a valid JSON of what it measured; a finished one says ``"complete": true``.

    python benchmarks/report.py collect benchmarks/results overhead train_step   # what a suite left
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path


def run_metadata(device, **settings) -> dict:
    """Date, torch, device and thread count of this run, plus the benchmark's own settings."""
    import torch  # here, so that writing and collecting results needs no torch import (gpu_suite.sh)

    return dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        threads=torch.get_num_threads(), argv=sys.argv[1:], **settings,
    )


def write_json(path: str | Path, result: dict) -> Path:
    """``result`` as JSON at ``path``, replaced atomically: a reader (or a kill) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as file:
        file.write(json.dumps(result, indent=2))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return path


class ResultFile:
    """The result JSON of one run, rewritten as rows come in (see the module docstring).

    Rows are keyed: a row measured again (its statistics over more repeats) replaces the earlier one in
    the JSON, and adds a line to the JSON Lines log.

    Example:
        >>> import json, tempfile
        >>> from report import ResultFile
        >>> out = ResultFile(tempfile.mkdtemp() + "/bench.json", meta={"device": "cpu"})
        >>> out.row(("tiny", "anm"), {"mode": "anm", "ms_median": 1.5})
        >>> json.loads(out.path.read_text())["complete"], len(out.path.with_suffix(".jsonl").read_text().splitlines())
        (False, 1)
    """

    def __init__(self, path: str | Path, meta: dict) -> None:
        self.path = Path(path)
        self.meta = meta
        self.rows: dict[object, dict] = {}  # insertion order: the order rows were first measured
        self.extra: dict[str, object] = {}
        self.stage_name = "started"
        self.log = self.path.with_suffix(".jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")  # this run's rows only
        self._write(complete=False)

    def stage(self, name: str) -> None:
        """Record what the run is doing now (where a time limit stopped it, if one does)."""
        self.stage_name = name
        self._write(complete=False)

    def row(self, key: object, row: dict) -> None:
        """Add or replace one measured row; on disk before this returns."""
        self.rows[key] = row
        with open(self.log, "a") as file:
            file.write(json.dumps(row) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self._write(complete=False)

    def set(self, name: str, value: object) -> None:
        """Another top-level entry (e.g. ``checks``), written at once."""
        self.extra[name] = value
        self._write(complete=False)

    def finish(self) -> dict:
        """The final result, written with ``"complete": true``."""
        self.stage_name = "done"
        return self._write(complete=True)

    def _write(self, complete: bool) -> dict:
        result = dict(meta=self.meta, complete=complete, stage=self.stage_name, rows=list(self.rows.values()),
                      **self.extra)
        write_json(self.path, result)
        return result


def collect(directory: str | Path, parts: list[str]) -> dict:
    """What each part of a suite left in ``directory``: complete or not, its stage and its rows."""
    summary = {}
    for part in parts:
        path = Path(directory) / f"{part}.json"
        if not path.exists():
            summary[part] = dict(file=None, complete=False, stage="no result file", rows=0)
            continue
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as error:  # not written by ResultFile (an older script)
            summary[part] = dict(file=str(path), complete=False, stage=f"unreadable: {error}", rows=0)
            continue
        summary[part] = dict(file=str(path), complete=result.get("complete", True), stage=result.get("stage"),
                             rows=len(result.get("rows", [])))
    return summary


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "collect":
        print("usage: python benchmarks/report.py collect DIRECTORY PART [PART ...]", file=sys.stderr)
        return 2
    directory, parts = argv[1], argv[2:]
    summary = collect(directory, parts)
    for part, entry in summary.items():
        state = "complete" if entry["complete"] else f"cut short (stage: {entry['stage']})"
        print(f"{part:<17} {entry['rows']:>3} rows  {state}  {entry['file'] or '-'}")
    write_json(Path(directory) / "suite.json", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
