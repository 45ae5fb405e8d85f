"""Waiting for the servers a process needs: a server that is down is waited for, a setting
that can never work fails the process at once.

A long-running process (an agent, a relay) may start before Redis, PostgreSQL or Kafka, or
while one of them restarts. It answers /healthz at once, says on /readyz what it waits for,
logs one line per server (repeated at most every `REPEAT_S`), backs off up to `MAX_BACKOFF_S`
between attempts, and becomes ready when the server answers. SIGTERM ends the wait at once.

What counts as *down* (wait) and what as *misconfigured* (fail now), by exception type:

PostgreSQL (asyncpg)
    down: OSError (connection refused or reset, no route, a timeout, a host name that does
    not resolve yet: in a compose or Kubernetes network a service's name only resolves once
    it runs); PostgresConnectionError (SQLSTATE class 08: the connection failed or was lost);
    OperatorInterventionError (57: "the database system is starting up", shutting down,
    crash recovery); InsufficientResourcesError (53: too many connections, disk full);
    PostgresSystemError (58: I/O error); InterfaceError (a connection closed under a call).
    misconfigured: a DSN asyncpg cannot parse (ClientConfigurationError, ValueError);
    InvalidAuthorizationSpecificationError (28: wrong password, unknown role, no pg_hba
    entry); InvalidCatalogNameError (3D000: the database does not exist); any other
    PostgresError (the server answered and refused what we asked: a missing table, a
    missing privilege), since asking again cannot change the answer.
Redis (redis-py)
    down: ConnectionError (refused, reset, unresolved host, BusyLoadingError while the AOF is
    replayed), TimeoutError, OSError, and the replies that mean "not now": READONLY (a
    replica during fail-over), TRYAGAIN, MASTERDOWN, CLUSTERDOWN, OOM, MISCONF (it cannot
    persist).
    misconfigured: a URL it cannot parse (ValueError); AuthenticationError and
    AuthorizationError (these subclass ConnectionError, so they are checked first); any
    other error reply (NOPERM, a DB index out of range, WRONGTYPE).
Any server
    misconfigured: its TLS certificate cannot be verified (another CA, another host name).
Kafka (aiokafka)
    misconfigured: a bootstrap address that cannot be parsed; authentication and
    authorization errors (SASL failures, topic or cluster authorization failed).
    down: everything else (no broker answered, timeouts, topic set-up that failed).

Anything else (a bug) is not judged here: it propagates as it is.

`Misconfigured` is a pydantic ValidationError naming the setting (MESH_POSTGRES_DSN …), so
whatever reports invalid settings reports it too: the `mesh` CLI prints
"error: invalid setting postgres_dsn: PostgreSQL at 127.0.0.1:5440: database "x" does not
exist" and exits 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import redis.exceptions as redis_errors
from aiokafka import errors as kafka_errors
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

T = TypeVar("T")

#: Seconds between two log lines about one outage.
REPEAT_S = 10.0
#: Longest pause between two attempts while waiting.
MAX_BACKOFF_S = 5.0
#: An attempt that has not answered after this long counts as "no answer" and is retried.
ATTEMPT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Server:
    """A server a process needs: its name for people, where it is, the setting naming it."""

    name: str
    address: str
    setting: str

    @classmethod
    def postgres(cls, dsn: str) -> Server:
        return cls("PostgreSQL", _host_port(dsn, 5432), "postgres_dsn")

    @classmethod
    def redis(cls, url: str) -> Server:
        return cls("Redis", _host_port(url, 6379), "redis_url")

    @classmethod
    def kafka(cls, bootstrap: str) -> Server:
        return cls("Kafka", bootstrap, "kafka_bootstrap")

    def waiting(self, reason: str) -> str:
        return f"waiting for {self.name} at {self.address}: {reason}"


def _host_port(url: str, default_port: int) -> str:
    """host:port of a URL, without user or password (they must not reach logs or /readyz)."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return parts.path
        netloc = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "(unparsable address)"
    if not netloc:
        return f"localhost:{default_port}"
    return netloc if ":" in netloc.rpartition("]")[2] else f"{netloc}:{default_port}"


