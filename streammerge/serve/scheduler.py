"""Request state and what goes into each step (pure Python: no torch, testable with a fake runner).

    waiting --admit--> [routing --routed-->] ready --prefilled--> running --EOS / stop / max_tokens--> finished
       \\-- abort (client gone) or error, from any state -----------------------------------------------^

A routed request (model NAME) goes to the router first: the engine's router thread takes every
request admitted since its last forward (`take_routing`), routes them in one forward and hands
them back (`routed`), while the engine thread goes on decoding. Forced and static requests are
ready when admitted. A step is: the ready requests (the runner prefills them) and the running
ones (the runner decodes one token for each, in ONE batched forward). Requests join and leave
the running batch between steps (continuous batching).

Admission keeps two budgets, counting the requests with the router and the ready ones as rows:
`max_batch` rows, and the KV cache memory. The runner keeps the
batch's cache left-padded to its longest row, so a batch of B rows whose longest reservation is
L tokens holds B * L token slots whatever the other rows' lengths: a request reserves its prompt
plus max_tokens, and is admitted only while (rows + 1) * max(reservations) * kv_bytes_per_token
fits the budget. Beyond capacity, requests wait in a queue of at most `max_queue`; a request that
finds the queue full is refused (QueueFull: the server answers 429 with Retry-After).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

WAITING, ROUTING, READY, RUNNING, FINISHED = "waiting", "routing", "ready", "running", "finished"


class QueueFull(Exception):
    """The waiting queue is at its limit: refuse the request (429)."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    """One generation. `target` is what the model name asked for: ("routed",), ("task", name)
    or ("static",); `features_text` is what the router reads (the raw prompt, or a chat's last
    user message). `emit` receives the request's events (engine.py) from the engine thread."""

    prompt_ids: list[int]
    sampling: Sampling
    target: tuple
    features_text: str = ""
    emit: Callable[[tuple], None] = lambda event: None
    id: int = field(default_factory=lambda: next(_ids))
    state: str = WAITING
    decision: Any = None
    tokens: list[int] = field(default_factory=list)  # generated, EOS excluded
    generated: int = 0  # tokens generated, EOS included
    text: str = ""  # the text of `tokens`, cut at a stop string
    sent: int = 0  # characters of `text` emitted
    decoded: str = ""  # the text of tokens[:read_offset] (engine.py: detokenized incrementally)
    prefix_offset: int = 0  # tokens[prefix_offset:read_offset] decode to the end of `decoded`
    read_offset: int = 0
    finish_reason: str | None = None
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    aborted: bool = False
    error: BaseException | None = None  # routing failed (the engine fails the request)
    runner_state: Any = None  # the runner's per-request data (sampling generator, text offsets)

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.sampling.max_tokens


@dataclass
class Step:
    admitted: list[Request]  # ready (routed, forced or static): to prefill, then join the batch
    running: list[Request]  # to decode one token each, together
    dropped: list[Request]  # aborted since the last step: leave the batch


