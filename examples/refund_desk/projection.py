"""The refund desk's read model, folded from the audit log: one row per ticket (its hold, its
outcome, the day it closed), so open holds and refunds by outcome and day are one query away.

    mesh projection run refund_desk            # live; run several, they share the partitions
    mesh projection query refund_desk holds    # open holds now
    mesh projection query refund_desk by_day   # tickets and refunded cents by day and outcome
    mesh projection rebuild refund_desk        # from the start of the log, swapped in at once

Each event is folded once (the runner's exactly-once rule), so plain increments would do;
the updates are still written to land the same whatever order a ticket's events come in.
"""

from __future__ import annotations

from agentmesh import Projection, ProjectionTx, ReplayedEvent

desk = Projection(
    "refund_desk",
    table="""CREATE TABLE {table} (
        session_id      text PRIMARY KEY,
        ticket_id       text,
        hold_cents      bigint NOT NULL DEFAULT 0,
        hold_state      text,            -- placed, released, captured
        outcome         text,            -- refunded, compensated, rejected, expired
        refunded_cents  bigint NOT NULL DEFAULT 0,
        closed_day      date)""",
    types=["hold.placed", "hold.released", "refund.paid", "ticket.closed"],
    queries={
        "by_day": """SELECT closed_day AS day, outcome, count(*) AS tickets,
                            sum(refunded_cents) AS refunded_cents
                     FROM {table} WHERE outcome IS NOT NULL
                     GROUP BY closed_day, outcome ORDER BY closed_day, outcome""",
        "holds": """SELECT count(*) AS open_holds, coalesce(sum(hold_cents), 0) AS held_cents
                    FROM {table} WHERE hold_state = 'placed'""",
    },
)

# A hold ends as released or captured; a late "placed" never reopens it.
_HOLD = """CASE WHEN {t}.hold_state IN ('released', 'captured') THEN {t}.hold_state
           ELSE excluded.hold_state END"""


@desk.fold
async def fold(event: ReplayedEvent, tx: ProjectionTx) -> None:
    env, t = event.envelope, tx.table
    p = env.payload
    if env.type == "hold.placed":
        await tx.conn.execute(
            f"""INSERT INTO {t} (session_id, ticket_id, hold_cents, hold_state)
                VALUES ($1, $2, $3, 'placed') ON CONFLICT (session_id) DO UPDATE
                SET ticket_id = excluded.ticket_id, hold_cents = excluded.hold_cents,
                    hold_state = {_HOLD.format(t=t)}""",
            env.session_id, p.get("ticket_id"), int(p.get("amount_cents", 0)),
        )  # fmt: skip
    elif env.type in ("hold.released", "refund.paid"):
        state = "released" if env.type == "hold.released" else "captured"
        cents = int(p.get("amount_cents", 0)) if env.type == "refund.paid" else 0
        await tx.conn.execute(
            f"""INSERT INTO {t} (session_id, ticket_id, hold_state, refunded_cents)
                VALUES ($1, $2, $3, $4) ON CONFLICT (session_id) DO UPDATE
                SET hold_state = excluded.hold_state,
                    refunded_cents = {t}.refunded_cents + excluded.refunded_cents""",
            env.session_id, p.get("ticket_id"), state, cents,
        )  # fmt: skip
    elif env.type == "ticket.closed":
        await tx.conn.execute(
            f"""INSERT INTO {t} (session_id, ticket_id, outcome, closed_day)
                VALUES ($1, $2, $3, $4) ON CONFLICT (session_id) DO UPDATE
                SET outcome = excluded.outcome, closed_day = excluded.closed_day""",
            env.session_id, p.get("ticket_id"), p.get("outcome"), env.created_at.date(),
        )  # fmt: skip
