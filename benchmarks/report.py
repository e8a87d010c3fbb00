"""What every benchmark records next to its numbers, and how it writes them."""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def run_metadata(device: torch.device, **settings) -> dict:
    """Date, torch, device and thread count of this run, plus the benchmark's own settings."""
    return dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        threads=torch.get_num_threads(), argv=sys.argv[1:], **settings,
    )


def write_json(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
