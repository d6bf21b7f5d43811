"""The request-handler base of rtqueue's small loopback HTTP servers.

``rtqueue serve``'s worker endpoints, the simulator's phone network and the
Twilio voice webhook each answer a few requests with one body. They share how
a reply is written and how requests are logged: at debug level on the
server's own logger, the request line only (never headers, so never an
``Authorization`` value or a webhook signature).
"""

from __future__ import annotations

import http.server
import json
import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["ReplyHandler"]


class ReplyHandler(http.server.BaseHTTPRequestHandler):
    """One request per connection, a short socket timeout, a whole body per reply.

    ``HTTP/1.0``: a kept-alive idle connection would hold its handler thread
    until the server closes. ``timeout``: a client that stalls mid-request
    cannot hold its thread for long. Subclasses set ``log_name`` (the logger)
    and may set ``log_prefix``.
    """

    protocol_version = "HTTP/1.0"
    timeout = 10.0
    log_name = "rtqueue"
    log_prefix = "http: "

    def reply(self, status: int, data: bytes, content_type: str) -> None:
        """Send ``status`` with ``data`` as the whole body."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reply_json(self, status: int, body: Mapping[str, Any] | None) -> None:
        """Send ``status`` with ``body`` as JSON (``None``: an empty body)."""
        self.reply(status, json.dumps(body).encode() if body is not None else b"", "application/json")

    def log_message(self, format: str, *args: Any) -> None:
        logging.getLogger(self.log_name).debug("%s%s", self.log_prefix, format % args)
