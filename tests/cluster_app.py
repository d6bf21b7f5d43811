"""The app the Ray cluster tests and bench_cluster host: ``tests.cluster_app:make_agents``."""

from __future__ import annotations

import rtqueue
from rtqueue.serve import CallInfo


@rtqueue.tool
def lookup_order(order_id: str) -> dict[str, str]:
    """Look up an order by its number.

    Args:
        order_id: The order number.
    """
    return {"order": order_id, "status": "shipped"}


def make_agents(call: CallInfo) -> rtqueue.Agent:
    """A support desk with an order tool and a billing agent to hand off to."""
    billing = rtqueue.Agent("billing", instructions="You are the billing agent.", description="Invoices.")
    return rtqueue.Agent("desk", instructions="You are the support desk.", tools=[lookup_order],
                         handoffs=[billing], description="Front desk.")
