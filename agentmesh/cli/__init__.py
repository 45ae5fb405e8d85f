"""The `mesh` command line: a leaf over the library. It parses arguments and renders what
`agentmesh.client.Mesh` returns; nothing in the library imports it."""

from agentmesh.cli.app import app, main

__all__ = ["app", "main"]
