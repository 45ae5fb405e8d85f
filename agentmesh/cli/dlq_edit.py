"""`mesh dlq edit ID`: fix a dead-lettered message's payload (--payload, or in $EDITOR) or its
whole envelope (--envelope), over `Mesh.dlq.edit`. The editor is the CLI's part; the library
re-validates, records the edit in the audit log and swaps the entry."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import asdict
from typing import Annotated, Any

import typer

from agentmesh.cli.common import (
    EXIT_FAILED,
    EXIT_INPUT,
    JsonOpt,
    ModuleOpt,
    ReasonOpt,
    emit_json,
    fail,
    load_agents,
    out,
    read_json_arg,
    run,
    safe,
)
from agentmesh.client import DlqEdit, DlqEntry, Mesh

PayloadOpt = Annotated[
    str | None, typer.Option("--payload", "-p", help="New payload: JSON, @file or -.")
]
EnvelopeOpt = Annotated[
    str | None,
    typer.Option(
        "--envelope",
        help="A whole new envelope (JSON, @file or -), for an entry whose envelope itself "
        "is broken, e.g. without an event_id.",
    ),
]


def edit_cmd(
    ident: Annotated[str, typer.Argument(metavar="ID", help="DLQ entry id.")],
    payload: PayloadOpt = None,
    envelope: EnvelopeOpt = None,
    reason: ReasonOpt = "",
    module: ModuleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fix an entry's payload (--payload or $EDITOR) or whole envelope (--envelope).

    The result is re-validated before it is kept, and gets a new DLQ id; `mesh dlq retry
    NEW_ID` re-drives it."""
    load_agents(module)  # the event types, to re-validate the edited envelope
    if payload is not None and envelope is not None:
        fail("give --payload or --envelope, not both", EXIT_INPUT)
    new_payload = new_envelope = None
    if envelope is not None:
        new_envelope = read_json_arg(envelope, "envelope")
        if new_envelope is None:
            fail("envelope must be a JSON object", EXIT_INPUT)
    else:
        new_payload = (
            _in_editor(_current_payload(ident)) if payload is None else read_json_arg(payload)
        )
        if new_payload is None:  # JSON null: the library would take it for no payload at all
            fail("payload must be a JSON object", EXIT_INPUT)

    async def go() -> DlqEdit:
        async with Mesh() as mesh:
            return await mesh.dlq.edit(ident, payload=new_payload, envelope=new_envelope,
                                       reason=reason)  # fmt: skip

    edited = run(go())
    if as_json:
        emit_json(asdict(edited))
    else:
        out.print(f"edited {safe(ident)}: now DLQ entry {safe(edited.new_id)}; re-drive it with: "
                  f"mesh dlq retry {safe(edited.new_id)}")  # fmt: skip


def _current_payload(ident: str) -> Any:
    """The payload the editor opens with: the entry's own."""

    async def go() -> DlqEntry:
        async with Mesh() as mesh:
            return await mesh.dlq.show(ident)

    entry = run(go())
    if not isinstance(entry.envelope, dict):
        fail(f"entry {ident} is not a JSON envelope: fix it whole with --envelope", EXIT_FAILED)
    return entry.envelope.get("payload")


def _in_editor(payload: Any) -> Any:
    """`payload` as JSON in $VISUAL or $EDITOR (else vi); what was saved, parsed."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.NamedTemporaryFile("w+", suffix=".json", delete=False) as f:
        json.dump(payload, f, indent=2)
        path = f.name
    try:
        if subprocess.call([*editor.split(), path]) != 0:
            fail(f"editor {editor!r} exited with an error; nothing changed", EXIT_INPUT)
        with open(path) as f:
            text = f.read()
    finally:
        os.unlink(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"edited payload is not valid JSON, nothing changed: {exc}", EXIT_INPUT)
