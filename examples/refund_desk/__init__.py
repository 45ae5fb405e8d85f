"""The "refund desk" example mesh: `MESH_AGENTS_MODULE=refund_desk`.

See agents.py for the agents and events.py for the wire format. The payment gateway is an
external system; gateway_standin.py is a local stand-in for the demo and the tests.
"""

from refund_desk import agents as agents
from refund_desk import events as events
from refund_desk import projection as projection

__all__ = ["agents", "events", "projection"]
