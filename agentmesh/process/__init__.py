"""What every long-running mesh process shares: the health/metrics server, logging, and the
crash points fault-injection tests use. Agents and relays import it; it imports nothing of
the mesh."""
