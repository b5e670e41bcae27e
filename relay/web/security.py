"""Who may use the console, and proof that a form came from it.

* Sign-in: the configuration holds the SHA-256 of a random token (``web_token_hash``, made by
  ``outbox-relay web --new-token``), never the token. A browser signs in once with the token
  (a session of :data:`SESSION_HOURS` hours, kept in this process's memory: a restart signs
  everyone out); a script sends ``Authorization: Bearer <token>`` on each GET. Without a hash the
  console serves loopback only (``outbox-relay web`` refuses any other address).
* CSRF: every browser gets a random ``relay_console`` cookie (HttpOnly, SameSite=Strict); each
  form carries ``csrf``, an HMAC of that cookie under a key of this process. A POST whose ``csrf``
  does not match its cookie is refused: another site can neither read the cookie nor compute it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

COOKIE = "relay_console"
SESSION_HOURS = 12


def new_token() -> str:
    """A sign-in token: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the configuration holds for ``token``: ``sha256:`` and its hex digest."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, expected_hash: str) -> bool:
    return hmac.compare_digest(token_hash(token), expected_hash)


@dataclass
class Guard:
    """The console's secrets for one process: the CSRF key and the signed-in browsers."""

    token_hash: str | None
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    sessions: dict[str, float] = field(default_factory=dict)  # cookie -> signed in until (monotonic)

    @property
    def sign_in(self) -> bool:
        return self.token_hash is not None

    def csrf(self, cookie: str) -> str:
        return hmac.new(self.key, cookie.encode("utf-8"), hashlib.sha256).hexdigest()

    def csrf_ok(self, cookie: str | None, sent: str | None) -> bool:
        if not cookie or not sent:
            return False
        return hmac.compare_digest(self.csrf(cookie), sent)

    def signed_in(self, cookie: str | None) -> bool:
        if not self.sign_in:
            return True
        until = self.sessions.get(cookie or "")
        if until is None:
            return False
        if until < time.monotonic():
            del self.sessions[cookie or ""]
            return False
        return True

    def bearer_ok(self, header: str | None) -> bool:
        if self.token_hash is None or not header:
            return False
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and token_matches(token.strip(), self.token_hash)

    def open_session(self, token: str) -> str | None:
        """A new cookie signed in for SESSION_HOURS when ``token`` is right (None otherwise)."""
        if self.token_hash is None or not token_matches(token, self.token_hash):
            return None
        now = time.monotonic()
        for stale in [c for c, until in self.sessions.items() if until < now]:
            del self.sessions[stale]
        cookie = secrets.token_urlsafe(32)
        self.sessions[cookie] = now + SESSION_HOURS * 3600
        return cookie

    def close_session(self, cookie: str | None) -> None:
        self.sessions.pop(cookie or "", None)