class Misconfigured(ValidationError):
    """A setting that names a server the process can never use as configured: waiting would
    not help. Build it with `Misconfigured.of`."""

    @classmethod
    def of(cls, server: Server, reason: str) -> Misconfigured:
        context = {"server": server.name, "address": server.address, "reason": reason}
        detail = InitErrorDetails(
            type=PydanticCustomError("unusable_server", "{server} at {address}: {reason}", context),
            loc=(server.setting,),
            input=server.address,  # never the URL itself: it may hold a password
        )
        return cls.from_exception_data("Settings", [detail])

    def __str__(self) -> str:
        first = self.errors()[0]
        return f"invalid setting {first['loc'][0]}: {first['msg']}"


# -- judging an exception ---------------------------------------------------------------------
_PG_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.PostgresSystemError,
)
_REDIS_NOT_NOW: tuple[type[BaseException], ...] = (
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
    redis_errors.ClusterDownError,
    redis_errors.OutOfMemoryError,
)
_REDIS_NOT_NOW_CODES = ("MASTERDOWN", "CLUSTERDOWN", "MISCONF", "LOADING")  # no class of its own
_KAFKA_REFUSED: tuple[type[BaseException], ...] = (
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.AuthenticationFailedError,
    kafka_errors.AuthenticationMethodNotSupported,
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.IllegalSaslStateError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
)


def owner(exc: BaseException, default: Server, servers: dict[str, Server]) -> Server:
    """The server an exception came from: its library says so; OSError and the like belong
    to `default`, the server the failed step was talking to."""
    module = type(exc).__module__.split(".")[0]
    name = {"asyncpg": "PostgreSQL", "redis": "Redis", "aiokafka": "Kafka"}.get(module)
    return servers.get(name, default) if name else default


def outage_reason(server: Server, exc: BaseException) -> str | None:
    """Why `server` is down, if `exc` says it is; None when `exc` says nothing of the kind
    (a bug: the caller lets it propagate). Raises Misconfigured when waiting cannot help.
    The module docstring lists which exception is which."""
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in _chain(exc)):
        raise Misconfigured.of(server, _text(exc)) from exc  # wrong CA or host: no wait helps
    if server.name == "PostgreSQL":
        if isinstance(exc, asyncpg.exceptions.ClientConfigurationError | ValueError):
            raise Misconfigured.of(server, _text(exc)) from exc
        if isinstance(exc, _PG_DOWN) or (
            isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, ValueError)
        ):
            return describe(exc)
        if isinstance(exc, asyncpg.PostgresError):
            raise Misconfigured.of(server, _text(exc)) from exc
        return None
    if server.name == "Redis":
        if isinstance(exc, redis_errors.AuthenticationError | redis_errors.AuthorizationError):
            raise Misconfigured.of(server, _text(exc)) from exc
        if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError):
            return describe(exc)
        if isinstance(exc, _REDIS_NOT_NOW) or (
            isinstance(exc, redis_errors.ResponseError)
            and str(exc).startswith(_REDIS_NOT_NOW_CODES)
        ):
            return _text(exc)
        if isinstance(exc, redis_errors.RedisError | ValueError):
            raise Misconfigured.of(server, _text(exc)) from exc
        return None
    if isinstance(exc, _KAFKA_REFUSED):
        raise Misconfigured.of(server, _text(exc)) from exc
    return describe(exc)


