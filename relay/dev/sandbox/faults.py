"""What goes wrong in the sandbox, per PUT: the faults and how they are drawn.

Faults are drawn per PUT, after the auth check, in the order close, 503, 429, apply_500,
apply_hang; the first one drawn wins. With a seed, each PUT draws from its own
:class:`random.Random`, seeded by (seed, action id, the action's PUT count): an action meets the
same faults on every run, whatever the order in which concurrent requests arrive. Without one,
all PUTs share one unseeded generator. The first three answer
without applying anything. ``apply_500`` and ``apply_hang`` only take effect on a request that
really applies an update (a valid body for a new action): the update lands, then the answer is a
500, or no answer at all after ``hang_seconds`` (the connection is then closed). That is the
"it landed but we never heard" case the relay must cope with.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from relay.errors import ConfigError

# Fault names, as found in RequestRecord.fault, summary()["by_fault"] and the request log.
FAULT_CLOSE = "close"
FAULT_503 = "503"
FAULT_429 = "429"
FAULT_APPLY_500 = "apply_500"
FAULT_APPLY_HANG = "apply_hang"
FAULT_FORCED = "forced_status"

_PROBABILITIES = ("p_close", "p503", "p429", "p_apply_500", "p_apply_hang")
_FAULT_OF = {
    "p_close": FAULT_CLOSE,
    "p503": FAULT_503,
    "p429": FAULT_429,
    "p_apply_500": FAULT_APPLY_500,
    "p_apply_hang": FAULT_APPLY_HANG,
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Faults:
    """What goes wrong, per PUT. Probabilities are from 0 to 1; durations are in seconds."""

    p503: float = 0.0
    p429: float = 0.0
    retry_after: int = 1
    p_close: float = 0.0
    p_apply_500: float = 0.0
    p_apply_hang: float = 0.0
    hang_seconds: float = 10.0
    latency: float = 0.0

    def __post_init__(self) -> None:
        for name in _PROBABILITIES:
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{_flag(name)}: expected a probability between 0 and 1, got {value!r}")
        for name, value in (("--hang-seconds", self.hang_seconds), ("latency", self.latency)):
            if not isinstance(value, int | float) or not 0.0 <= value < math.inf:
                raise ConfigError(f"{name}: expected a number of seconds, zero or more, got {value!r}")
        if not isinstance(self.retry_after, int) or self.retry_after < 0:
            raise ConfigError(
                f"--retry-after: expected whole seconds, zero or more, got {self.retry_after!r}"
            )

    def draw(self, rng: random.Random) -> str | None:
        """The fault this request gets, if any (one draw per non-zero probability)."""
        for name in _PROBABILITIES:
            probability: float = getattr(self, name)
            if probability > 0.0 and rng.random() < probability:
                return _FAULT_OF[name]
        return None