class Scheduler:
    def __init__(self, max_batch: int, kv_bytes_per_token: int, kv_budget: int | None = None, max_queue: int = 256):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = int(max_batch)
        self.kv_bytes_per_token = int(kv_bytes_per_token)
        self.kv_budget = kv_budget
        self.max_queue = int(max_queue)
        self.waiting: deque[Request] = deque()
        self.routing: list[Request] = []  # admitted, with the router (queued or in its forward)
        self._to_route: list[Request] = []  # the part of `routing` the router has not taken yet
        self.ready: list[Request] = []  # admitted and decided: prefilled at the next step
        self.running: list[Request] = []
        self._dropped: list[Request] = []
        self._cv = threading.Condition()  # two threads wait on it (engine, router): notify_all
        self.closed = False

    # ---- called by the API (any thread) ----------------------------------------------------------
    def fits_alone(self, req: Request) -> bool:
        """Whether the request could ever be admitted (alone, into an empty batch)."""
        return self.kv_budget is None or req.reserved_tokens * self.kv_bytes_per_token <= self.kv_budget

    def submit(self, req: Request) -> None:
        with self._cv:
            if self.closed:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (limit {self.max_queue})")
            req.state = WAITING
            self.waiting.append(req)
            self._cv.notify_all()

    def abort(self, req: Request) -> None:
        """The client is gone: the request leaves at the next step and its slot is free."""
        with self._cv:
            if req.state == FINISHED or req.aborted:
                return
            req.aborted = True
            if req.state == WAITING:
                self.waiting.remove(req)
                self._finish(req, "abort")
            else:
                self._dropped.append(req)
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()

    # ---- called by the engine thread ------------------------------------------------------------
    def schedule(self, timeout: float | None = None) -> Step | None:
        """The next step; blocks while there is nothing to do (None: closed, or the timeout).
        Routed requests admitted now go to the router, not into this step."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._work() or self.closed, timeout) or self.closed:
                return None
            dropped, self._dropped = self._dropped, []
            for r in dropped:
                for queue in (self.running, self.ready, self.routing, self._to_route):
                    if r in queue:
                        queue.remove(r)
                self._finish(r, "abort")
            admitted, self.ready = self.ready, []
            while self.waiting and self._admissible(self.waiting[0], admitted):
                r = self.waiting.popleft()
                if r.target[0] == "routed":
                    r.state = ROUTING
                    self.routing.append(r)
                    self._to_route.append(r)
                    self._cv.notify_all()  # the router
                else:
                    r.state = READY
                    admitted.append(r)
            return Step(admitted, list(self.running), dropped)

    def _work(self) -> bool:
        """Whether the engine has a step to run: aborts to clear, ready or running rows, or a
        request to admit (one that must wait for the router's rows to leave is not)."""
        return bool(self._dropped or self.ready or self.running
                    or (self.waiting and self._admissible(self.waiting[0], [])))

    def _admissible(self, req: Request, admitted: list[Request]) -> bool:
        rows = len(self.running) + len(self.routing) + len(admitted)
        if rows >= self.max_batch:
            return False
        if rows == 0 or self.kv_budget is None:  # alone it always runs (the API refuses what cannot fit)
            return True
        longest = max([req.reserved_tokens] + [r.reserved_tokens for r in (*self.running, *self.routing, *admitted)])
        return (rows + 1) * longest * self.kv_bytes_per_token <= self.kv_budget

    def started(self, req: Request) -> None:
        """Prefilled: the request joins the running batch (unless aborted meanwhile)."""
        with self._cv:
            if req.state == FINISHED:
                return
            req.state = RUNNING
            self.running.append(req)

    def finish(self, req: Request, reason: str) -> None:
        with self._cv:
            for queue in (self.running, self.ready, self.routing, self._to_route, self._dropped):
                if req in queue:
                    queue.remove(req)
            self._finish(req, reason)
            self._cv.notify_all()  # its rows are free: a waiting request may be admissible now

    @staticmethod
    def _finish(req: Request, reason: str) -> None:
        if req.state != FINISHED:
            req.state = FINISHED
            req.finish_reason = reason

    # ---- called by the router thread ------------------------------------------------------------
    def take_routing(self, timeout: float | None = None) -> list[Request] | None:
        """Every request admitted for routing since the last call; blocks while there is none
        (None: closed, or the timeout)."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._to_route or self.closed, timeout) or self.closed:
                return None
            reqs, self._to_route = self._to_route, []
            return reqs

    def routed(self, reqs: list[Request]) -> None:
        """Routed (decision set, or `error`): ready for the next step, unless aborted meanwhile."""
        with self._cv:
            for r in reqs:
                if r in self.routing:
                    self.routing.remove(r)
                if r.state == ROUTING:
                    r.state = READY
                    self.ready.append(r)
            self._cv.notify_all()

    def load(self) -> dict:
        with self._cv:
            return {"waiting": len(self.waiting), "routing": len(self.routing) + len(self.ready),
                    "running": len(self.running)}