def check_kafka_bootstrap(bootstrap: str) -> None:
    """Misconfigured unless every entry is host[:port] with a numeric port."""
    server = Server.kafka(bootstrap)
    for entry in bootstrap.split(","):
        host, sep, port = entry.strip().rpartition(":")
        if not entry.strip() or (sep and (not host or not port.isdigit())):
            raise Misconfigured.of(server, f"{entry.strip()!r} is not host:port")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 10:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def describe(exc: BaseException) -> str:
    """A few words for an outage: "connection refused", not the whole error."""
    for e in _chain(exc):
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "host name does not resolve"
        if isinstance(e, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
            return "connection lost"
        if isinstance(e, TimeoutError):
            return "no answer (timed out)"
    if isinstance(exc, kafka_errors.KafkaConnectionError) and "bootstrap" in str(exc):
        return "no broker answered"
    for e in _chain(exc):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror[:1].lower() + e.strerror[1:]
    return _text(exc)


def _text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return (text or type(exc).__name__)[:300]


# -- outages and waiting ----------------------------------------------------------------------
@dataclass
class Outage:
    server: Server
    reason: str
    since: float
    logged_at: float
    attempts: int = 1

    def fields(self, now: float) -> dict[str, Any]:
        """Log fields of a repeated line: for how long, how many attempts."""
        if self.attempts == 1:
            return {}
        return {"down_for_s": round(now - self.since, 1), "attempts": self.attempts}


@dataclass
class Outages:
    """The servers a process is waiting for now, and when it last said so in its log."""

    repeat_s: float = REPEAT_S
    clock: Callable[[], float] = time.monotonic
    current: dict[str, Outage] = field(default_factory=dict)

    def down(self, server: Server, reason: str) -> Outage | None:
        """Record a failed attempt; the outage when a log line is due (its first attempt, or
        `repeat_s` since the last line), else None. The reason is always the latest."""
        now = self.clock()
        o = self.current.get(server.name)
        if o is None:
            o = self.current[server.name] = Outage(server, reason, now, now)
            return o
        o.attempts += 1
        o.reason = reason
        if now - o.logged_at >= self.repeat_s:
            o.logged_at = now
            return o
        return None

    def up(self, server: Server) -> Outage | None:
        """The server answered: the outage that ended, if there was one."""
        return self.current.pop(server.name, None)

    def describe(self) -> str | None:
        """What the process waits for, for /readyz ("waiting for PostgreSQL at …: …")."""
        if not self.current:
            return None
        return "; ".join(o.server.waiting(o.reason) for o in self.current.values())


class Waiter:
    """Runs start-up steps that need a server, until they succeed or `stop` is set.

    `until_up(server, attempt)` retries `attempt` with capped exponential backoff while the
    server is down (`outage_reason`), logs "waiting for …" once and then at most every
    `repeat_s`, and returns the attempt's result; None when `stop` was set first. A
    misconfiguration raises `Misconfigured` at once; any other error propagates."""

    def __init__(
        self,
        stop: asyncio.Event,
        log: Any,
        outages: Outages,
        *,
        servers: tuple[Server, ...] = (),
        max_backoff_s: float = MAX_BACKOFF_S,
        attempt_timeout_s: float | None = ATTEMPT_TIMEOUT_S,
    ) -> None:
        self.stop, self.log, self.outages = stop, log, outages
        self.servers = {s.name: s for s in servers}
        self.max_backoff_s = max_backoff_s
        self.attempt_timeout_s = attempt_timeout_s

    async def until_up(
        self,
        server: Server,
        attempt: Callable[[], Awaitable[T]],
        *,
        undo: Callable[[], Awaitable[None]] | None = None,
    ) -> T | None:
        """`undo` cleans up after a failed or interrupted attempt (a half-open pool)."""
        backoff = 0.0
        waited: set[Server] = set()
        while not self.stop.is_set():
            try:
                result = await self._attempt(attempt)
            except _Stopped:
                await _quietly(undo)
                return None
            except Exception as exc:
                await _quietly(undo)
                culprit = owner(exc, server, {server.name: server, **self.servers})
                reason = outage_reason(culprit, exc)
                if reason is None:
                    raise
                backoff = min(self.max_backoff_s, max(0.2, backoff * 2))
                waited.add(culprit)
                self._note_down(culprit, reason, backoff)
                await sleep_or_stop(self.stop, backoff * random.uniform(0.8, 1.0))
                continue
            for s in waited:
                self._note_up(s)
            return result
        return None

    async def _attempt(self, attempt: Callable[[], Awaitable[T]]) -> T:
        task = asyncio.ensure_future(attempt())
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            done, _ = await asyncio.wait(
                {task, stopping},
                timeout=self.attempt_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if task in done:
                return task.result()
            if self.stop.is_set():
                raise _Stopped
            raise TimeoutError(f"no answer within {self.attempt_timeout_s:g} s")
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _note_down(self, server: Server, reason: str, retry_in: float) -> None:
        o = self.outages.down(server, reason)
        if o is None:
            return
        first = o.attempts == 1
        event = server.waiting(reason) if first else "still " + server.waiting(reason)
        self.log.warning(event, retry_in_s=round(retry_in, 1), **o.fields(self.outages.clock()))

    def _note_up(self, server: Server) -> None:
        o = self.outages.up(server)
        if o is not None:
            waited = round(self.outages.clock() - o.since, 1)
            self.log.info(f"{server.name} at {server.address} answers", waited_s=waited)


class _Stopped(Exception):
    pass


async def _quietly(undo: Callable[[], Awaitable[None]] | None) -> None:
    if undo is None:
        return
    with contextlib.suppress(Exception):
        await undo()


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less when `stop` is set meanwhile."""
    try:
        async with asyncio.timeout(seconds):  # not wait_for: it can swallow a cancel on 3.11
            await stop.wait()
    except TimeoutError:
        pass
