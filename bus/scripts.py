"""The Lua scripts, loaded once per client. Each is one atomic server-side step where a
sequence of commands from the client would race with another consumer."""

from __future__ import annotations

from importlib.resources import files

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def _source(name: str) -> str:
    return files("agentmesh.bus").joinpath("lua", f"{name}.lua").read_text()


class Scripts:
    def __init__(self, redis: Redis) -> None:
        self.publish: AsyncScript = redis.register_script(_source("publish"))
        self.claim_own: AsyncScript = redis.register_script(_source("claim_own"))
        self.trim: AsyncScript = redis.register_script(_source("trim"))
        self.dlq_retry: AsyncScript = redis.register_script(_source("dlq_retry"))
        self.dlq_replace: AsyncScript = redis.register_script(_source("dlq_replace"))
        self.budget: AsyncScript = redis.register_script(_source("budget"))
        self.backlog: AsyncScript = redis.register_script(_source("backlog"))
