"""The one thread that owns the engine. The HTTP side talks to it through a queue only.

Requests, aborts and calls (a function run on the engine between steps, e.g. a snapshot of
the records) enter a thread-safe inbox; the loop drains it, runs one step while work exists,
and hands every new token of the step to `deliver` in one batch. The engine is synchronous and
not thread-safe: nothing else may touch it once the loop has started.

Steps partition time as in `engine.runtime.replay`: a step starts where the previous one ended
while work goes on, and after an idle spell at the arrival of the request that woke the
engine; what the loop costs between steps falls inside the next step. So the server's step
records feed the simulator exactly as a replay's do.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.core.sequence import SamplingParams, Sequence
from engine.runtime.llm import LLMEngine

IDLE_WAIT_S = 0.05  # an idle loop also wakes this often to notice a stop


@dataclass(frozen=True, slots=True)
class Submission:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float  # on the engine's clock (EngineLoop.now), when the HTTP request came


@dataclass(slots=True)
class Output:
    """One request's new tokens from one step; `finish_reason` is set on its last output."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    error: str | None = None  # the engine refused the request (nothing was generated)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True, slots=True)
class LoopStats:
    """A snapshot for the HTTP side, replaced (never mutated) after each step."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    alive: bool = True


@dataclass(slots=True)
class StepTokens:
    """What one step produced, for the metrics (read in the loop thread only)."""

    end_s: float
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)


class StepObserver(Protocol):
    def on_step(self, engine: LLMEngine, tokens: StepTokens) -> None: ...
    def on_abort(self) -> None: ...


Deliver = Callable[[list[Output]], None]


@dataclass(slots=True)
class _Tracked:
    seq: Sequence
    sent: int = 0  # output tokens delivered so far
    last_token_s: float = 0.0


class EngineLoop:
    def __init__(self, engine: LLMEngine, deliver: Deliver,
                 observer: StepObserver | None = None):
        self.engine = engine
        self.deliver = deliver
        self.observer = observer
        self.stats = LoopStats()
        self.error: BaseException | None = None
        self._origin = time.perf_counter() - engine.now()
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._active: dict[str, _Tracked] = {}
        self._stopping = False
        self._prev_end: float | None = None
        self._woken_at: float | None = None  # first arrival since the engine went idle
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # -- any thread ------------------------------------------------------------------------

    def now(self) -> float:
        """The engine's clock, read without touching the engine."""
        return time.perf_counter() - self._origin

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def num_pending(self) -> int:
        """Requests handed in and not yet seen by the engine."""
        return self._inbox.qsize()

    def submit(self, submission: Submission) -> None:
        self._put(("add", submission))

    def abort(self, request_id: str) -> None:
        self._put(("abort", request_id))

    def call(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Run `fn(engine)` in the loop thread between steps; its result comes in the future."""
        future: Future = Future()
        self._put(("call", fn, future))
        return future

    def _put(self, item: tuple[Any, ...]) -> None:
        if not self._thread.is_alive() and self._thread.ident is not None:
            raise RuntimeError(f"the engine loop has stopped ({self.error or 'stopped'})")
        self._inbox.put(item)
        self._wake.set()

    # -- the loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                self._drain()
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self._woken_at = None
                    self._publish()
                    self._wake.wait(IDLE_WAIT_S)
        except BaseException as err:  # reported to every waiting client, then to /health
            self.error = err
        finally:
            self._close()

    def _drain(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = item[0]
            if kind == "add":
                self._add(item[1])
            elif kind == "abort":
                self._abort(item[1])
            else:
                _run_call(item[1], item[2], self.engine)

    def _add(self, sub: Submission) -> None:
        idle = not self.engine.has_unfinished()
        seq = self.engine.add_request(sub.prompt_token_ids, sub.params, sub.request_id,
                                      arrival=sub.arrival_s)
        if seq.is_finished:  # rejected: it can never run here
            self.deliver([Output(sub.request_id, [], None, seq.num_prompt_tokens, 0,
                                 error=seq.finish_reason)])
            return
        if idle and self._woken_at is None:
            self._woken_at = sub.arrival_s
        self._active[sub.request_id] = _Tracked(seq)

    def _abort(self, request_id: str) -> None:
        if self._active.pop(request_id, None) is None:
            return
        if self.engine.abort_request(request_id) is not None and self.observer:
            self.observer.on_abort()

    def _step(self) -> None:
        engine = self.engine
        count = len(engine.step_records)
        engine.step(self._next_start())
        if len(engine.step_records) == count:  # nothing could be scheduled: do not spin
            self._wake.wait(IDLE_WAIT_S)
            return
        self._prev_end = engine.step_records[-1].end_s
        self._woken_at = None
        outputs, tokens = self._collect(self._prev_end)
        self._publish()
        if self.observer:
            self.observer.on_step(engine, tokens)
        if outputs:
            self.deliver(outputs)

    def _next_start(self) -> float:
        prev = self._prev_end
        if self._woken_at is None:
            return prev if prev is not None else self.engine.now()
        return self._woken_at if prev is None else max(prev, self._woken_at)

    def _collect(self, end_s: float) -> tuple[list[Output], StepTokens]:
        outputs, tokens = [], StepTokens(end_s)
        for rid, tracked in list(self._active.items()):
            seq = tracked.seq
            new = seq.token_ids[seq.num_prompt_tokens + tracked.sent:].tolist()
            if not new and not seq.is_finished:
                continue
            if new:
                _time_tokens(tracked, seq, end_s, tokens)
                tracked.sent += len(new)
            reason = seq.finish_reason if seq.is_finished else None
            outputs.append(Output(rid, new, reason, seq.num_prompt_tokens,
                                  seq.num_cached_tokens))
            if seq.is_finished:
                del self._active[rid]
                tokens.finished.append(seq)
        return outputs, tokens

    def _publish(self) -> None:
        sched = self.engine.scheduler
        self.stats = LoopStats(len(sched.running), len(sched.waiting),
                               sched.block_manager.usage)

    def _close(self) -> None:
        self.stats = LoopStats(alive=False)
        reason = f"engine loop failed: {self.error!r}" if self.error else "server shut down"
        left = [Output(rid, [], None, t.seq.num_prompt_tokens, 0, error=reason)
                for rid, t in self._active.items()]
        self._active.clear()
        while True:  # calls waiting in the inbox must not hang their callers
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] == "call":
                item[2].set_exception(RuntimeError(reason))
            elif item[0] == "add":
                left.append(Output(item[1].request_id, [], None, 0, 0, error=reason))
        if left:
            self.deliver(left)


def _time_tokens(tracked: _Tracked, seq: Sequence, end_s: float, tokens: StepTokens) -> None:
    if tracked.sent == 0 and seq.times.first_token is not None:
        tokens.ttft_s.append(seq.times.first_token - seq.times.arrival)
    else:
        tokens.itl_s.append(end_s - tracked.last_token_s)
    tracked.last_token_s = end_s


def _run_call(fn: Callable[[LLMEngine], Any], future: Future, engine: LLMEngine) -> None:
    try:
        future.set_result(fn(engine))
    except Exception as err:
        future.set_exception(err)
