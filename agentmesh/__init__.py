"""The `mesh` command, settings and the local stack: what ties agents/, bus/, outbox/, schemas/."""
