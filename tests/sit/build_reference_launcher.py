"""Runs build_reference.py with the stub feature network (tests/sit/stub_features.py): for torchrun tests.

    python -m torch.distributed.run --nproc_per_node 2 tests/sit/build_reference_launcher.py --data-path ...
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "examples" / "sit"))
sys.path.insert(0, str(HERE))

import build_reference  # noqa: E402
from runtime.cli import run  # noqa: E402
from stub_features import stub_factory  # noqa: E402

if __name__ == "__main__":
    run(lambda args: build_reference.main(args, extractor_factory=stub_factory), build_reference.parse_args)
