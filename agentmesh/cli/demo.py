"""`mesh demo`: the refund desk (or the planner/writer pair) end to end on the local stack.

The demos live in the source checkout's examples/ folder, not in the installed package: this
command puts that folder on the path of this process and of every process a demo starts.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer

from agentmesh.cli.common import EXIT_FAILED, EXIT_INPUT, fail, out, settings
from agentmesh.cli.dev import stack_config


def _example(module: str) -> ModuleType:
    examples = Path(__file__).resolve().parents[2] / "examples"
    if not (examples / module.split(".")[0]).is_dir():
        fail("mesh demo runs from a source checkout: its examples/ folder was not found")
    if str(examples) not in sys.path:
        sys.path.insert(0, str(examples))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(examples), os.environ.get("PYTHONPATH")) if p
        )
    return importlib.import_module(module)


def demo(
    tickets: Annotated[
        int, typer.Option(min=10, max=5000, help="Refund tickets to publish.")
    ] = 300,
    mesh_name: Annotated[
        str, typer.Option("--mesh", help="refund (the refund desk) or planner (two agents).")
    ] = "refund",
    tasks: Annotated[int, typer.Option(min=1, max=1000, help="Tasks (--mesh planner).")] = 3,
    keep: Annotated[
        bool, typer.Option(help="Leave the desk (agents, relay, gateway, stack) running.")
    ] = False,
    publish_seconds: Annotated[
        float, typer.Option(min=0.5, max=600, help="Tickets flow in over this many seconds.")
    ] = 8.0,
    outage_seconds: Annotated[
        float, typer.Option(min=0, max=600, help="Gateway outage, 2 s after the first ticket.")
    ] = 4.0,
) -> None:
    """The refund desk end to end: stack up, every agent a process, tickets, summary, stop."""
    s = settings()
    if mesh_name == "planner":
        planner = _example("planner_writer.demo")
        result = planner.run_demo(s, stack_config(s), tasks=tasks, keep=keep, console=out)
        out.print(f"done in {result.elapsed_s:.1f} s")
        if result.completed < tasks:
            raise typer.Exit(EXIT_FAILED)
        return
    if mesh_name != "refund":
        fail(f"unknown mesh {mesh_name!r}; choose refund or planner", EXIT_INPUT)
    desk = _example("refund_desk.demo")
    plan = desk.DemoPlan(tickets=tickets, publish_s=publish_seconds, outage_s=outage_seconds,
                         outage_at_s=min(2.0, publish_seconds / 3))  # fmt: skip
    r = desk.run_refund_demo(s, stack_config(s), plan=plan, keep=keep, console=out)
    out.print(f"done in {r.elapsed_s:.1f} s")
    if not r.ok:
        fail("not every ticket settled (see the summary above)", EXIT_FAILED)
