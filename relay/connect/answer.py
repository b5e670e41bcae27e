"""What one HTTP request to the API produced: the edge's result, which the core classifies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    """What one HTTP request produced."""

    status: int | None  # HTTP status; None when no response arrived
    body: bytes = b""
    retry_after: str | None = None  # the raw Retry-After header
    transport_error: str | None = None  # e.g. "ReadTimeout", "ConnectError", "RemoteProtocolError"
    maybe_sent: bool = True  # False when the request certainly never reached the server
