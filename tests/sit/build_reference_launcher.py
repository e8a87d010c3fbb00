"""Runs build_reference.py with the stub feature network (tests/sit/stub_features.py): for multi-process tests.

    python -m torch.distributed.run --nproc_per_node 2 tests/sit/build_reference_launcher.py --data-path ...

STUB_DELAY_S (seconds, default 0) makes every batch that slow, so that a test can signal a run mid-way.
"""
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "examples" / "sit"))
sys.path.insert(0, str(HERE))

import build_reference  # noqa: E402
from runtime.cli import run  # noqa: E402
from runtime.preemption import STOP_SIGNALS, Preempted  # noqa: E402
from stub_features import stub_factory  # noqa: E402


def delayed_stub_factory(device, batch_size):
    """stub_factory's network, sleeping STUB_DELAY_S before each batch."""
    stub, delay = stub_factory(device, batch_size), float(os.environ.get("STUB_DELAY_S", "0"))

    def featurise(images):
        time.sleep(delay)
        return stub(images)

    return featurise


def main(args) -> None:
    try:
        build_reference.main(args, extractor_factory=delayed_stub_factory)
    except Preempted:
        # As catches_stop_signals does for a script run as __main__: a late signal must not turn exit 75 into a kill.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        raise


if __name__ == "__main__":
    run(main, build_reference.parse_args)
