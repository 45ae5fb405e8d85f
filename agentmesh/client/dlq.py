"""The dead-letter queue as a library: list, show, select, retry, drop, edit (`Mesh.dlq`).

Every action is first written to the audit log (an outbox row, so it reaches Kafka and shows
in a replay of the message's session) with who did it (`mesh.operator`) and why, *before* it
is carried out; each is then one atomic Lua step in Redis (agentmesh.bus.dlq), so two
operators acting on one entry cannot both win: the second finds it already gone.

Retry and edit re-validate envelopes against the registry: the caller must have imported
the module that defines the agents (and so registers their event types). Both refuse an
envelope over `MESH_MAX_ENVELOPE_BYTES`, and a retry returns an entry only to the stream
its type is registered on: a planted entry that names another stream is refused (and
reported; a retry of many entries goes on with the rest), never moved there.
"""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from agentmesh.bus import dlq as steps
from agentmesh.client.dlq_entries import DlqEntry, DlqFilter, read_all, read_one, xrange
from agentmesh.client.errors import Conflict, InvalidRequest, MeshError, NotFound
from agentmesh.client.limits import oversize
from agentmesh.outbox.operator import record_operator_action
from agentmesh.schemas import PoisonMessage, registry

if TYPE_CHECKING:
    from agentmesh.client.mesh import Mesh

__all__ = ["DeadLetters", "DlqEdit", "DlqEntry", "DlqFilter", "DlqOutcome"]

OnProgress = Callable[[int, int], None]

_DLQ_ID = re.compile(r"\d+-\d+")


@dataclass(frozen=True, kw_only=True)
class DlqOutcome:
    """What became of one entry a retry or drop was asked for."""

    id: str
    done: bool
    detail: str  # where it went (stream and new entry id), or why it was skipped
    audit_event_id: str | None = None  # None: refused before anything was recorded


@dataclass(frozen=True, kw_only=True)
class DlqEdit:
    id: str  # the entry edited (gone now)
    new_id: str  # the edited entry's DLQ id: retry this one
    audit_event_id: str
    payload: Any  # the new payload


def _invalid(raw: bytes) -> str | None:
    """None when the envelope decodes against its schema, else why not."""
    try:
        registry.decode(raw)
    except PoisonMessage as exc:
        return f"{exc.reason}: {exc}"
    return None


def _not_home(e: DlqEntry) -> str | None:
    """None when the entry names the stream its (valid) envelope's type is registered on;
    else why a retry must not put it there."""
    event_type = registry.decode(e.raw).envelope.type
    home = registry.get(event_type).stream
    if home == e.stream:
        return None
    return (f"refused: the entry names stream {e.stream!r}, but {event_type} travels on "
            f"{home!r}; not moved (a planted entry?)")  # fmt: skip


def _str(value: Any) -> str | None:
    """A field of an envelope from the wire, if it is text (it may be anything)."""
    return value if isinstance(value, str) else None


def _before_after(before: Any, after: dict[str, Any]) -> dict[str, Any]:
    """What the audit log keeps of an edit: the payloads, and the envelope fields that changed."""
    old = before if isinstance(before, dict) else {"unreadable": str(before)[:2000]}
    changed = sorted(k for k in {*old, *after} - {"payload"} if old.get(k) != after.get(k))
    return {
        "before": old.get("payload"),
        "after": after.get("payload"),
        "envelope_fields_changed": {k: [old.get(k), after.get(k)] for k in changed},
    }


