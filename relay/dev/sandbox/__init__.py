"""A local stand-in for the Mirakl Connect API, with fault injection.

``server`` answers like the API (auth, validation, 404 for unknown ids, repeats refused),
``faults`` decides what goes wrong per request, ``command`` is ``outbox-relay sandbox``.
Standard library only: the demo, the tests and users trialling an integration run it as is.
"""

from relay.dev.sandbox.faults import Faults
from relay.dev.sandbox.server import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TOKEN,
    ERROR_CODES,
    RequestRecord,
    Sandbox,
    SandboxConfig,
)

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_TOKEN",
    "ERROR_CODES",
    "Faults",
    "RequestRecord",
    "Sandbox",
    "SandboxConfig",
]
