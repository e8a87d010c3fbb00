"""
Speed-up in training steps: how many steps each arm needs to reach the baseline's values, and the baseline
to reach the arm's, from the log.csv of train.py runs.

    python examples/sit/compare_runs.py results/anm-s0 results/anm-s1 \\
        --baseline results/base-s0 results/base-s1 --metric heldout_fm_loss_ema
    python examples/sit/compare_runs.py RUN ... --baseline RUN ... --metric recall --higher-is-better

A RUN is a train.py run folder (<results-dir>/<exp-name>, holding args.json and log.csv). Runs that differ
only in --global-seed and operational flags (folder, name, cadences, workers, loggers, ...) are one arm;
each arm is labelled with what it changes from the baseline. Data, model, batch, lr, weight decay, EMA,
path and prediction must be the same in every run, and so must the metric's evaluation settings (held-out
metrics: --eval-samples, --eval-data-path; fid/sfid/precision/recall: every --fid-* flag): a difference is
refused, naming the flag, unless --force (then it is a warning in the outputs).

factor = baseline step / arm step (> 1: the arm is faster), in both directions: for every logged step S of
the baseline, the step s at which the arm first reaches the baseline's value; for every logged step s of
the arm, the step S at which the baseline first reaches the arm's value. Steps between logged points are
interpolated linearly in log(step) (evaluation/speedup.py); a value never reached is reported as such, with
the bound it implies. Several seeds: the mean curves give the headline, each seed pair its own factors.

Writes to --out: speedup.json (every number), speedup.md (the tables and a summary line per arm) and
curves.png (the metric against log steps, one line per arm, the seeds' min–max band).
"""
from __future__ import annotations

import argparse
import os

from evaluation.speedup import DIRECTIONS
from evaluation.speedup_report import compare_run_folders, headline
from runtime.cli import HelpFormatter, run


def main(args: argparse.Namespace) -> dict:
    result = compare_run_folders(args.runs, args.baseline, args.metric, args.out, args.higher_is_better,
                                 args.force, args.overwrite, args.fid_settings)
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    for arm in result["arms"]:
        print(f"{arm['label']}:")
        for direction in DIRECTIONS:
            print(f"  {headline(arm['label'], arm['summary'], direction)}")
    print(f"Wrote speedup.json, speedup.md and curves.png to {os.path.abspath(args.out)}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders of the arm(s) to compare")
    parser.add_argument("--baseline", nargs="+", required=True, metavar="RUN",
                        help="run folders of the baseline (one setting, one or more seeds)")
    parser.add_argument("--metric", required=True, help="a log.csv column, e.g. heldout_fm_loss_ema")
    parser.add_argument("--higher-is-better", action="store_true", help="the metric improves upwards")
    parser.add_argument("--out", default="comparison", help="folder for speedup.json, speedup.md, curves.png")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous comparison in --out")
    parser.add_argument("--fid-settings", default=None, metavar="DIGEST",
                        help="fid/sfid/precision/recall: the settings group of evaluate_run.py's results in each "
                             "run's eval_log.csv (default: the one measured as log.csv's --fid-every values, or the "
                             "only one)")
    parser.add_argument("--force", action="store_true",
                        help="compare runs whose data, model, optimiser or evaluation settings differ (a warning)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
