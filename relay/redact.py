"""Secrets out of text: the one place that knows what a secret in a message looks like.

:func:`redact` masks what looks like a secret anywhere in a text (``Bearer`` tokens,
``client_secret=``/``password=``-style assignments, the password part of URLs); the log handler
runs every message through it, and the store runs driver errors through it. :func:`redact_url`
hides the password of one URL. :func:`mask` removes given secrets in every form they may be
quoted in (raw, percent-encoded, quoted for a libpq connection string); the store masks the
database password in driver errors with it, and :func:`scrub_secrets` every configured secret
(database password, tokens, OAuth client secrets) in a text that quotes other software, such as
an error detail shown by ``outbox-relay check``.

These are safety nets, not the primary defence: secrets are held in
:class:`relay.settings.Secret` and never formatted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote, quote_plus, urlsplit, urlunsplit

if TYPE_CHECKING:
    from relay.settings import Settings

__all__ = ["MASK", "mask", "redact", "redact_url", "scrub_secrets", "secret_forms"]

MASK = "***"

# Words that follow "bearer" or "token:" in prose (an API's error message, ours), never a secret.
_WORDS = ("token", "tokens", "credentials", "authentication", "authorization", "required")
# "Bearer" and a value that looks like a token: one with a digit or one of -._~+/= in it, or
# letters only from 8 up (RFC 6750's token68). Ordinary words after "bearer" stay: "expired
# bearer token", "Bearer realm=...", "bearer credentials", so a message stays readable.
_BEARER = re.compile(
    rf"""(?ix)
    \b(bearer)\s+
    (?!(?:{"|".join(_WORDS)})\b)
    (?=[a-z]{{8}}|[a-z0-9\-._~+/]*[0-9\-._~+/])
    [a-z0-9\-._~+/]+=*
    """
)
_ASSIGNMENT = re.compile(
    r"""(?ix)
    \b(client_secret|access_token|refresh_token|id_token|api_token|token|password|passwd|pwd)
    (["']?\s*[=:]\s*["']?)          # = or : (JSON), with optional quotes
    ([^\s&"',;}]+)
    """
)


def _assignment(m: re.Match[str]) -> str:
    # "bearer token: credentials refused" is prose, not an assignment: a colon and a space, no
    # quote, and one of the words above.
    if m.group(2).startswith(":") and m.group(2) != ":" and m.group(3).lower() in _WORDS:
        return m.group(0)
    return f"{m.group(1)}{m.group(2)}{MASK}"


# scheme://user:password@  (user may be empty; password stops at '@', whitespace or '/').
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*:)([^\s@/]+)(@)")


def redact(text: str) -> str:
    """Mask bearer tokens, secret assignments and URL passwords anywhere in ``text``."""
    if not text:
        return text
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", text)
    return _ASSIGNMENT.sub(_assignment, text)


def redact_url(url: str) -> str:
    """The URL with its password (and any ``password=``-style query value) hidden.

    ``postgresql://user:secret@db/app`` becomes ``postgresql://user:***@db/app``; a URL without a
    password is returned unchanged.
    """
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:
        return redact(url)
    if has_password:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        url = urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{hostport}"))
    return _ASSIGNMENT.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", url)


def secret_forms(secrets: Iterable[str | None]) -> tuple[str, ...]:
    """Every form in which these secrets may be quoted: as they are, percent-encoded (in a URL),
    and escaped for a libpq connection string; longest first. Secrets under 4 characters are
    left out: masking them would garble ordinary words."""
    forms: set[str] = set()
    for secret in secrets:
        if secret and len(secret) >= 4:
            forms |= {
                secret,
                quote(secret, safe=""),
                quote_plus(secret),
                secret.replace("\\", "\\\\").replace("'", "\\'"),
            }
    return tuple(sorted(forms, key=len, reverse=True))


def mask(text: str, forms: Iterable[str]) -> str:
    """``text`` with each of ``forms`` (from :func:`secret_forms`) replaced by ``***``."""
    for form in forms:
        text = text.replace(form, MASK)
    return text


def scrub_secrets(text: str, settings: Settings) -> str:
    """``text`` with every secret of ``settings`` replaced by ``***``: the database password (in the
    URL or its query), static tokens and OAuth client secrets, even where no pattern of
    :func:`redact` would recognise them."""
    from relay.settings import database_params

    secrets = []
    for url in (settings.database_url, settings.listen_database_url):
        if url is not None:
            parts = urlsplit(url.reveal())
            secrets.append(database_params(url).get("password"))  # as libpq gets it
            secrets += [parts.password, *parse_qs(parts.query).get("password", [])]  # both, if both given
    for t in settings.targets.values():
        secrets.append(t.token.reveal() if t.token else None)
        secrets.append(t.oauth.client_secret.reveal() if t.oauth else None)
    return mask(text, secret_forms(secrets))
