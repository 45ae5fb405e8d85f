"""The refund desk's wire format: one pydantic model per event type, and its stream.

A session is one ticket. Its path (each arrow is a Redis stream, each agent its own process):
ticket.submitted -> intake -> ticket.classified -> risk -> refund.approved -> payments ->
refund.paid -> notifier -> ticket.closed. Risk may wait for `mesh approve|reject`
(approval.decided); a failed refund comes back to risk as refund.failed, which releases the
hold (the saga's compensation). Events with no stream are recorded in the audit log only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from agentmesh import Decision, registry

Category = Literal["damaged", "not_received", "late", "wrong_item", "other"]
Outcome = Literal["refunded", "rejected", "compensated", "expired"]


class Ticket(BaseModel):
    ticket_id: str = Field(min_length=1, max_length=64)
    customer: str = Field(min_length=1, max_length=200)
    order_id: str = Field(min_length=1, max_length=64)
    amount_cents: int = Field(gt=0, le=10_000_000)
    text: str = Field(default="", max_length=5000)
    account: str = "open"  # the customer's payment account; "closed" makes the gateway refuse


class Classified(BaseModel):
    ticket: Ticket
    category: Category


class HoldPlaced(BaseModel):
    ticket_id: str
    hold_id: str
    amount_cents: int
    score: int


class ApprovalRequested(BaseModel):
    ticket_id: str
    score: int
    threshold: int
    deadline: float


class ApprovalDecided(Decision):
    pass


class RefundApproved(BaseModel):
    ticket: Ticket
    hold_id: str
    approved_by: str


class RefundPaid(BaseModel):
    ticket_id: str
    customer: str
    refund_id: str
    amount_cents: int
    hold_id: str


class RefundFailed(BaseModel):
    ticket: Ticket
    hold_id: str
    error: str


class HoldReleased(BaseModel):
    ticket_id: str
    hold_id: str
    why: str


class NotifyRequested(BaseModel):
    ticket_id: str
    customer: str
    outcome: Outcome
    reason: str = ""


class TicketClosed(BaseModel):
    ticket_id: str
    outcome: Outcome
    reason: str = ""


for name, model, stream in (
    ("ticket.submitted", Ticket, "refund:tickets"),
    ("ticket.classified", Classified, "refund:classified"),
    ("hold.placed", HoldPlaced, None),
    ("approval.requested", ApprovalRequested, None),
    ("approval.decided", ApprovalDecided, "refund:decisions"),
    ("refund.approved", RefundApproved, "refund:approved"),
    ("refund.paid", RefundPaid, "refund:paid"),
    ("refund.failed", RefundFailed, "refund:failed"),
    ("hold.released", HoldReleased, None),
    ("notify.requested", NotifyRequested, "refund:notify"),
    ("ticket.closed", TicketClosed, None),
):
    registry.register(name, model, stream=stream)
