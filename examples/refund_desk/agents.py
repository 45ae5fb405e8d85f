"""The refund desk: four agents, choreographed through events, no orchestrator.

intake   validates and classifies a ticket (too large: rejected at once)
risk     scores it and places a hold; above the threshold the session waits for a human
         (`mesh approve|reject`, or the deadline sweep, which expires it); it also owns the
         compensation: a rejected, expired or failed refund releases the hold
payments pays through the external gateway, behind a circuit breaker, with one idempotency
         key per ticket, so a retried or re-driven call never pays twice
notifier tells the customer and closes the ticket (the session's end)

Settings come from REFUND_* environment variables (DeskSettings), read and validated when
the module is imported.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from pydantic import Field, FilePath
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentmesh import (
    Agent,
    Budget,
    Context,
    Decision,
    DependencySpec,
    NonRetryable,
    RetryPolicy,
    Tick,
    decision_key,
    ended,
    registry,
    waiting,
)
from refund_desk.events import (
    ApprovalDecided,
    ApprovalRequested,
    Classified,
    HoldPlaced,
    HoldReleased,
    NotifyRequested,
    Outcome,
    RefundApproved,
    RefundFailed,
    RefundPaid,
    Ticket,
    TicketClosed,
)
from refund_desk.gateway_client import GatewayClient


class DeskSettings(BaseSettings):
    """The desk's own settings, from REFUND_* environment variables, validated at start."""

    model_config = SettingsConfigDict(env_prefix="REFUND_")

    max_cents: int = Field(default=500_000, gt=0, description="larger tickets are rejected")
    approval_score: int = Field(default=60, ge=0, le=101, description="from it, a human decides")
    approval_deadline_s: float = Field(default=600.0, gt=0, description="then it expires")
    gateway_url: str = Field(default="http://127.0.0.1:8099", pattern=r"^https?://")
    gateway_ca_file: FilePath | None = Field(
        default=None, description="CA of the gateway's certificate (else the system's)"
    )  # FilePath: a CA file that is not there stops the agent at start, not each payment
    gateway_timeout_s: float = Field(default=5.0, gt=0, description="one gateway call's limit")
    gateway_rate: float = Field(
        default=100.0, ge=0, description="gateway calls/s shared by all payments replicas; 0: none"
    )
    gateway_burst: int = Field(default=20, ge=1, description="gateway calls allowed at once")


DESK = DeskSettings()
MAX_REFUND_CENTS = DESK.max_cents
APPROVAL_SCORE = DESK.approval_score
DEADLINE_S = DESK.approval_deadline_s
GATEWAY_URL = DESK.gateway_url

intake = Agent("intake", emits=["ticket.classified", "notify.requested"])
risk = Agent(
    "risk",
    emits=[
        "hold.placed",
        "approval.requested",
        "refund.approved",
        "hold.released",
        "notify.requested",
    ],
)
payments = Agent(
    "payments",
    emits=["refund.paid", "refund.failed"],
    dependencies=[
        DependencySpec(
            name="gateway",
            fail_max=3,
            reset_timeout_s=2.0,
            retry=RetryPolicy(attempts=2, initial_s=0.1, max_s=0.5),
            # one budget for every replica: the gateway allows so many calls per second
            budget=Budget(rate=DESK.gateway_rate, burst=DESK.gateway_burst)
            if DESK.gateway_rate
            else None,
        )
    ],
)
notifier = Agent("notifier", emits=["ticket.closed"])

_KEYWORDS: list[tuple[str, str]] = [
    ("broken", "damaged"),
    ("damaged", "damaged"),
    ("never arrived", "not_received"),
    ("not received", "not_received"),
    ("late", "late"),
    ("wrong", "wrong_item"),
]
_WEIGHT = {"damaged": 10, "not_received": 30, "late": 5, "wrong_item": 15, "other": 20}


def classify(text: str) -> Any:
    lowered = text.lower()
    return next((cat for word, cat in _KEYWORDS if word in lowered), "other")


