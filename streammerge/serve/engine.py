"""The engine: one thread that drives the steps (scheduler -> runner -> requests) and turns each
new token into the request's events, and one that routes (scheduler.take_routing -> runner.route
-> scheduler.routed): the routing forward of the requests that arrive while a batch decodes runs
beside its steps instead of between them.

Events a request's `emit` receives, in order: ("routing", decision) once, ("text", delta) for
each piece of text that is final, then ("done", finish_reason, usage) or ("error", message).
Text is held back while it could still become a stop string, or ends in an incomplete
character; a stop string ends the request and is not part of the text (OpenAI's rule); EOS is
not part of the text either. Text is detokenized incrementally: each token decodes a window of
the last few tokens (the window before it and with it; what the second adds is new text), so a
token costs the same at any length; decoding the whole answer again every token made a step's
detokenization grow with the answer (0.22 us a token with a 32k BPE tokenizer: 7 ms a step for
32 rows of 1000 tokens).

A request that fails (its routing or its prefill raises, alone) finishes with an error event and
the others go on; a decode step that raises fails the rows of that step. The threads never die
of a request.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Sequence

from .metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Metrics
from .scheduler import Request, Scheduler


class Engine:
    def __init__(self, runner, scheduler: Scheduler, metrics: Metrics | None = None):
        self.runner, self.scheduler = runner, scheduler
        self.tokenizer = runner.tokenizer
        self.metrics = metrics or Metrics()
        self._declare_metrics()
        self._threads: list[threading.Thread] = []
        self.steps = 0

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._threads = [threading.Thread(target=loop, name=name, daemon=True)
                         for loop, name in ((self._loop, "streammerge-engine"), (self._route_loop, "streammerge-router"))]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self.scheduler.close()
        for t in self._threads:
            t.join(timeout=10)

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def submit(self, req: Request) -> None:
        self.scheduler.submit(req)  # QueueFull propagates: the API answers 429

    def abort(self, req: Request) -> None:
        self.scheduler.abort(req)

    # ---- the loop -------------------------------------------------------------------------------
    def _taken(self, take):
        """What `take` (a scheduler call that waits up to its timeout, None when there was
        nothing) hands out, until the scheduler closes."""
        while not self.scheduler.closed:
            got = take(timeout=1.0)
            if got is not None:
                yield got

    def _loop(self) -> None:
        for step in self._taken(self.scheduler.schedule):
            try:
                self._step(step)
            except Exception as e:  # a bug in a step must not end the server: fail what ran
                self._fail(list(self.runner.rows), e)

    def _route_loop(self) -> None:
        for reqs in self._taken(self.scheduler.take_routing):
            self._route(reqs)
            self.metrics.observe("streammerge_routing_size", len(reqs))
            self.scheduler.routed(reqs)

    def _route(self, reqs: Sequence[Request]) -> None:
        """Route together; if that fails, each alone, so only the request at fault fails (its
        `error`: the engine fails it in _admit, as it owns the requests' events)."""
        try:
            self.runner.route(reqs)
        except Exception as e:
            if len(reqs) > 1:
                for r in reqs:
                    self._route([r])
            else:
                traceback.print_exception(e)
                reqs[0].error = e

    def _step(self, step) -> None:
        if step.dropped:
            self.runner.remove(step.dropped)
            for r in step.dropped:
                self.metrics.inc("streammerge_requests_total", outcome="abort")
        if step.admitted:
            self._admit(step.admitted)
        rows = list(self.runner.rows)
        if not rows:
            return
        self.metrics.observe("streammerge_batch_size", len(rows))
        self.metrics.observe("streammerge_batch_decisions", len({r.decision.key for r in rows}))
        try:
            tokens = self.runner.decode([r.tokens[-1] for r in rows])
        except Exception as e:
            self._fail(rows, e)
            return
        self.steps += 1
        for r, t in zip(rows, tokens):
            self._token(r, t)

    def _admit(self, reqs: Sequence[Request]) -> None:
        failed = [r for r in reqs if r.error is not None]
        for r in failed:
            self._fail([r], r.error, log=False)  # the router thread logged it
        reqs = [r for r in reqs if r.error is None]
        try:
            self.runner.decide(reqs)
        except Exception as e:
            self._fail(reqs, e)
            return
        for r in reqs:
            d = r.decision
            self.metrics.inc("streammerge_decisions_total", mode=d.mode, task=d.task or "-")
            r.emit(("routing", d))
        live = [r for r in reqs if not r.aborted]  # the aborted: the scheduler finishes them next step
        if live:
            self.metrics.observe("streammerge_prefill_size", len(live))
            self._prefill(live)

    def _prefill(self, reqs: Sequence[Request]) -> None:
        """Prefill together; if that fails, each alone, so only the request at fault fails."""
        try:
            tokens = self.runner.prefill(reqs)
        except Exception as e:
            self.runner.remove(reqs)
            if len(reqs) > 1:
                for r in reqs:
                    self._prefill([r])
            else:
                self._fail(reqs, e)
            return
        for r, t in zip(reqs, tokens):
            self._started(r, t)

    def _started(self, r: Request, token: int) -> None:
        self.metrics.inc("streammerge_prompt_tokens_total", len(r.prompt_ids))
        self.scheduler.started(r)
        self._token(r, token)

    def _token(self, r: Request, token: int) -> None:
        now = time.monotonic()
        if r.first_token_at is None:
            r.first_token_at = now
            self.metrics.observe("streammerge_time_to_first_token_seconds", now - r.arrived)
        self.metrics.inc("streammerge_generated_tokens_total")
        r.generated += 1
        if token in self.runner.eos:
            self._finish(r, "stop")
            return
        r.tokens.append(token)
        if self._text(r):
            self._finish(r, "stop", flush=False)
        elif len(r.tokens) >= r.sampling.max_tokens:
            self._finish(r, "length")

    def _detokenize(self, r: Request, final: bool = False) -> None:
        """Extend r.decoded with the new tokens' text: tokens[prefix_offset:] decoded against
        tokens[prefix_offset:read_offset] (a window, so that a tokenizer joining pieces
        differently at a sequence's start, or dropping a leading space, gives the same text
        as decoding everything); held while it ends in an incomplete character, unless final."""
        decode = self.tokenizer.decode
        prefix = decode(r.tokens[r.prefix_offset : r.read_offset], skip_special_tokens=True)
        window = decode(r.tokens[r.prefix_offset :], skip_special_tokens=True)
        if len(window) > len(prefix) and (final or not window.endswith("\ufffd")):
            r.decoded += window[len(prefix) :]
            r.prefix_offset, r.read_offset = r.read_offset, len(r.tokens)

    def _text(self, r: Request, final: bool = False) -> bool:
        """Emit the text that is final; True when a stop string ended the request."""
        before = len(r.decoded)
        self._detokenize(r, final)
        text = r.decoded
        stops = r.sampling.stop
        if stops and len(text) > before:
            start = max(0, before - max(map(len, stops)) + 1)  # a stop may begin in the old text
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                r.text = text[: min(hits)]
                self._emit_text(r, len(r.text))
                return True
        r.text = text
        safe = len(text) - (max(map(len, stops)) - 1 if stops else 0)
        while safe > r.sent and text[safe - 1] == "\ufffd":  # an incomplete character, for now
            safe -= 1
        self._emit_text(r, safe)
        return False

    @staticmethod
    def _emit_text(r: Request, upto: int) -> None:
        if upto > r.sent:
            r.emit(("text", r.text[r.sent : upto]))
            r.sent = upto

    def _finish(self, r: Request, reason: str, flush: bool = True) -> None:
        # EOS or max_tokens: the text held back is final (an incomplete character too), and may
        # still hold a stop string
        if flush and self._text(r, final=True):
            reason = "stop"
        self._emit_text(r, len(r.text))
        self.runner.remove([r])
        self.scheduler.finish(r, reason)
        n, m = len(r.prompt_ids), r.generated
        usage = {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}
        self.metrics.inc("streammerge_requests_total", outcome=reason)
        self.metrics.observe("streammerge_request_latency_seconds", time.monotonic() - r.arrived)
        r.emit(("done", reason, usage))

    def _fail(self, reqs: Sequence[Request], e: BaseException, log: bool = True) -> None:
        if log:
            traceback.print_exception(e)  # the operator's log; the client gets one line
        msg = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        self.runner.remove(reqs)
        for r in reqs:
            self.scheduler.finish(r, "error")
            self.metrics.inc("streammerge_requests_total", outcome="error")
            r.emit(("error", msg))

    # ---- metrics --------------------------------------------------------------------------------
    def _declare_metrics(self) -> None:
        m = self.metrics
        m.counter("streammerge_requests_total", "Requests finished, by outcome (stop, length, abort, error).")
        m.counter("streammerge_prompt_tokens_total", "Prompt tokens prefilled.")
        m.counter("streammerge_generated_tokens_total", "Tokens generated.")
        m.counter("streammerge_decisions_total", "Routing decisions, by mode and task.")
        m.histogram("streammerge_request_latency_seconds", "Time from arrival to the last token.", LATENCY_BUCKETS)
        m.histogram("streammerge_time_to_first_token_seconds", "Time from arrival to the first token.", LATENCY_BUCKETS)
        m.histogram("streammerge_batch_size", "Rows in each decode step.", BATCH_BUCKETS)
        m.histogram("streammerge_prefill_size", "Requests prefilled together (one forward).", BATCH_BUCKETS)
        m.histogram("streammerge_routing_size", "Routed requests featurised together (one forward on the router thread).",
                    BATCH_BUCKETS)
        m.histogram("streammerge_batch_decisions", "Distinct routing decisions in each decode step.", BATCH_BUCKETS)
        m.gauge("streammerge_requests", "Requests now: waiting, routing (with the router, or routed and not yet prefilled), running.",
                lambda: {(("state", k),): v for k, v in self.scheduler.load().items()})
        m.gauge("streammerge_resident_bytes", "Bytes resident on the device, by part.",
                lambda: {(("part", k),): v for k, v in self.runner.resident_bytes().items()})
