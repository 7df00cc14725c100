"""Queueing the commit checks that pushes ask for, off the HTTP event loop, in batches.

Redis and the broker are reached with blocking clients, so one thread does that
work while the event loop goes on answering. The deliveries of one turn of the
event loop are handed over together, and those that arrive while the thread is
busy form the next batch: one pipeline records all of them, and each app gets
one ``check_app`` per batch however many pushes named it. That is correct
because every check is sent after every push of its batch arrived, so it sees
at least their commits; and it keeps a stampede of deliveries (a busy
monorepo, a host redelivering a backlog) from becoming a stampede of checks.
Across batches and server processes, an app whose check is queued and not
started yet gets no second one (a mark in Redis, cleared by the check as it
starts): that check will see the new push's commit too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from postdeploy.webhook.state import Delivery, WebhookState

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0  # seconds stop() waits for the batch in hand


@dataclass
class _Pending:
    delivery: Delivery
    future: asyncio.Future[bool]
    loop: asyncio.AbstractEventLoop = field(repr=False)


class Dispatcher:
    """Records deliveries and sends one check per app and batch, in a thread of its own."""

    def __init__(self, state: WebhookState, send_check: Callable[[str], None],
                 check_expires: float) -> None:
        self.state = state
        self.send_check = send_check
        self.check_expires = check_expires  # seconds a queued check stays valid
        self._gathered: list[_Pending] = []  # submitted in this turn of the event loop
        self._pending: list[_Pending] = []  # handed to the thread
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="webhook-dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish what was submitted, then end the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(STOP_TIMEOUT)

    async def submit(self, delivery: Delivery) -> bool:
        """Record ``delivery`` and queue its apps' checks; False if it was a replay.

        Raises what Redis or the broker raised, having forgotten the delivery, so
        the host's retry counts as new. Called from one event loop.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._gathered.append(_Pending(delivery, future, loop))
        if len(self._gathered) == 1:  # the first of this turn of the loop
            loop.call_soon(self._hand_over)
        return await future

    def _hand_over(self) -> None:
        """Give the thread what this turn of the event loop gathered, in one go: a lock
        and a wake-up per delivery made a burst cost about an eighth more CPU."""
        gathered, self._gathered = self._gathered, []
        with self._wakeup:
            if not self._stopping:
                self._pending += gathered
                self._wakeup.notify()
                return
        for item in gathered:
            item.future.set_exception(RuntimeError("the webhook service is stopping"))

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._pending and not self._stopping:
                    self._wakeup.wait()
                batch, self._pending = self._pending, []
            if not batch:
                return  # stopping, nothing left
            self._dispatch(batch)

    def _dispatch(self, batch: list[_Pending]) -> None:
        deliveries = [item.delivery for item in batch]
        fresh: list[bool] = []
        apps: list[str] = []
        try:
            fresh = self.state.record(deliveries)
            pushed = sorted({app for item, new in zip(deliveries, fresh, strict=True) if new
                             for app in item.apps})
            apps = self.state.claim_checks(pushed, self.check_expires)
            for app in apps:
                self.send_check(app)
        except Exception as exc:
            log.warning("cannot queue the checks for %d push(es): %s", len(batch), exc)
            self._forget([d for d, new in zip(deliveries, fresh, strict=False) if new], apps)
            _settle(batch, [exc] * len(batch))
            return
        if apps:
            log.debug("queued checks of %s for %d push(es)", ", ".join(apps), len(batch))
        _settle(batch, fresh)

    def _forget(self, deliveries: list[Delivery], apps: list[str]) -> None:
        try:
            self.state.forget(deliveries)
            self.state.release_checks(apps)
        except Exception as exc:  # Redis is down: the marks may not even exist
            log.debug("cannot forget %d delivery mark(s): %s", len(deliveries), exc)


def _settle(batch: list[_Pending], outcomes: Sequence[bool | BaseException]) -> None:
    """Hand each waiting handler its outcome: one wake-up of each event loop per batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, bool | BaseException]]] = {}
    for item, outcome in zip(batch, outcomes, strict=True):
        by_loop.setdefault(item.loop, []).append((item, outcome))

    def settle(pairs: list[tuple[_Pending, bool | BaseException]]) -> None:
        for item, outcome in pairs:
            if item.future.done():  # the client went away and the handler was cancelled
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(settle, pairs)
        except RuntimeError:  # the event loop is already closed: nobody waits any more
            pass
