"""examples/sit/runtime/preemption.py: signals recorded, one verdict for every rank, without a per-step sync."""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port
from runtime import preemption
from runtime.preemption import (
    EXIT_PREEMPTED,
    BatchAgreement,
    Preempted,
    StepAgreement,
    StopSignals,
    catches_stop_signals,
)


class FakeClock:
    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 1000.0, step_s

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.step_s


def test_signals_are_recorded_and_the_old_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested and stop.first is None
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal during the stop: noted, no KeyboardInterrupt
        assert stop.requested and stop.first == "SIGTERM" and stop.later() == ["SIGINT"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_catches_stop_signals_hands_the_recorder_to_the_function() -> None:
    @catches_stop_signals
    def main(args: int, stop: StopSignals) -> tuple[int, str | None]:
        os.kill(os.getpid(), signal.SIGUSR1)
        return args, stop.first

    assert main(3) == (3, "SIGUSR1")
    assert Preempted("x").code == EXIT_PREEMPTED == 75


def test_one_process_checks_every_step_and_the_time_cadence_follows_its_clock() -> None:
    clock = FakeClock(step_s=3.0)
    stop = StopSignals()
    agreement = StepAgreement(stop, 1, 0, torch.device("cpu"), step=0, save_every_s=10.0, clock=clock)
    due = []
    for step in range(1, 10):
        clock.tick()
        stopped, time_due = agreement.poll(step)
        assert not stopped
        if time_due:
            due.append(step)
            agreement.saved()
    assert due == [4, 8]  # 12 s and 24 s: every 10 s of this clock, counted from the last save
    stop.received.append(signal.SIGTERM)
    assert agreement.poll(10) == (True, False)


def _rank(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # Rank 1's clock runs 50x faster than rank 0's: only rank 0's counts for the time cadence.
    clock = FakeClock(step_s=1.0 if rank == 0 else 50.0)
    stop = StopSignals()
    agreement = StepAgreement(stop, 2, rank, torch.device("cpu"), step=0, save_every_s=4.5, sync_s=2.0, clock=clock)
    syncs, saves, stopped_at = [], [], None
    for step in range(1, 40):
        clock.tick()
        if rank == 1 and step == 13:
            stop.received.append(signal.SIGUSR1)  # only one rank sees the signal, mid-interval
        checked = step >= agreement.next_check
        stopped, due = agreement.poll(step)
        syncs += [step] if checked else []
        if due:
            saves.append(step)
            agreement.saved()
        if stopped:
            stopped_at = step
            break
    results[rank] = (syncs, saves, stopped_at)
    dist.destroy_process_group()


def test_two_ranks_agree_on_the_stop_step_and_the_time_cadence_without_a_sync_per_step() -> None:
    port = free_port()
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, results), nprocs=2, join=True)
    assert results[0] == results[1]
    syncs, saves, stopped_at = results[0]
    # Step time is the slower rank's 50 s > 2 s: a sync every step.
    assert syncs == list(range(1, 14)) and stopped_at == 13
    assert saves == [5, 10]  # rank 0's clock: 4.5 s of it pass by steps 5 and 10


def test_the_interval_grows_to_the_sync_period_for_fast_steps(monkeypatch) -> None:
    clock = FakeClock(step_s=0.125)
    agreement = StepAgreement(StopSignals(), 1, 0, torch.device("cpu"), step=0, save_every_s=None, clock=clock)
    agreement.world_size = 2  # the interval arithmetic of several ranks, with a stand-in all_reduce
    monkeypatch.setattr(preemption, "all_reduce_", lambda tensor, op=None: tensor)
    clock.tick()
    agreement.poll(1)
    assert agreement.interval == 40 and agreement.next_check == 41  # 5 s / 0.125 s per step
    assert agreement.poll(2) == (False, False) and agreement.next_check == 41  # no sync before step 41


def test_batch_agreement_in_one_process_checks_the_flag_before_every_batch() -> None:
    stop = StopSignals()
    agreement = BatchAgreement(stop, 1, torch.device("cpu"))
    assert [agreement.poll() for _ in range(3)] == [False] * 3
    stop.received.append(signal.SIGINT)
    assert agreement.poll() and agreement.finish() and agreement.syncs == 0


def _batch_loop(agreement: BatchAgreement, clock: FakeClock, batches: int, signal_before: int | None) -> int:
    """Batches done before the loop ended (signal_before: this rank's signal arrives before that batch)."""
    done = 0
    for batch in range(batches):
        if batch == signal_before:
            agreement.stop.received.append(signal.SIGTERM)
        if agreement.poll():
            break
        clock.tick()
        done += 1
    return done


def _batch_rank(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = []
    # Uneven shares, no signal: rank 0 runs out after 3 batches and answers rank 1's syncs until it is done.
    clock = FakeClock(step_s=1.0)
    agreement = BatchAgreement(StopSignals(), 2, torch.device("cpu"), sync_s=0.5, clock=clock)
    out.append((_batch_loop(agreement, clock, 3 if rank == 0 else 10, None), agreement.finish()))
    # Rank 1 alone is signalled before its 5th batch; a batch takes 1 s > sync_s: rank 0 stops at the next check.
    clock = FakeClock(step_s=1.0)
    agreement = BatchAgreement(StopSignals(), 2, torch.device("cpu"), sync_s=0.5, clock=clock)
    out.append((_batch_loop(agreement, clock, 50, 4 if rank == 1 else None), agreement.finish()))
    # Fast batches (0.25 s, sync_s 2 s): a check every 8 batches; rank 0 stops within 8 batches of rank 1.
    clock = FakeClock(step_s=0.25)
    agreement = BatchAgreement(StopSignals(), 2, torch.device("cpu"), sync_s=2.0, clock=clock)
    out.append((_batch_loop(agreement, clock, 100, 20 if rank == 1 else None), agreement.finish(),
                agreement.interval))
    results[rank] = out
    dist.destroy_process_group()


def test_batch_agreement_stops_every_rank_soon_after_a_signal_to_one() -> None:
    port = free_port()
    results = mp.Manager().dict()
    mp.spawn(_batch_rank, args=(port, results), nprocs=2, join=True)
    (uneven0, stopped0, fast0), (uneven1, stopped1, fast1) = results[0], results[1]
    assert uneven0 == (3, False) and uneven1 == (10, False)  # every batch done, the same verdict, no hang
    assert stopped1 == (4, True) and stopped0[1] and 4 <= stopped0[0] <= 5
    assert fast1[:2] == (20, True) and fast0[1] and 20 <= fast0[0] <= 28 and fast0[2] == fast1[2] == 8
