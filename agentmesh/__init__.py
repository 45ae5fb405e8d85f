"""The `mesh` command, settings and the local stack that tie agents/, bus/, outbox/ and schemas/ together."""
