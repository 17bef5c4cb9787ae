"""The engine's worker: one thread that owns every model computation and every change to the engine's tables.

Callers send commands (``submit``, thread-safe, usable from asyncio). Each pass of the loop protects live
streams: it takes commands for about a third of a frame step's time, runs one batched frame step for every
generating response, then one slice of background work (an audio window, a prefill chunk, some tokenizing, a
transcription token), so a long user turn, a flooded conversation or a new voice delays a live stream by
about one step, not by its whole cost. A failing step fails its rows; a failing response ends alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Protocol

import torch

from .events import EngineError
from .stepper import StepOutput, Stepper

log = logging.getLogger("openchroma.engine")
# Between two frame steps, commands get about this fraction of a step's time and background work one slice, so
# a live stream's chunks stay evenly spaced while other sessions are being set up.
SLICE = 0.3


class Work(Protocol):
    """What the worker runs besides commands: the frame step's rows and the background slices."""

    stepper: Stepper

    def deliver(self, out: StepOutput) -> None: ...
    def fail_row(self, slot: int, message: str) -> None: ...
    def fail_all(self, message: str, keep_jobs: bool = False) -> None: ...
    def has_background(self) -> bool: ...
    def background_slice(self) -> bool: ...


class Later:
    """A command's answer given later, by a background slice (``respond`` answers once its prompt is built)."""

    def __init__(self) -> None:
        self.future: Future = Future()


def _forward(source: Future, target: Future) -> None:
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())


class Worker:
    def __init__(self, work: Work, threads: int | None):
        self.work = work
        self.threads = threads
        self.step_failures = 0            # frame steps failed in a row
        self.last_error: str | None = None
        self._cmds: queue.Queue = queue.Queue()
        self._closed = False
        self._stopped = False             # the loop has ended: what is queued now is answered with an error
        self._thread = threading.Thread(target=self._run, name="openchroma-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn, *args) -> Future:
        if self._closed:
            raise EngineError("the engine is closed")
        fut: Future = Future()
        self._cmds.put((fn, args, fut))
        if self._stopped:   # set before the worker's last drain: one of the two answers this command
            self._drain("the engine is closed" if self._closed else "the engine's worker stopped")
        return fut

    def call(self, fn, *args):
        if self.on_thread:
            return fn(*args)
        return self.submit(fn, *args).result()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cmds.put(None)
            self._thread.join(timeout=10)

    def _drain(self, message: str) -> None:
        """Answer every command still queued with an error (the worker is gone), so no caller waits forever."""
        while True:
            try:
                item = self._cmds.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[2].set_running_or_notify_cancel():
                item[2].set_exception(EngineError(message))

    def _run(self) -> None:
        try:
            self._loop()
        finally:   # closed, or killed by something no guard catches: nobody may wait on it forever
            self._stopped = True
            message = "the engine is closed" if self._closed else "the engine's worker stopped"
            self.work.fail_all(message)
            self._drain(message)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)   # this thread's own setting
        step_seconds = 0.0   # how long the last frame step took: the slice every other kind of work gets
        work = self.work
        while True:
            live = work.stepper.active
            # 1. Commands: all of them when nothing streams; about one step's worth when something does.
            if not self._commands(live, block=not live and not work.has_background(), budget=step_seconds * SLICE):
                work.fail_all("the engine was closed")
                return
            # 2. One frame for every generating response.
            if work.stepper.active:
                t1 = time.perf_counter()
                try:
                    outs = work.stepper.step()
                except Exception as e:  # the whole batch's step failed: never leave callers hanging
                    self.step_failures += 1
                    self.last_error = f"generation failed: {type(e).__name__}: {e}"
                    work.fail_all(self.last_error, keep_jobs=True)
                    continue
                self.step_failures = 0
                step_seconds = time.perf_counter() - t1
                for out in outs:
                    try:
                        work.deliver(out)
                    except Exception as e:  # this response's own failure: it ends, its neighbours go on
                        work.fail_row(out.slot, f"{type(e).__name__}: {e}")
            # 3. Background work in slices: one between frames while streams are live, back to back otherwise.
            with torch.inference_mode():
                try:
                    while work.background_slice():
                        if self._cmds.qsize() or work.stepper.active:
                            break
                except Exception as e:  # a bug outside any one job's guard: never let it stop the worker
                    log.exception("background work failed")
                    self.last_error = f"background work failed: {type(e).__name__}: {e}"
                    work.fail_all(self.last_error)

    def _commands(self, live: bool, block: bool, budget: float) -> bool:
        """Run queued commands (waiting for one when ``block``); while streams are live, for about ``budget``
        seconds. False when the engine is closing."""
        t0 = time.perf_counter()
        while True:
            try:
                item = self._cmds.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            fn, args, fut = item
            if not fut.set_running_or_notify_cancel():
                continue  # the caller gave up on it (a cancelled future must not be answered)
            try:
                with torch.inference_mode():
                    result = fn(*args)
                if isinstance(result, Later):
                    result.future.add_done_callback(lambda done, fut=fut: _forward(done, fut))
                else:
                    fut.set_result(result)
            except (StopIteration, StopAsyncIteration) as e:   # an asyncio future refuses these: say it plainly
                fut.set_exception(RuntimeError(f"{getattr(fn, '__name__', fn)!s} raised {type(e).__name__}"))
            except BaseException as e:  # reported to the caller; the engine goes on
                fut.set_exception(e)
            if live and time.perf_counter() - t0 > budget:
                return True