def score(ticket: Ticket, category: str) -> int:
    """0-100: one point per 10 currency units, plus how often the category is abused."""
    return min(100, ticket.amount_cents // 1000 + _WEIGHT[category])


# -- intake ------------------------------------------------------------------------------------
@intake.handler("ticket.submitted")
async def take_ticket(ticket: Ticket, ctx: Context) -> dict[str, Any]:
    if ticket.amount_cents > MAX_REFUND_CENTS:
        reason = f"amount {ticket.amount_cents} is over the desk's limit of {MAX_REFUND_CENTS}"
        ctx.emit(
            "notify.requested",
            NotifyRequested(
                ticket_id=ticket.ticket_id,
                customer=ticket.customer,
                outcome="rejected",
                reason=reason,
            ),
        )
        return {"rejected": reason}
    category = classify(ticket.text)
    ctx.emit("ticket.classified", Classified(ticket=ticket, category=category))
    return {"category": category}


# -- risk --------------------------------------------------------------------------------------
@risk.handler("ticket.classified")
async def assess(c: Classified, ctx: Context) -> dict[str, Any]:
    t = c.ticket
    points = score(t, c.category)
    hold_id = f"hold-{t.ticket_id}"
    ctx.emit(
        "hold.placed",
        HoldPlaced(
            ticket_id=t.ticket_id, hold_id=hold_id, amount_cents=t.amount_cents, score=points
        ),
    )
    if points < APPROVAL_SCORE:
        ctx.emit("refund.approved", RefundApproved(ticket=t, hold_id=hold_id, approved_by="auto"))
        return {"score": points, "approved_by": "auto"}
    deadline = time.time() + DEADLINE_S
    ctx.emit(
        "approval.requested",
        ApprovalRequested(
            ticket_id=t.ticket_id, score=points, threshold=APPROVAL_SCORE, deadline=deadline
        ),
    )
    return waiting(
        step="approval",
        decision_type="approval.decided",
        deadline=deadline,
        context={"ticket": t.model_dump(), "hold_id": hold_id},
        score=points,
    )


@risk.handler("approval.decided")
async def decided(d: ApprovalDecided, ctx: Context) -> dict[str, Any]:
    """Runs only for the step risk itself stored, still open (the framework refuses any other
    decision, agents/decisions.py); the ticket, its amount and the hold come from that step,
    never from the decision message."""
    if ctx.step is None:
        raise NonRetryable("a decision reached risk without its stored step")
    ticket = Ticket.model_validate(ctx.step.context["ticket"])
    hold_id = str(ctx.step.context["hold_id"])
    if d.decision == "approve":
        ctx.emit(
            "refund.approved",
            RefundApproved(ticket=ticket, hold_id=hold_id, approved_by=d.operator),
        )
        return {"decision": "approve", "by": d.operator}
    outcome: Outcome = "rejected" if d.decision == "reject" else "expired"
    why = d.reason or ("approval deadline passed" if outcome == "expired" else "rejected")
    ctx.emit("hold.released", HoldReleased(ticket_id=ticket.ticket_id, hold_id=hold_id, why=why))
    ctx.emit(
        "notify.requested",
        NotifyRequested(
            ticket_id=ticket.ticket_id, customer=ticket.customer, outcome=outcome, reason=why
        ),
    )
    return {"decision": d.decision, "by": d.operator, "reason": why}


@risk.handler("refund.failed")
async def compensate(f: RefundFailed, ctx: Context) -> dict[str, Any]:
    """The saga's compensation: the refund cannot be paid, so the hold is released."""
    t = f.ticket
    ctx.emit("hold.released", HoldReleased(ticket_id=t.ticket_id, hold_id=f.hold_id, why=f.error))
    ctx.emit(
        "notify.requested",
        NotifyRequested(
            ticket_id=t.ticket_id,
            customer=t.customer,
            outcome="compensated",
            reason=f"refund failed: {f.error}",
        ),
    )
    return {"released": f.hold_id}


@risk.every(1.0)
async def expire_waiting(tick: Tick) -> None:
    """The session deadline: an approval nobody gave in time is decided as `expire`. It shares
    the decision's idempotency key, so a human decision racing it still wins or loses whole."""
    from agentmesh.outbox.sessions import waiting_steps

    late = await waiting_steps(tick.pool, deadline_before=time.time(), limit=200)
    events = []
    for w in late:
        if w.agent != "risk":
            continue
        decision = Decision(
            decision="expire",
            operator="deadline",
            step=w.step,
            reason="approval deadline passed",
        )
        env = registry.make(
            w.decision_type,
            decision.model_dump(),
            session_id=w.session_id,
            idempotency_key=decision_key(w.session_id, w.step),
            source="risk:deadline",
        )
        events.append((registry.stream_of(w.decision_type) or "", env))
    if events:
        await tick.publish(events)


# -- payments ----------------------------------------------------------------------------------
class GatewayUnavailable(Exception):
    """An outage, a timeout or a 5xx: worth retrying, and it counts towards the breaker."""


class GatewayRefused(NonRetryable):
    """The gateway said no for good (a closed account, a bad request): compensate."""


#: 4xx answers that say nothing about the refund (our credentials, our URL, a rate limit):
#: retried and, if they last, dead-lettered with the hold kept, never compensated.
NOT_A_REFUSAL = frozenset({401, 403, 404, 405, 407, 408, 421, 429})

_gateway: GatewayClient | None = None


def gateway() -> GatewayClient:
    """This process's client of the gateway (one connection pool), made on first use."""
    global _gateway
    if _gateway is None:
        ca = DESK.gateway_ca_file
        _gateway = GatewayClient(
            GATEWAY_URL, ca_file=str(ca) if ca else None, timeout_s=DESK.gateway_timeout_s
        )
    return _gateway


async def _refund(key: str, ticket: Ticket) -> dict[str, Any]:
    body = {
        "ticket_id": ticket.ticket_id,
        "amount_cents": ticket.amount_cents,
        "account": ticket.account,
    }
    try:
        reply = await gateway().refund(key, body)
    except httpx.TransportError as exc:  # refused, TLS, timeout: the outcome may be unknown
        raise GatewayUnavailable(f"gateway unreachable: {type(exc).__name__}: {exc}") from None
    if reply.status in (200, 201):
        return reply.body
    if 400 <= reply.status < 500 and reply.status not in NOT_A_REFUSAL:
        raise GatewayRefused(f"gateway refused ({reply.status}): {reply.body.get('error')}")
    raise GatewayUnavailable(f"gateway answered {reply.status}: {reply.body.get('error')}")


@payments.handler("refund.approved", needs=["gateway"], timeout_s=30)
async def pay(wire: RefundApproved, ctx: Context) -> dict[str, Any]:
    # Pay what risk committed, not what the stream says: an approval XADDed by anyone else,
    # or changed on the way, is dead-lettered with the reason (agents/provenance.py).
    a = await ctx.verified_input(emitted_by="risk")
    if not isinstance(a, RefundApproved):
        raise NonRetryable(f"refund.approved loaded as {type(a).__name__}")
    key = f"refund:{a.ticket.ticket_id}"  # one per ticket: however often this runs, one payment
    try:
        paid = await ctx.call("gateway", _refund, key, a.ticket)
    except GatewayRefused as exc:
        ctx.emit("refund.failed", RefundFailed(ticket=a.ticket, hold_id=a.hold_id, error=str(exc)))
        return {"refused": str(exc)}
    ctx.emit(
        "refund.paid",
        RefundPaid(
            ticket_id=a.ticket.ticket_id,
            customer=a.ticket.customer,
            refund_id=paid["refund_id"],
            amount_cents=a.ticket.amount_cents,
            hold_id=a.hold_id,
        ),
    )
    return {"refund_id": paid["refund_id"], "replayed": paid.get("replayed", False)}


# -- notifier ----------------------------------------------------------------------------------
@notifier.handler("refund.paid")
async def tell_paid(p: RefundPaid, ctx: Context) -> dict[str, Any]:
    ctx.log.info("customer told: refund paid", customer=p.customer, ticket=p.ticket_id)
    ctx.emit("ticket.closed", TicketClosed(ticket_id=p.ticket_id, outcome="refunded"))
    return ended("refunded", refund_id=p.refund_id)


@notifier.handler("notify.requested")
async def tell_outcome(n: NotifyRequested, ctx: Context) -> dict[str, Any]:
    ctx.log.info("customer told", customer=n.customer, ticket=n.ticket_id, outcome=n.outcome)
    ctx.emit(
        "ticket.closed", TicketClosed(ticket_id=n.ticket_id, outcome=n.outcome, reason=n.reason)
    )
    return ended(n.outcome, n.reason)


# -- replay --state ----------------------------------------------------------------------------
@intake.projection("ticket.classified")
def _classified(state: dict[str, Any], c: Classified, env: object) -> None:
    state.update(
        ticket=c.ticket.ticket_id,
        amount_cents=c.ticket.amount_cents,
        category=c.category,
        status="classified",
    )


@risk.projection("hold.placed")
def _held(state: dict[str, Any], h: HoldPlaced, env: object) -> None:
    state.update(hold=h.hold_id, hold_state="placed", score=h.score)


@risk.projection("approval.requested")
def _asked(state: dict[str, Any], a: ApprovalRequested, env: object) -> None:
    state.update(status="waiting for approval")


@risk.projection("hold.released")
def _released(state: dict[str, Any], h: HoldReleased, env: object) -> None:
    state.update(hold_state="released", released_because=h.why)


@payments.projection("refund.paid")
def _paid(state: dict[str, Any], p: RefundPaid, env: object) -> None:
    state.update(refund_id=p.refund_id, hold_state="captured", status="paid")


@notifier.projection("ticket.closed")
def _closed(state: dict[str, Any], c: TicketClosed, env: object) -> None:
    state.update(status="closed", outcome=c.outcome, reason=c.reason)
