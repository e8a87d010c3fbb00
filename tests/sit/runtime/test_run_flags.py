"""examples/sit/runtime/run_flags.py: every train.py flag is classified; a resume keeps the run-defining ones."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import train
from runtime.cli import UsageError
from runtime.run_flags import LOCATIONS, METRIC, OPERATIONAL, RUN_DEFINING, adopt_saved_args, given_flags


def tiny(results: Path, *extra: str) -> list[str]:
    return ["--data", "sinusoid", "--image-size", "8", "--data-size", "16", "--model", "SiT-N/2",
            "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(results), "--exp-name", "custom",
            "--log-every", "1", "--eval-every", "0", "--sample-every", "0", "--no-progress", *extra]


def test_every_flag_is_in_exactly_one_class() -> None:
    dests = {action.dest for action in train.build_parser()._actions if action.dest != "help"}
    classes = (RUN_DEFINING, LOCATIONS, OPERATIONAL, METRIC)
    assert set().union(*classes) == dests
    assert sum(len(c) for c in classes) == len(dests)  # no flag in two classes


def test_given_flags_are_the_written_ones_not_the_non_default_ones() -> None:
    parser = train.build_parser()
    argv = ["--anm", "--anm-alpha", "70", "--no-progress", "--report-to", "csv", "--no-tensorboard", "--lr=2e-4"]
    given = given_flags(parser, argv)
    assert given == sorted(["anm", "anm_alpha", "progress", "report_to", "lr"])  # alpha 70 is the default, given
    assert given_flags(parser, ["--no-anm"]) == ["anm"]


def namespace(given: list[str], **values) -> argparse.Namespace:
    return argparse.Namespace(given_flags=given, **values)


def test_adopt_restores_missing_refuses_changed_and_lists_operational_changes() -> None:
    saved = dict(anm=True, anm_alpha=5.0, lr=1e-4, max_steps=10, data_path="/old", log_every=1)
    args = namespace(["max_steps", "data_path"], anm=False, anm_alpha=70.0, lr=1e-4, max_steps=20,
                     data_path="/new", log_every=1)
    lines = adopt_saved_args(args, saved, "ck.pt")
    assert (args.anm, args.anm_alpha, args.max_steps, args.data_path) == (True, 5.0, 20, "/new")
    assert lines == ["restored from ck.pt: --anm True, --anm-alpha 5.0",
                     "changed on resume: --data-path '/old' -> '/new', --max-steps 10 -> 20"]
    args = namespace(["anm", "anm_alpha", "lr"], anm=False, anm_alpha=6.0, lr=1e-4, max_steps=10, log_every=1)
    with pytest.raises(UsageError) as error:
        adopt_saved_args(args, saved, "ck.pt")
    assert "--anm False (saved: True)" in str(error.value) and "--anm-alpha 6.0 (saved: 5.0)" in str(error.value)
    assert "--lr" not in str(error.value)  # given, but the saved value


@pytest.mark.parametrize("change, message", [(["--no-anm"], "--anm False (saved: True)"),
                                             (["--anm", "--anm-alpha", "6"], "--anm-alpha 6.0 (saved: 5.0)"),
                                             (["--anm", "--lr", "0.001"], "--lr 0.001 (saved: 0.0001)"),
                                             (["--anm", "--precision", "bf16"], "--precision 'bf16' (saved: 'fp32')")])
def test_resume_with_a_changed_run_defining_flag_is_refused(tmp_path: Path, change: list[str], message: str) -> None:
    train.main(train.parse_args(tiny(tmp_path, "--anm", "--anm-alpha", "5", "--max-steps", "2")))
    before = (tmp_path / "custom" / "args.json").read_text()
    with pytest.raises(UsageError) as error:
        train.main(train.parse_args(tiny(tmp_path, *change, "--max-steps", "4", "--resume", "auto")))
    assert message in str(error.value) and "0000002.pt" in str(error.value)
    assert (tmp_path / "custom" / "args.json").read_text() == before


def test_resume_without_the_flags_keeps_the_run(tmp_path: Path) -> None:
    """The case that once turned an ANM run into a baseline: --resume auto, custom --exp-name, no --anm."""
    train.main(train.parse_args(tiny(tmp_path, "--anm", "--anm-alpha", "5", "--anm-warmup", "3", "--lr", "3e-4",
                                     "--max-steps", "2")))
    saved = json.loads((tmp_path / "custom" / "args.json").read_text())
    out = train.main(train.parse_args(tiny(tmp_path, "--max-steps", "4", "--log-every", "2", "--resume", "auto")))
    now = json.loads((tmp_path / "custom" / "args.json").read_text())
    assert now == dict(saved, max_steps=4, log_every=2, resume="auto")
    assert "anm/norm" in " ".join(out)  # ANM statistics were logged: ANM stayed on
    log = (tmp_path / "custom" / "log.txt").read_text()
    assert "changed on resume: --log-every 1 -> 2, --max-steps 2 -> 4" in log
    assert "restored from" in log and "--anm-alpha 5.0" in log and "--lr 0.0003" in log



def test_a_new_run_under_resume_auto_refuses_flags_it_would_ignore(tmp_path: Path) -> None:
    """--resume auto on a new experiment (no checkpoint yet) trained with --anm-alpha and no --anm, exit 0."""
    with pytest.raises(UsageError, match=r"^--anm-alpha \(ANM is off: add --anm\) would be ignored: drop it$"):
        train.main(train.parse_args(tiny(tmp_path, "--anm-alpha", "50", "--max-steps", "2", "--resume", "auto")))
    assert not (tmp_path / "custom").exists()  # refused before the run folder exists
