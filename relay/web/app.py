"""The console as an ASGI application (Starlette): routes, the guard around them, the pages.

Every response carries a strict Content-Security-Policy (no script at all, styles and images
from the console only), ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``
(action ids travel in URLs) and ``Cache-Control: no-store``. State changes are POST only, each
with the CSRF field of :mod:`relay.web.security`, and the database role decides whether a redrive
is allowed at all (:func:`relay.web.data.capabilities`): an auditor's console shows no redrive
control and answers 403 to one.
"""

from __future__ import annotations

import csv
import io
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from relay.cli.ops import FRESH_HEARTBEAT, collect_status
from relay.cli.report import csv_cell
from relay.errors import BadRequest, Forbidden, PageNotFound, PermissionDenied, Refused, RelayError, TooLarge
from relay.pg.store import Store
from relay.web import data, forms
from relay.web.chart import per_minute_svg
from relay.web.pages import Pages
from relay.web.security import COOKIE, Guard

log = logging.getLogger("relay.web")

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
FORM_MAX_BYTES = 64 * 1024
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
CSV_COLUMNS = (
    "id",
    "action_id",
    "target",
    "status",
    "state",
    "attempts",
    "created_at",
    "delivered_at",
    "dead_at",
    "last_http_status",
    "last_error_code",
    "last_error",
)


