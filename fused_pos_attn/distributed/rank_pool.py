"""RankPool: P processes on this machine joined in a gloo group and kept alive, for the tests and benchmarks of
context parallelism: each call sends one function to every rank and returns each rank's result, without paying
process start-up and group set-up per call.

The functions must be importable by name (module-level functions of a module, or of a script's __main__ guarded
by `if __name__ == "__main__"`); they get (rank, world, *args). Each rank runs torch with `threads` threads. A rank
that raises is reported with its traceback; a call that does not finish within the timeout (a rank stuck in a
collective) fails and the pool is restarted for the next call.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import socket
import traceback
from typing import Callable

COLLECTIVE_TIMEOUT_S = 60  # a rank stuck in a collective raises after this (gloo's timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, threads: int, port: int, tasks, results) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:  # the pool's process died without closing it: do not linger
                break
            continue
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world, *args)))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the test
            results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class RankFailure(AssertionError):
    """Some rank raised: every failed rank's report (exception and traceback)."""

    def __init__(self, reports: dict[int, str]):
        super().__init__("\n".join(f"--- rank {rank} ---\n{report}" for rank, report in sorted(reports.items())))


class RankPool:
    """world processes in a gloo group, each with `threads` torch threads; calls time out after timeout_s."""

    def __init__(self, world: int, threads: int = 1, timeout_s: float = 120):
        self.world, self.threads, self.timeout_s = world, threads, timeout_s
        self._procs: list = []

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world)]
        self._results = ctx.Queue()
        env_before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(self.threads)  # the children's OpenMP pools start that size
        try:
            self._procs = [ctx.Process(target=_serve, daemon=True,
                                       args=(rank, self.world, self.threads, port, self._tasks[rank], self._results))
                           for rank in range(self.world)]
            for proc in self._procs:
                proc.start()
        finally:
            if env_before is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = env_before

    def run(self, fn: Callable, *args) -> list:
        """fn(rank, world, *args) on every rank; their return values by rank. Raises RankFailure if any raised."""
        if not self._procs:
            self._start()
        for tasks in self._tasks:
            tasks.put((fn, args))
        values, failures = {}, {}
        try:
            for _ in range(self.world):
                rank, ok, value = self._results.get(timeout=self.timeout_s)
                (values if ok else failures)[rank] = value
        except queue.Empty:
            self.close(force=True)
            raise AssertionError(f"{fn.__name__}: no result from every rank within {self.timeout_s} s "
                                 f"(got ranks {sorted(values) + sorted(failures)}); the pool was restarted") from None
        if failures:
            raise RankFailure(failures)
        return [values[rank] for rank in range(self.world)]

    def close(self, force: bool = False) -> None:
        for proc, tasks in zip(self._procs, getattr(self, "_tasks", [])):
            if force:
                proc.kill()
            else:
                tasks.put(None)
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        self._procs = []
