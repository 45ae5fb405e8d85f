"""`python -m agentmesh.process.healthcheck [--ready]`: the container's health check.

The image's HEALTHCHECK is exec form (no shell to expand `$MESH_HTTP_PORT`), so the port is
read here from the settings the process itself serves on (MESH_* and mesh.toml): a changed
MESH_HTTP_PORT is still the port probed. Exit 0 when /healthz (or /readyz) answers 200,
else 1 with one line why.
"""

from __future__ import annotations

import http.client
import sys

WILDCARD = {"0.0.0.0", "::", ""}


def probe(host: str, port: int, path: str, timeout: float = 3.0) -> tuple[bool, str]:
    """GET path; (answered 200, the status and body's first line, or why it failed)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read(300).decode("utf-8", "replace").splitlines()
        return resp.status == 200, f"{resp.status} {body[0] if body else ''}".strip()
    except OSError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = "/readyz" if "--ready" in args else "/healthz"
    from agentmesh.settings import Settings  # MESH_* and mesh.toml, as the process reads them

    try:
        s = Settings()
    except ValueError as exc:  # pydantic's ValidationError: the process would not start either
        print(f"settings invalid: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    host = "127.0.0.1" if s.http_host in WILDCARD else s.http_host
    port = s.http_port
    ok, detail = probe(host, port, path)
    print(f"{path} on {host}:{port}: {detail}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
