"""`postdeploy webhook`: the push trigger.

Git hosts POST a signed push event; the service checks the signature, finds the
apps the push is for and queues their ``postdeploy.check_app`` (the same
idempotent reconciliation as the poll), then answers 202 with their names. It
never runs git itself, so it answers in milliseconds however many apps there are.

The HTTP server is Tornado: it comes with Flower (no new dependency), is an
asynchronous production server that keeps thousands of slow connections open
without a thread each, lets a handler look at the headers before the body
arrives (so an oversized body is refused unread) and limits body size and time.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import socket
import time
from typing import Any

import tornado.httpserver

from postdeploy.config.redaction import redact_url
from postdeploy.config.settings import Settings
from postdeploy.errors import ConfigError
from postdeploy.store.celery_app import app as celery_app
from postdeploy.store.celery_app import configure
from postdeploy.store.connection import redis_client, resolve_redis_url
from postdeploy.webhook.dispatch import Dispatcher
from postdeploy.webhook.http import MAX_BODY, HookServer
from postdeploy.webhook.match import AppIndex, Push
from postdeploy.webhook.processes import STOP_SIGNALS, listen_sockets, run_servers, stop_event
from postdeploy.webhook.providers import PROVIDERS, Event, Headers, HookRejected, Provider
from postdeploy.webhook.state import Delivery, WebhookState

log = logging.getLogger(__name__)

BODY_TIMEOUT = 10.0  # seconds a client may take to send its body
# Bodies over MAX_BODY are still read (and dropped) up to this size to answer 413;
# a longer chunked body gets the connection closed instead.
READ_LIMIT = 4 * MAX_BODY
STOP_TIMEOUT = 5.0  # seconds the requests in hand get to be answered at shutdown
CHECK_TASK = "postdeploy.check_app"
# Seconds a delivery waits for Redis and the broker before it is answered 503: git
# hosts give up on an answer after 10 s, and a 503 tells them to retry.
QUEUE_DEADLINE = 4.0
REDIS_TIMEOUT = 2.0  # seconds one Redis call of the service may take; it retries once
GC_YOUNG = 10_000  # new objects between two collections of the youngest generation
NO_SECRET = ("POSTDEPLOY_WEBHOOK_SECRET is not set; the webhook service only accepts signed "
             "pushes: set it to a long random value (e.g. `openssl rand -hex 32`) and give the "
             "git host the same secret")


class WebhookService:
    """Turns one verified request into queued checks and an answer (no HTTP here)."""

    def __init__(self, secret: str, index: AppIndex, dispatcher: Dispatcher) -> None:
        self.secret = secret
        self.index = index
        self.dispatcher = dispatcher

    async def handle(self, provider: Provider, headers: Headers, named: list[str],
                     body: bytes, peer: str) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) for one request whose size and type were checked."""
        arrived = time.time()
        signature = headers.get(provider.signature_header)
        if not signature:
            raise HookRejected(401, f"missing {provider.signature_header} header; set the "
                                    "webhook's secret to POSTDEPLOY_WEBHOOK_SECRET")
        if not provider.verify(body, signature, self.secret):
            log.warning("%s webhook from %s: bad %s; nothing queued", provider.name, peer,
                        provider.signature_header)
            raise HookRejected(401, provider.mismatch.format(header=provider.signature_header))
        event = _classify(provider, headers, _json_object(body))
        if event.kind == "ping":
            log.info("%s webhook from %s: ping answered", provider.name, peer)
            return (200, {"status": "pong", "apps": []})
        if event.kind == "ignored" or event.push is None:
            return (202, {"status": "ignored", "apps": [],
                                "reason": f"event {event.name!r} is not a push"})
        push = event.push
        if push.deleted:
            log.info("%s push from %s deletes %s; nothing to check", provider.name, peer,
                     _shown(push.ref or "a ref"))
            return (202, {"status": "ignored", "apps": [],
                          "reason": "the push deletes its branch: no commit to run"})
        unknown = self.index.unknown([*named, *push.apps])
        if unknown:
            raise HookRejected(404, f"unknown app {unknown[0][:100]!r}; known apps: "
                                    f"{', '.join(sorted(self.index.apps)) or 'none'}")
        apps = sorted({*named, *push.apps, *self.index.matching(push)})
        delivery = Delivery(provider.name, provider.delivery_id(headers), tuple(apps), arrived)
        if not apps and delivery.delivery_id is None:
            _log_unmatched(provider, push, peer)
            return (202, {"status": "unmatched", "apps": []})
        try:
            fresh = await asyncio.wait_for(self.dispatcher.submit(delivery), QUEUE_DEADLINE)
        except TimeoutError:
            log.warning("%s webhook from %s: Redis did not answer within %g s; answered 503",
                        provider.name, peer, QUEUE_DEADLINE)
            raise HookRejected(503, f"Redis did not answer within {QUEUE_DEADLINE:g} s; "
                                    "retry later") from None
        except Exception as exc:
            raise HookRejected(503, f"cannot queue the check now ({type(exc).__name__}: "
                                    f"{redact_url(str(exc))}); retry later") from None
        if not fresh:
            log.info("%s webhook from %s: delivery %s seen before; nothing queued again",
                     provider.name, peer, delivery.delivery_id)
            return (200, {"status": "duplicate", "apps": [],
                                "delivery": delivery.delivery_id})
        if not apps:
            _log_unmatched(provider, push, peer)
            return (202, {"status": "unmatched", "apps": [],
                                "delivery": delivery.delivery_id})
        log.info("%s push %s (delivery %s): check queued for %s", provider.name,
                 push.ref or "", delivery.delivery_id or "-", ", ".join(apps))
        return (202, {"status": "queued", "apps": apps, "delivery": delivery.delivery_id})


