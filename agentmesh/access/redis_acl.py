"""Redis ACL users, one per agent type and one per kind of operator, from an `AccessPlan`.

An agent's user can run its consumer group on its input streams (XREADGROUP, XACK, XCLAIM,
XAUTOCLAIM, XPENDING, XINFO, XTRIM through trim.lua), XADD only to the streams it declares
it emits (through publish.lua, with their dedup keys) and to the DLQ, and touch its own
keys (failure history of its group's entries, its replicas' breaker reports, the shared
rate budgets of its dependencies). Redis 7
selectors keep these apart: a command passes when the root permissions or one selector allow
it with all its keys, and every command a Lua script runs is checked the same way, so an
EVALSHA of publish.lua naming a stream the agent does not emit is refused.

Operators: `mesh-read` reads everything; `mesh-approve` also publishes decisions onto the
decision types' streams; `mesh-dlq` also works the DLQ (retry onto any registered stream,
edit, drop) and re-drives stored handoffs; `mesh-publisher` publishes onto the entry streams
(those an agent reads and none writes: where work comes in).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis

from agentmesh.access.plan import AccessPlan, AgentAccess
from agentmesh.access.secrets import Secrets, redis_hash

#: What every user may do to hold a connection. CLIENT SETINFO, which redis-py sends, is left
#: out: Redis 7.0 does not know it, and redis-py ignores its refusal.
CONNECTION = (
    "+ping +hello +echo +select +client|setname +client|getname +client|id +multi +exec +discard"
)
#: What a consumer group runs on its input streams (trim.lua: EXISTS, XINFO, XPENDING, XTRIM).
CONSUMER = (
    "+xreadgroup +xack +xclaim +xautoclaim +xpending +xgroup|create +xgroup|delconsumer "
    "+xinfo|groups +xinfo|consumers +xinfo|stream +xtrim +exists +evalsha +script|load +time"
)
#: What publish.lua runs: SET NX of the dedup key, XADD of the event.
PUBLISH = "+evalsha +set +xadd"
READ_ALL = "+@read %R~*"

_GLOB = re.compile(r"([*?\[\]\\])")
_UNSAFE = re.compile(r"[\s()\"']")


def _key(pattern_prefix: str, name: str, suffix: str = "") -> str:
    """A key pattern for `name` taken literally (glob characters escaped)."""
    if _UNSAFE.search(name):
        raise ValueError(f"{name!r} cannot go into a Redis ACL rule: no spaces, quotes or ()")
    escaped = _GLOB.sub(r"\\\1", name)
    return f"{pattern_prefix}{escaped}{suffix}"


def _streams(prefix: str, streams: Iterable[str], dedup: bool) -> list[str]:
    out: list[str] = []
    for s in streams:
        out.append(_key(prefix, s))
        if dedup:
            out.append(_key(prefix, f"mesh:dedup:{s}:", "*"))
    return out


@dataclass(frozen=True, kw_only=True)
class AclUser:
    name: str
    rules: tuple[str, ...]  # root rules, then selectors "(...)"
    purpose: str

    def setuser_args(self, password_hash: str) -> list[str]:
        """The arguments of ACL SETUSER: a clean slate, on, the hash, the rules."""
        return [self.name, "reset", "on", f"#{password_hash}", *self.rules]


def _selector(*parts: str) -> str:
    return "(" + " ".join(p for p in parts if p) + ")"


def agent_user(a: AgentAccess, dlq_stream: str) -> AclUser:
    group = a.name
    _key("", a.name)  # the name goes into the user name and key patterns: check it
    rules: list[str] = ["-@all", *CONNECTION.split(), *CONSUMER.split()]
    rules += _streams("~", a.reads, dedup=False)
    if a.reads:  # first_copies: one MGET of its inputs' dedup keys, read only
        first = [_key("%R~", f"mesh:dedup:{s}:", "*") for s in a.reads]
        rules.append(_selector("+mget", *first))
    if a.writes:
        rules.append(_selector(PUBLISH, *_streams("~", a.writes, dedup=True)))
    rules.append(_selector("+xadd +xlen", _key("~", dlq_stream)))  # xlen: mesh_dlq_depth
    failures = [_key("~", f"mesh:failures:{s}:{group}:", "*") for s in a.reads]
    rules.append(_selector("+hsetnx +hset +hincrby +expire +hgetall +del", *failures))
    rules.append(_selector("+set", _key("~", f"mesh:breakers:{a.name}-", "*")))
    if a.budgets:  # budget.lua: the shared token buckets of its dependencies (TIME is in root)
        buckets = [_key("~", f"mesh:budget:{b}") for b in a.budgets]
        rules.append(_selector("+evalsha +hmget +hget +hset +expire", *buckets))
    return AclUser(
        name=a.redis_user,
        rules=tuple(rules),
        purpose=f"agent {a.name}: reads {', '.join(a.reads) or '-'}; "
        f"writes {', '.join(a.writes) or '-'} and the DLQ",
    )


def operator_users(plan: AccessPlan) -> list[AclUser]:
    base = ["-@all", *CONNECTION.split(), "+script|load", *READ_ALL.split()]
    dlq_keys = [
        _key("~", plan.dlq_stream),
        *_streams("~", plan.streams, dedup=True),
        "~mesh:failures:*",
    ]
    users = [
        AclUser(name="mesh-read", rules=tuple(base), purpose="operators: read everything"),
        AclUser(
            name="mesh-approve",
            rules=(*base, _selector(PUBLISH, *_streams("~", plan.decision_streams, dedup=True)))
            if plan.decision_streams
            else tuple(base),
            purpose="operators: read, and publish decisions (approve, reject)",
        ),
        AclUser(
            name="mesh-dlq",
            rules=(*base, _selector(PUBLISH, "+xdel +del", *dlq_keys)),
            purpose="operators: read, DLQ retry/edit/drop, redrive onto registered streams",
        ),
    ]
    if plan.entry_streams:
        users.append(
            AclUser(
                name="mesh-publisher",
                rules=(*base, _selector(PUBLISH, *_streams("~", plan.entry_streams, dedup=True))),
                purpose=f"publishers: new work onto {', '.join(plan.entry_streams)}",
            )
        )
    return users


def users_for(plan: AccessPlan) -> list[AclUser]:
    return [agent_user(a, plan.dlq_stream) for a in plan.agents] + operator_users(plan)


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def setuser_lines(users: Iterable[AclUser], secrets: Secrets) -> list[str]:
    """`ACL SETUSER ...` commands (for redis-cli), with password hashes, never passwords."""
    return [
        "ACL SETUSER " + " ".join(_quote(x) for x in u.setuser_args(_hash(u, secrets)))
        for u in users
    ]


def aclfile_lines(users: Iterable[AclUser], secrets: Secrets) -> list[str]:
    """Lines of a Redis `aclfile` (the default user is left to the file's own line)."""
    return ["user " + " ".join(u.setuser_args(_hash(u, secrets))) for u in users]


def _hash(u: AclUser, secrets: Secrets) -> str:
    return redis_hash(secrets.password("redis", u.name))


async def apply(redis: Redis, users: Iterable[AclUser], secrets: Secrets) -> list[str]:
    """ACL SETUSER each user on the server `redis` (an admin connection); their names."""
    names = []
    for u in users:
        await redis.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", *u.setuser_args(_hash(u, secrets))
        )
        names.append(u.name)
    return names