def client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class Console:
    """The routes' state: the store (the console's own database role), the guard, the pages."""

    def __init__(self, store: Store, guard: Guard) -> None:
        self.store, self.guard, self.pages = store, guard, Pages()

    # -- helpers ---------------------------------------------------------------------------
    def page(self, request: Request, name: str, http_status: int = 200, **context: Any) -> HTMLResponse:
        cookie: str = request.state.cookie
        context.setdefault("caps", None)
        body = self.pages.render(
            name,
            csrf=self.guard.csrf(cookie),
            sign_in=self.guard.sign_in,
            path=request.url.path,
            **context,
        )
        return HTMLResponse(body, status_code=http_status)

    def error_page(self, request: Request, status: int, message: str) -> HTMLResponse:
        titles = {400: "Bad request", 401: "Sign in", 403: "Forbidden", 404: "Not found", 413: "Too large"}
        return self.page(
            request,
            "error.html",
            http_status=status,
            title=titles.get(status, "Unavailable"),
            message=message,
        )

    async def form(self, request: Request) -> dict[str, list[str]]:
        """The POSTed form, checked: urlencoded, at most FORM_MAX_BYTES, with the right csrf."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise BadRequest("expected a form (application/x-www-form-urlencoded)")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > FORM_MAX_BYTES:
            raise TooLarge("form too large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > FORM_MAX_BYTES:
                raise TooLarge("form too large")
        try:
            fields = parse_qs(
                body.decode("utf-8"), keep_blank_values=True, max_num_fields=2000, strict_parsing=False
            )
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("the form is not valid UTF-8 url-encoded text") from None
        sent = (fields.get("csrf") or [""])[0]
        if not self.guard.csrf_ok(request.cookies.get(COOKIE), sent):
            log.warning("web request refused", extra={"reason": "csrf", "client": client(request)})
            raise Forbidden(
                "this form is stale or did not come from the console: reload the page and try again"
            )
        return fields

    @staticmethod
    def first(fields: dict[str, list[str]]) -> dict[str, str]:
        return {k: v[0] for k, v in fields.items() if v}

    async def may_redrive(self) -> data.Capabilities:
        caps = await data.capabilities(self.store)
        if not caps.may_redrive:
            raise Forbidden(
                f"the console's database role {caps.role} may not re-queue dead updates "
                "(it needs outbox_operator)"
            )
        return caps

    # -- pages -----------------------------------------------------------------------------
    async def overview(self, request: Request) -> Response:
        live = await self.store.live_relays(FRESH_HEARTBEAT)
        status = await collect_status(self.store, live=live)
        caps = await data.capabilities(self.store)
        totals = {
            state: sum(int(t[state]) for t in status["targets"])
            for state in ("pending", "in_flight", "delivered", "dead")
        }
        estimated = any(not t["delivered_exact"] for t in status["targets"])
        waiting = [t["oldest_pending_seconds"] for t in status["targets"] if t["oldest_pending_seconds"]]
        return self.page(
            request,
            "overview.html",
            caps=caps,
            status=status,
            live=live,
            totals=totals,
            estimated=estimated,
            oldest=max(waiting, default=None),
            now=datetime.now(UTC),
        )

    async def chart(self, request: Request) -> Response:
        rows = await data.per_minute(self.store)
        return Response(per_minute_svg(rows), media_type="image/svg+xml")

    async def find(self, request: Request) -> Response:
        text = request.query_params.get("q", "")
        if not text.strip():
            return self.page(request, "find.html", q="", rows=[], by_prefix=False, asked=[])
        ids = forms.action_ids(text)
        rows, by_prefix = await data.find(self.store, ids)
        if len(rows) == 1 and not by_prefix:
            return RedirectResponse(f"/updates/{int(rows[0]['id'])}", status_code=303)
        return self.page(request, "find.html", q=text, rows=rows, by_prefix=by_prefix, asked=ids)

    async def update(self, request: Request) -> Response:
        update_id = int(request.path_params["update_id"])
        if not 0 < update_id < 2**63:
            raise PageNotFound(f"no update {update_id}")
        found = await data.timeline(self.store, update_id)
        if found is None:
            raise PageNotFound(f"no update {update_id} (purged by retention, or never written)")
        caps = await data.capabilities(self.store)
        return self.page(request, "update.html", caps=caps, t=found)

    async def updates(self, request: Request) -> Response:
        fields = dict(request.query_params)
        flt = forms.list_filter(fields)
        cursor = forms.cursor(fields)
        page = await data.updates_page(self.store, flt, cursor)
        caps = await data.capabilities(self.store)
        next_link = None
        if page.next_cursor:
            next_link = "/updates?" + urlencode({**flt.query(), "before": page.next_cursor.text()})
        return self.page(
            request,
            "updates.html",
            caps=caps,
            flt=flt,
            page=page,
            next_link=next_link,
            csv_link="/updates.csv?" + urlencode(flt.query()),
            first_link="/updates?" + urlencode(flt.query()),
            continued=cursor is not None,
            states=forms.STATES,
            statuses=forms.STATUSES,
        )

    async def updates_csv(self, request: Request) -> Response:
        flt = forms.list_filter(dict(request.query_params))
        store = self.store

        async def rows() -> AsyncIterator[str]:
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\r\n")
            writer.writerow(CSV_COLUMNS)
            cursor: forms.Cursor | None = None
            while True:
                page = await data.updates_page(store, flt, cursor, page=1000)
                writer.writerows([csv_cell(r[c]) for c in CSV_COLUMNS] for r in page.rows)
                yield out.getvalue()
                out.seek(0)
                out.truncate()
                if page.next_cursor is None:
                    return
                cursor = page.next_cursor

        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        headers = {"Content-Disposition": f'attachment; filename="outbox-updates-{stamp}.csv"'}
        return StreamingResponse(rows(), media_type="text/csv; charset=utf-8", headers=headers)

    async def dead(self, request: Request) -> Response:
        groups = await data.dead_groups(self.store)
        caps = await data.capabilities(self.store)
        return self.page(request, "dead.html", caps=caps, groups=groups, total=sum(g["dead"] for g in groups))

    def _redrive_scope(self, fields: dict[str, list[str]]) -> tuple[list[int], str | None, str | None]:
        one = self.first(fields)
        ids = forms.selected_ids(fields.get("id", []))
        if one.get("scope") == "selected":
            if not ids:
                raise BadRequest("id: tick at least one dead update")
            return ids, None, None
        if one.get("scope") != "filter":
            raise BadRequest("scope: expected selected or filter")
        return [], forms.target(one), forms.code(one)

    async def redrive_preview(self, request: Request) -> Response:
        caps = await self.may_redrive()  # the role first: an auditor's console refuses any redrive
        fields = await self.form(request)
        ids, target, code = self._redrive_scope(fields)
        selected = await data.dead_selected(self.store, ids) if ids else []
        count = len(selected) if ids else await self.store.dead_count(target=target, code=code)
        return self.page(
            request,
            "redrive_preview.html",
            caps=caps,
            count=count,
            ids=ids,
            selected=selected,
            target=target,
            code=code,
            scope="selected" if ids else "filter",
        )

    async def redrive(self, request: Request) -> Response:
        caps = await self.may_redrive()
        fields = await self.form(request)
        ids, target, code = self._redrive_scope(fields)
        why = forms.reason(self.first(fields))
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        kept = f"{why} (by the web console, from {client(request)}, at {stamp})"
        done = await data.redrive(self.store, ids=ids, target=target, code=code, reason=kept)
        said = {"scope": "selected" if ids else "filter", "target": target, "code": code}
        log.info(
            "dead updates re-queued from the web console",
            extra={
                "count": done.count,
                "role": caps.role,
                "client": client(request),
                **{k: v for k, v in said.items() if v is not None},
            },
        )
        return self.page(
            request, "redrive_done.html", caps=caps, count=done.count, reason=kept, asked=len(ids) or None
        )

    async def login(self, request: Request) -> Response:
        nxt = safe_next(request.query_params.get("next"))
        if request.method == "GET":
            return self.page(request, "login.html", next=nxt, wrong=False)
        fields = self.first(await self.form(request))
        nxt = safe_next(fields.get("next"))
        cookie = self.guard.open_session(fields.get("token", ""))
        if cookie is None:
            log.warning("web sign-in refused", extra={"client": client(request)})
            return self.page(request, "login.html", http_status=401, next=nxt, wrong=True)
        log.info("web sign-in", extra={"client": client(request)})
        response = RedirectResponse(nxt, status_code=303)
        set_cookie(response, cookie)
        return response

    async def logout(self, request: Request) -> Response:
        await self.form(request)
        self.guard.close_session(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        set_cookie(response, secrets.token_urlsafe(32))
        return response


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path of this console only (never //host or a URL)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def set_cookie(response: Response, value: str) -> None:
    response.set_cookie(COOKIE, value, httponly=True, samesite="strict", path="/")


def create_app(store: Store, guard: Guard, *, loopback_only: bool) -> Starlette:
    """The console over ``store``; ``loopback_only``: answer only requests for a loopback host
    name (a DNS-rebinding page in a local browser cannot reach it under its own name)."""
    console = Console(store, guard)
    public = {"/login"}

    async def dispatch(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        cookie = request.cookies.get(COOKIE, "")
        fresh = None
        if not (20 <= len(cookie) <= 64) or not cookie.replace("-", "").replace("_", "").isalnum():
            cookie = fresh = secrets.token_urlsafe(32)
        request.state.cookie = cookie
        path = request.url.path
        response: Response
        if request.method == "POST" and request.headers.get("sec-fetch-site", "same-origin") not in (
            "same-origin",
            "none",
        ):
            response = console.error_page(request, 403, "cross-site requests are refused")
        elif (
            guard.sign_in
            and path not in public
            and not path.startswith("/static/")
            and not guard.signed_in(cookie)
            and not (request.method == "GET" and guard.bearer_ok(request.headers.get("authorization")))
        ):
            if request.method in ("GET", "HEAD"):
                target = path + (f"?{request.url.query}" if request.url.query else "")
                response = RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
            else:
                response = console.error_page(request, 403, "sign in first")
        else:
            response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        if fresh:
            set_cookie(response, fresh)
        return response

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "error"
        return console.error_page(request, status, str(detail))

    async def refused(request: Request, exc: Exception) -> Response:
        """A request refused (400, 403, 404, 413), or a privilege the database role lacks (403)."""
        status = exc.http_status if isinstance(exc, Refused) else 403
        return console.error_page(request, status, str(exc))

    async def failed(request: Request, exc: Exception) -> Response:
        # the driver's message may name hosts and users: the log only
        log.error("web page failed", extra={"path": request.url.path, "error": str(exc)})
        return console.error_page(
            request, 503, "the database did not answer this page; the console's log says why"
        )

    routes = [
        Route("/", console.overview),
        Route("/chart.svg", console.chart),
        Route("/find", console.find),
        Route("/updates", console.updates),
        Route("/updates.csv", console.updates_csv),
        Route("/updates/{update_id:int}", console.update),
        Route("/dead", console.dead),
        Route("/redrive/preview", console.redrive_preview, methods=["POST"]),
        Route("/redrive", console.redrive, methods=["POST"]),
        Route("/login", console.login, methods=["GET", "POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("relay.web", "static")]), name="static"),
    ]
    middleware = [Middleware(BaseHTTPMiddleware, dispatch=dispatch)]
    if loopback_only:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            HTTPException: http_error,
            Refused: refused,
            PermissionDenied: refused,
            RelayError: failed,
        },
    )
