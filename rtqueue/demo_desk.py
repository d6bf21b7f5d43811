"""A retail support desk: the sample multi-agent app behind ``rtqueue demo``.

Five agents hand a customer to each other, and their tools are mocks over an
in-memory shop. ``examples/customer_service.py`` runs it interactively; the
demo runs a scripted customer through it. Everything here is plain app code:
it is also the reference for how to write agents and tools with rtqueue.
"""

from __future__ import annotations

import threading
from typing import Literal, TypedDict

from .agents import Agent, handoff
from .tools import tool

__all__ = ["DEMO_TURNS", "build_desk"]


class _Order(TypedDict):
    item: str
    status: str
    days_since_delivery: int | None
    price: float


_ORDERS: dict[str, _Order] = {
    "42": {"item": "wireless headphones", "status": "delivered", "days_since_delivery": 12, "price": 89.0},
    "77": {"item": "coffee grinder", "status": "shipped", "days_since_delivery": None, "price": 54.5},
}
_CUSTOMERS = {"ana@example.com": {"name": "Ana", "verified": True}}
_returns: dict[str, str] = {}
_lock = threading.Lock()


@tool
def verify_customer(email: str) -> dict[str, object]:
    """Verify a customer's identity by the email on their account.

    Args:
        email: The email address the customer gave.
    """
    # Lenient on purpose: voice models often pass part of an email ("ana" or "example").
    needle = email.strip().lower()
    match = next((addr for addr in _CUSTOMERS if needle and needle in addr), None)
    customer = _CUSTOMERS.get(match) if match else None
    return {"email": match or email, "verified": bool(customer), "name": customer["name"] if customer else None}


@tool
def lookup_order(order_id: str) -> dict[str, object]:
    """Look up an order: item, status and delivery date.

    Args:
        order_id: The order number, e.g. "42".
    """
    order = _ORDERS.get(order_id.strip("# "))
    if order is None:
        return {"order_id": order_id, "found": False}
    return {"order_id": order_id, "found": True, **order}


@tool
def check_refund_window(order_id: str) -> dict[str, object]:
    """Check whether the 30-day refund window is still open.

    Args:
        order_id: The order number to check.
    """
    order = _ORDERS.get(order_id.strip("# "))
    days = order.get("days_since_delivery") if order else None
    eligible = isinstance(days, int) and days <= 30
    return {"order_id": order_id, "eligible": eligible, "window_days": 30}


@tool
def create_rma(order_id: str, reason: Literal["damaged", "unwanted", "wrong_item"] = "unwanted") -> dict[str, str]:
    """Create an RMA shipping label for sending a parcel back.

    Args:
        order_id: The order number being sent back.
        reason: Why the customer sends it back.
    """
    with _lock:
        label = _returns.setdefault(order_id, f"RMA-{1000 + len(_returns)}")
    return {"order_id": order_id, "return_label": label, "reason": reason}


@tool
def search_products(query: str, max_results: int = 3) -> list[dict[str, object]]:
    """Search the product catalogue (sales).

    Args:
        query: What the customer is looking for.
        max_results: How many products to return.
    """
    catalogue = [
        {"name": "Studio headphones X2", "price": 129.0, "in_stock": True},
        {"name": "Travel headphones Lite", "price": 59.0, "in_stock": True},
        {"name": "Espresso grinder Pro", "price": 149.0, "in_stock": False},
    ]
    words = {w for w in query.lower().split() if len(w) > 2}
    hits = [p for p in catalogue if words & set(str(p["name"]).lower().split())] or catalogue
    return hits[: max(1, max_results)]


@tool
def create_ticket(reason: str) -> dict[str, str]:
    """Open a ticket so a human agent calls the customer back.

    Args:
        reason: The customer's problem, in their words.
    """
    return {"ticket": "TCK-5150", "reason": reason, "callback": "within 2 hours"}


def build_desk() -> Agent:
    """Build the desk's agents (they refer to each other by name) and return the front desk."""
    human = Agent(
        name="human",
        description="Escalate to a human colleague when the customer asks for a person.",
        instructions="You arrange a call back from a human colleague. Open a ticket, then say when they will call.",
        tools=[create_ticket],
        handoffs=["front_desk"],
    )
    sales = Agent(
        name="sales",
        description="Product questions and recommendations.",
        instructions="You are the sales desk. Recommend products from the catalogue; be brief.",
        tools=[search_products],
        handoffs=["front_desk", "human"],
    )
    returns = Agent(
        name="returns",
        description="Returns and refunds for existing orders.",
        instructions="You handle returns. Look the order up, check the refund window, then create the label.",
        tools=[lookup_order, check_refund_window, create_rma],
        handoffs=["front_desk", "sales", handoff("human", description="Only if the customer insists.")],
    )
    authentication = Agent(
        name="authentication",
        description="Verify the customer's identity before account changes.",
        instructions="Verify the customer by email with verify_customer, then route them.",
        tools=[verify_customer],
        handoffs=[returns, sales, human],
    )
    return Agent(
        name="front_desk",
        description="Greets customers and routes them.",
        instructions="You greet customers of the shop and route them to the right desk. Be brief.",
        handoffs=[authentication, returns, sales, human],
    )


#: The scripted customer of ``rtqueue demo``.
DEMO_TURNS: tuple[str, ...] = (
    "Hello! Before anything, I need authentication please.",
    "My email is ana@example.com, please verify me.",
    "Thanks. Now please put me through to returns about order 42.",
    "Is the refund window still open for 42?",
    "Great, please make a shipping label for 42.",
    "While I'm here, can sales suggest new headphones?",
    "This is taking long, I'd like to talk to a human.",
)