class DeadLetters:
    """`Mesh.dlq`: the operator's hands on the dead-letter stream (`settings.dlq_stream`)."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    @property
    def stream(self) -> str:
        return self._mesh.settings.dlq_stream

    # -- reading --------------------------------------------------------------------------
    async def depth(self) -> int:
        """How many entries the DLQ holds (one XLEN; nothing is decoded)."""
        return int(await self._mesh.redis.xlen(self.stream))

    async def list(self, flt: DlqFilter | None = None) -> builtins.list[DlqEntry]:
        """The entries `flt` matches (all without one), oldest first."""
        return await read_all(self._mesh.redis, self.stream, flt or DlqFilter())

    async def show(self, dlq_id: str) -> DlqEntry:
        """One entry, with its envelope, reason, delivery history and traceback."""
        if not _DLQ_ID.fullmatch(dlq_id):
            raise InvalidRequest(f"bad DLQ id {dlq_id!r}: expected an id like 1700000000000-0")
        entry = await read_one(self._mesh.redis, self.stream, dlq_id)
        if entry is None:
            raise NotFound(f"no DLQ entry {dlq_id} in {self.stream}")
        return entry

    async def select(
        self,
        dlq_id: str | None = None,
        *,
        everything: bool = False,
        flt: DlqFilter | None = None,
    ) -> builtins.list[DlqEntry]:
        """The entries an action is for: one by id, those a filter matches, or all of them
        (exactly one of the three)."""
        if sum((dlq_id is not None, everything, flt is not None)) != 1:
            raise InvalidRequest("choose the entries: an id, a filter, or everything (exactly one)")
        if dlq_id is not None:
            return [await self.show(dlq_id)]
        return await self.list(flt)

    # -- acting ---------------------------------------------------------------------------
    async def retry(
        self,
        entries: Sequence[DlqEntry],
        *,
        reason: str = "",
        on_progress: OnProgress | None = None,
    ) -> builtins.list[DlqOutcome]:
        """Put entries back onto their original stream: same bytes and so the same event id,
        delivery count reset. An envelope its schema refuses is skipped (edit it first)."""
        outcomes = []
        for done, e in enumerate(entries, 1):
            outcomes.append(await self._retry_one(e, reason))
            if on_progress is not None:
                on_progress(done, len(entries))
        return outcomes

    async def drop(
        self,
        entries: Sequence[DlqEntry],
        *,
        reason: str,
        force: bool = False,
        on_progress: OnProgress | None = None,
    ) -> builtins.list[DlqOutcome]:
        """Remove entries for good. A message of a session agents have acted in and that has
        not ended is kept (dropping it would strand the session) unless `force`."""
        if not reason.strip():
            raise InvalidRequest("a drop needs a reason: say why the entries are dropped")
        outcomes = []
        for done, e in enumerate(entries, 1):
            outcomes.append(await self._drop_one(e, reason, force))
            if on_progress is not None:
                on_progress(done, len(entries))
        return outcomes

    async def edit(
        self,
        dlq_id: str,
        *,
        payload: dict[str, Any] | None = None,
        envelope: dict[str, Any] | None = None,
        reason: str = "",
    ) -> DlqEdit:
        """Replace an entry's payload, or its whole envelope (for one whose envelope itself is
        broken, e.g. without an event_id). The result must pass its schema; it is kept as a
        new DLQ entry (its id in `DlqEdit.new_id`) for a retry to re-drive."""
        if (payload is None) == (envelope is None):
            raise InvalidRequest("give a new payload or a new envelope (exactly one)")
        entry = await self.show(dlq_id)
        if envelope is not None:
            if not isinstance(envelope, dict):
                raise InvalidRequest("envelope must be a JSON object")
            edited, what = envelope, "envelope"
        else:
            if not isinstance(entry.envelope, dict):
                raise MeshError(
                    f"entry {dlq_id} is not a JSON envelope: fix it whole with --envelope"
                )
            if not isinstance(payload, dict):
                raise InvalidRequest("payload must be a JSON object")
            edited, what = {**entry.envelope, "payload": payload}, "payload"
        raw = json.dumps(edited, separators=(",", ":")).encode()
        if too_big := oversize(raw, self._mesh.settings):
            raise InvalidRequest(f"edited {what}: {too_big}; nothing changed")
        invalid = _invalid(raw)
        if invalid:
            raise InvalidRequest(f"edited {what} is still invalid, nothing changed: {invalid}")
        new_id, audit_id = await self._replace(entry, raw, reason, edited)
        return DlqEdit(id=dlq_id, new_id=new_id, audit_event_id=audit_id,
                       payload=edited.get("payload"))  # fmt: skip

    # -- one entry ------------------------------------------------------------------------
    async def _record(
        self, action: str, e: DlqEntry, reason: str, env: dict[str, Any], detail: dict[str, Any]
    ) -> str:
        """The audit row, committed before the action it describes; its event id."""
        audit = await record_operator_action(
            await self._mesh.pg(),
            operator=self._mesh.operator,
            action=f"dlq.{action}",
            reason=reason,
            target=e.id,
            session_id=_str(env.get("session_id")),
            event_id=_str(env.get("event_id")),
            stream=e.stream,
            detail=detail,
        )
        return audit.event_id

    @staticmethod
    def _why(e: DlqEntry) -> dict[str, Any]:
        return {"dlq_reason": e.reason, "agent": e.agent, "error": e.error[:500]}

    async def _retry_one(self, e: DlqEntry, reason: str) -> DlqOutcome:
        if too_big := oversize(e.raw, self._mesh.settings):
            return DlqOutcome(id=e.id, done=False, detail=f"refused: {too_big}")
        invalid = _invalid(e.raw)
        if invalid:
            return DlqOutcome(
                id=e.id, done=False, detail=f"invalid ({invalid}); fix it with mesh dlq edit"
            )
        if elsewhere := _not_home(e):
            return DlqOutcome(id=e.id, done=False, detail=elsewhere)
        env = e.envelope if isinstance(e.envelope, dict) else {}
        audit_id = await self._record("retry", e, reason, env, self._why(e))
        try:
            new_id = await steps.retry(
                self._mesh.redis,
                dlq_stream=self.stream,
                dlq_id=e.id,
                stream=e.stream,
                group=e.group,
                entry_id=e.entry_id,
                envelope=e.raw,
            )
        except ResponseError as exc:  # the Lua step's own check (bus/lua/dlq_retry.lua)
            return DlqOutcome(id=e.id, done=False, detail=f"refused: {exc}",
                              audit_event_id=audit_id)  # fmt: skip
        detail = f"{e.stream} {new_id}" if new_id else "already gone"
        return DlqOutcome(id=e.id, done=new_id is not None, detail=detail,
                          audit_event_id=audit_id)  # fmt: skip

    async def _drop_one(self, e: DlqEntry, reason: str, force: bool) -> DlqOutcome:
        env = e.envelope if isinstance(e.envelope, dict) else {}
        session_id = _str(env.get("session_id"))
        if not force and session_id is not None:
            step = await self._open_step(session_id)
            if step:
                return DlqOutcome(id=e.id, done=False, detail=(
                    f"session {session_id} is still open ({step}): dropping this message "
                    "would leave it unfinished; retry it, or drop with --force"))  # fmt: skip
        audit_id = await self._record("drop", e, reason, env, self._why(e))
        done = await steps.drop(self._mesh.redis, dlq_stream=self.stream, dlq_id=e.id)
        return DlqOutcome(id=e.id, done=done, detail="dropped" if done else "already gone",
                          audit_event_id=audit_id)  # fmt: skip

    async def _open_step(self, session_id: str) -> str | None:
        """Where a session that agents have acted in, and that has not ended, stands; else
        None. A message dead-lettered mid-saga (a payment after its hold) is such a case."""
        state = await self._mesh.session(session_id)
        if state is None or state.status == "ended":
            return None
        return f"{state.status}: {state.step}"

    async def _replace(
        self, entry: DlqEntry, raw: bytes, reason: str, edited: dict[str, Any]
    ) -> tuple[str, str]:
        """The edited entry, appended to the DLQ in place of the old one (one Lua step, after
        the audit row); the new DLQ id and the audit event id."""
        redis = self._mesh.redis
        page = await xrange(redis, self.stream, entry.id, entry.id)
        gone = Conflict(f"DLQ entry {entry.id} is already gone (another operator acted)")
        if not page:
            raise gone
        audit_id = await self._record(
            "edit", entry, reason, edited, _before_after(entry.envelope, edited)
        )
        fields = {
            **page[0][1],
            b"envelope": raw,
            b"edited_by": self._mesh.operator.encode(),
            b"edited_from": entry.id.encode(),
        }
        new_id = await steps.replace(redis, dlq_stream=self.stream, dlq_id=entry.id,
                                     fields=fields)  # fmt: skip
        if new_id is None:
            raise gone
        return new_id, audit_id
