"""Where a training run's log goes: plain-text lines on the console and in log.txt, and one row of metrics
per logged step in log.csv (plus TensorBoard / Weights & Biases with --report-to).

Only rank 0 writes. On resume, log.csv drops the rows past the resumed step, so the log matches the weights.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import sys

from tqdm.auto import tqdm

from runtime.atomic import atomic_write
from runtime.run_flags import saved_args

__all__ = ["LOG_FIELDS", "LOGGER_NAME", "LogFile", "TqdmHandler", "create_logger", "CSVLog", "MetricLog"]

LOGGER_NAME = "sit-train"  # log.txt's logger: logging.getLogger(LOGGER_NAME) reaches it from any module

LOG_FIELDS = ["step", "epoch", "fm_loss", "anm_loss", "loss", "grad_norm", "steps_per_sec", "img_per_sec",
              "heldout_fm_loss", "heldout_fm_loss_ema", "elapsed_s"]


class LogFile(logging.FileHandler):
    """log.txt in UTF-8 whatever the locale (a byte-named path is escaped, not lost). A line that cannot be
    written (full disk, folder gone) stops the run with one error line instead of a traceback per line."""

    def __init__(self, path: str) -> None:
        super().__init__(path, encoding="utf-8", errors="backslashreplace")

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError) and error.filename is None:
            error.filename = self.baseFilename  # a failed flush does not say which file
        raise  # the write's own error: cli.run turns a full disk into one line


class TqdmHandler(logging.StreamHandler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def create_logger(logging_dir: str | None, rank: int, console: bool = True) -> logging.Logger:
    """A logger that writes plain text to the console and <logging_dir>/log.txt on rank 0, silent elsewhere."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in logger.handlers:  # main() may run several times in one process (tests, demo.py)
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0 and logging_dir is not None:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers: list[logging.Handler] = [LogFile(os.path.join(logging_dir, "log.txt"))]
        if console:
            handlers.append(TqdmHandler())
        for handler in handlers:
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def read_rows(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """A log CSV's columns and its complete rows (log.csv, eval_log.csv): a row cut short by a full disk or a
    kill, or one without a step number, is left out rather than read as a bogus early step.

    >>> read_rows("results/run/log.csv")  # doctest: +SKIP
    (['step', 'epoch', 'fm_loss', ...], [{'step': '100', 'epoch': '0', 'fm_loss': '0.61', ...}, ...])
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if None not in row and None not in row.values()
                and (row.get("step") or "").isdigit()]
        return list(reader.fieldnames or []), rows


class CSVLog:
    """CSV of logged metrics, one row per logged step. A row with new columns (e.g. ANM stats after the
    step-0 evaluation) rewrites the header; on resume, rows past the resumed step are dropped so the log
    matches the weights."""

    def __init__(self, path: str, resume_step: int | None) -> None:
        self.path, self.fields = path, None
        rows: list[dict] = []
        if resume_step is not None and os.path.exists(path):
            fields, complete = read_rows(path)
            self.fields = fields or None
            rows = [row for row in complete if int(row["step"]) <= resume_step]
        if self.fields is not None:
            self._rewrite(rows)
        elif os.path.exists(path):
            os.remove(path)  # a run that stopped before its first checkpoint: its log starts over too

    def _rewrite(self, rows: list[dict]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
        with atomic_write(self.path) as f:
            f.write(text.getvalue().encode())

    def write(self, row: dict) -> None:
        """Append one row (columns not seen before extend the header)."""
        if self.fields is None or any(key not in self.fields for key in row):
            rows = []
            if self.fields is not None:
                with open(self.path, newline="") as f:
                    rows = list(csv.DictReader(f))
            self.fields = list(self.fields or []) + [key for key in row if key not in (self.fields or [])]
            self._rewrite(rows)
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields, restval="").writerow(row)
        except OSError as error:
            error.filename = error.filename or self.path  # a failed flush does not say which file
            raise


class MetricLog:
    """Where logged rows go: log.csv always (rank 0), plus TensorBoard and/or Weights & Biases (--report-to)."""

    def __init__(self, args: argparse.Namespace, experiment_dir: str, resume_step: int | None, rank: int) -> None:
        self.csv = CSVLog(os.path.join(experiment_dir, "log.csv"), resume_step) if rank == 0 else None
        self.tensorboard = self.wandb = None
        if rank == 0 and "tensorboard" in args.report_to:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(experiment_dir, "tb"))
        if rank == 0 and "wandb" in args.report_to:  # WANDB_MODE=offline logs without a network
            import wandb
            self.wandb = wandb.init(project="anm-sit", name=os.path.basename(experiment_dir), dir=experiment_dir,
                                    config=saved_args(args), resume="allow")

    def write(self, row: dict) -> None:
        """One row: LOG_FIELDS first (blank when absent), then any other keys (e.g. ANM statistics)."""
        row = {k: row.get(k, "") for k in LOG_FIELDS} | {k: v for k, v in row.items() if k not in LOG_FIELDS}
        if self.csv is not None:
            self.csv.write(row)
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, float)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