def _log_unmatched(provider: Provider, push: Push, peer: str) -> None:
    urls = ", ".join(_shown(redact_url(u)) for u in push.repo_urls[:2]) or "no repository"
    log.info("%s push from %s: %s of %s matches no app", provider.name, peer,
             _shown(push.ref or "no ref"), urls)


def _shown(text: str) -> str:
    """``text`` for a log line: cut short, control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:200])


def _classify(provider: Provider, headers: Headers, payload: dict[str, Any]) -> Event:
    """The provider's reading of the payload; a shape it did not expect is a 400."""
    try:
        return provider.classify(headers, payload)
    except HookRejected:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as exc:
        raise HookRejected(400, f"the {provider.name} payload has an unexpected shape "
                                f"({type(exc).__name__}); send the host's push event") from None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except RecursionError:
        raise HookRejected(400, "the body nests JSON too deeply for a push event") from None
    except UnicodeDecodeError:
        raise HookRejected(400, "the body is not UTF-8 JSON") from None
    except ValueError as exc:
        hint = " (truncated?)" if "Expecting" in str(exc) or "Unterminated" in str(exc) else ""
        raise HookRejected(400, f"the body is not valid JSON{hint}: {exc}") from None
    if not isinstance(payload, dict):
        raise HookRejected(400, f"the body must be a JSON object, not {type(payload).__name__}")
    return payload


def check_settings(settings: Settings) -> str:
    """The secret, or ConfigError: the service never runs unsigned or without apps."""
    if not settings.webhook_secret:
        raise ConfigError(NO_SECRET)
    if not settings.apps:
        raise ConfigError("no apps to match pushes against; set POSTDEPLOY_REPO, or list "
                          "apps in postdeploy.yaml (POSTDEPLOY_CONFIG), as for the worker")
    return settings.webhook_secret


def serve(settings: Settings, address: str, port: int, processes: int = 1) -> int:
    """Run the service until SIGINT/SIGTERM; 0 then. Bad settings raise ConfigError."""
    secret = check_settings(settings)
    url = resolve_redis_url(settings)
    configure(settings, url)
    sockets = listen_sockets(address, port, processes)
    log.info("webhook: listening on http://%s:%d/hooks/{%s} for %d app(s), %d process(es)",
             address, port, ",".join(PROVIDERS), len(settings.apps), processes)
    return run_servers(sockets, lambda held: _serve(settings, secret, url, held))


def _serve(settings: Settings, secret: str, url: str, sockets: list[socket.socket]) -> int:
    """One server process: its own Redis and broker connections, its queueing thread."""
    client = redis_client(url, REDIS_TIMEOUT)
    # The broker's calls as well: a frozen Redis must not hold the queueing thread long.
    celery_app.conf.broker_transport_options = {
        **celery_app.conf.broker_transport_options, "socket_timeout": REDIS_TIMEOUT,
        "socket_connect_timeout": REDIS_TIMEOUT}
    expires = settings.check_interval  # a check still queued at the next poll is moot

    def send_check(app: str) -> None:
        celery_app.send_task(CHECK_TASK, args=[app], expires=expires, ignore_result=True)

    dispatcher = Dispatcher(WebhookState(client), send_check, expires)
    service = WebhookService(secret, AppIndex(settings.apps), dispatcher)
    # What is loaded by now lives as long as the process: the collector need not walk it
    # again. A delivery makes ~90 objects, so the default (collect every 700 new ones)
    # collected every 8 deliveries: 54 us of each delivery's CPU, 12 us with these.
    gc.freeze()
    gc.set_threshold(GC_YOUNG)
    dispatcher.start()
    try:
        return asyncio.run(_loop(service, sockets, len(settings.apps)))
    finally:
        dispatcher.stop()


async def _loop(service: WebhookService, sockets: list[socket.socket], apps: int) -> int:
    hooks = HookServer(service.handle, apps)
    server = tornado.httpserver.HTTPServer(
        hooks, max_body_size=READ_LIMIT, max_buffer_size=READ_LIMIT,
        body_timeout=BODY_TIMEOUT, idle_connection_timeout=60)
    server.add_sockets(sockets)
    await stop_event().wait()
    # Stopping already: a second signal (Ctrl-C reaches the parent and every server
    # process) is moot, and would hit the loop as it closes.
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    log.info("webhook: stopping")
    server.stop()  # no new connections; the requests in hand still get their answer
    await hooks.drain(STOP_TIMEOUT)
    try:
        await asyncio.wait_for(server.close_all_connections(), STOP_TIMEOUT)
    except TimeoutError:
        pass
    return 0
