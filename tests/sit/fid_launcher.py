"""Runs train.py or evaluate_run.py with the stub feature network (tests/sit/stub_features.py) in place of the
Inception network: for the multi-process tests of the metrics during and after training.

    RANK=0 WORLD_SIZE=2 ... python tests/sit/fid_launcher.py train --data sinusoid ... --fid-every 2 ...
    python tests/sit/fid_launcher.py evaluate_run results/run --fid-ref ref.npz ...
"""
import importlib
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "examples" / "sit"))
sys.path.insert(0, str(HERE))

from evaluation import sample_metrics  # noqa: E402
from runtime.cli import run  # noqa: E402
from runtime.preemption import STOP_SIGNALS, Preempted  # noqa: E402
from stub_features import StubFeatures  # noqa: E402

sample_metrics.default_extractor = lambda device: StubFeatures()


def main() -> None:
    script = importlib.import_module(sys.argv.pop(1))

    def guarded(args) -> object:
        try:
            return script.main(args)
        except Preempted:
            # As catches_stop_signals does for a script run as __main__: a late signal must not turn 75 into a kill.
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
            raise

    run(guarded, script.parse_args)


if __name__ == "__main__":
    main()
