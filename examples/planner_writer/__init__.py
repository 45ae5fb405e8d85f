"""The planner/writer example mesh: `MESH_AGENTS_MODULE=planner_writer`.

Two agents hand a task across processes: planner -> writer. See agents.py; demo.py drives it.
"""

from planner_writer import agents as agents

__all__ = ["agents"]
