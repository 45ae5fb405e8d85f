"""Least-privilege credentials derived from the agents' own declarations.

`plan` reads what each agent type reads (its handlers' event types and their streams) and
writes (`Agent(emits=...)`); `redis_acl` turns that into Redis ACL users, `pg_roles` into
PostgreSQL roles and grants; `secrets` keeps their passwords in files, never on stdout.
"""

from agentmesh.access.plan import AccessPlan, AgentAccess, plan_for

__all__ = ["AccessPlan", "AgentAccess", "plan_for"]
