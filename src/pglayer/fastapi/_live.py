"""The live pool page, added to `admin_router`: what the pools are doing, every second.

- `GET {prefix}/pool`: the page (static HTML; its script polls `pool.json` every second and
  keeps the last minutes of history itself). Without credentials: 401, and for a browser
  (`Accept: text/html`) a token form.
- `POST {prefix}/session`: the form posts the admin token; answers 303 to the page with a
  session cookie: `HttpOnly`, `SameSite=Strict`, `Path={prefix}`, `Max-Age` = the session's
  lifetime (15 minutes by default), `Secure` over HTTPS. Its value is the expiry time and an
  HMAC of it under a key derived from the token: nothing is stored on the server, every
  worker accepts it, and changing the token ends every session.
- `GET {prefix}/pool.json`: the data, for the bearer token or the cookie; 401 otherwise.
- `GET {prefix}/pool/static/{name}`: the page's script and styles, and the vendored uPlot.

Every route is a 404 when no token is configured, as the other admin routes. The pages are
served with a strict Content-Security-Policy (scripts and styles from files of this origin
only), and every answer is bounded in size.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import os
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from pglayer._database import Database
from pglayer.fastapi._dependencies import get_database
from pglayer.fastapi._problems import Problem
from pglayer.fastapi._responses import json_response

__all__ = [
    "SESSION_COOKIE",
    "SESSION_TTL",
    "add_live_routes",
    "live_snapshot",
    "session_key",
    "session_value",
]

SESSION_COOKIE = "pglayer_admin"
SESSION_TTL = 900.0  # seconds: 15 minutes

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="admin"', "Cache-Control": "no-store"}

# Bounds of one answer: entries of a by-name counter (errors, retries) beyond these are
# summed under "other"; a form body past this size is not read as a token.
MAX_NAMED_COUNTERS = 20
MAX_FORM_BYTES = 4096
_SESSION_VALUE = re.compile(r"v1\.([0-9]{1,12})\.([0-9a-f]{64})")

# name in the URL -> (file under _static/, media type)
_ASSETS = {
    "pool.js": ("pool.js", "text/javascript; charset=utf-8"),
    "pool.css": ("pool.css", "text/css; charset=utf-8"),
    "uplot.js": ("uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "uplot.css": ("uplot/uPlot.min.css", "text/css; charset=utf-8"),
    "icon.svg": ("icon.svg", "image/svg+xml"),
}


# -- the session cookie --------------------------------------------------------------------


def session_key(token: bytes) -> bytes:
    """The key that signs session cookies: derived from the token, never the token."""
    return hmac.new(token, b"pglayer admin session v1", hashlib.sha256).digest()


def session_value(key: bytes, expires: int) -> str:
    """A cookie value valid until `expires` (Unix seconds): `v1.<expires>.<hmac>`."""
    payload = f"v1.{expires}"
    return f"{payload}.{hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()}"


def _session_valid(key: bytes, value: str, now: float, ttl: float) -> bool:
    match = _SESSION_VALUE.fullmatch(value)
    if match is None:
        return False
    expires = int(match[1])
    # Not expired, and not valid for longer than a session this server would issue.
    if not now < expires <= now + ttl + 1:
        return False
    return hmac.compare_digest(session_value(key, expires), value)


# -- the data ------------------------------------------------------------------------------


def _named(counts: dict[str, int]) -> dict[str, int]:
    if len(counts) <= MAX_NAMED_COUNTERS:
        return dict(counts)
    ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)
    kept = dict(ranked[: MAX_NAMED_COUNTERS - 1])
    kept["other"] = sum(n for _, n in ranked[MAX_NAMED_COUNTERS - 1 :])
    return kept


def _pool_snapshot(db: Database, primary: Database) -> dict[str, Any]:
    s = db.stats()
    wait = s.acquire_wait
    replica = None
    if primary.replicas is not None and db.name in primary.replicas.health:
        health = primary.replicas.health[db.name]
        replica = {
            "healthy": health.healthy,
            "reason": health.reason,
            "lag_seconds": health.lag_seconds,
        }
    return {
        "name": s.name,
        "open": s.open,
        "min_size": s.min_size,
        "max_size": s.max_size,
        "size": s.size,
        "idle": s.idle,
        "in_use": s.in_use,
        "waiting": s.waiting,
        "acquisitions": s.acquisitions,
        "acquire_timeouts": s.acquire_timeouts,
        "requests_shed": s.requests_shed,
        "acquire_wait": {
            "bounds": list(wait.bounds),
            "counts": list(wait.counts),  # per bucket; the last one: slower than every bound
            "count": wait.count,
            "sum_seconds": round(wait.total, 6),
            "p50": wait.quantile(0.5),
            "p99": wait.quantile(0.99),
        },
        "bulkheads": {
            name: {
                "cap": b.cap,
                "in_use": b.in_use,
                "waiting": b.waiting,
                "refused": b.refused,
                "acquire_timeouts": b.acquire_timeouts,
            }
            for name, b in s.bulkheads.items()
        },
        "errors": _named(s.errors),
        "retries": _named(s.retries),
        "give_ups": _named(s.give_ups),
        "connections": {
            "opened": s.connections_opened,
            "closed": s.connections_closed,
            "lost": s.connections_lost,
            "failed": s.connections_failed,
        },
        "slow_queries": s.slow_queries,
        "replica": replica,
        "recent_slow": [
            {
                "statement": fingerprint(q.statement),
                "operation": q.operation,
                "seconds": q.seconds,
                "request_id": q.request_id,
                "at": round(q.at, 3),
                "error": q.error,
            }
            for q in db.recent_slow_queries()
        ],
    }


def _accepts_html(accept: str) -> bool:
    """Whether an `Accept` header names text/html with a quality above 0 (as browsers do)."""
    for media_range in accept.split(",")[:32]:
        kind, *params = (part.strip() for part in media_range.split(";"))
        if kind.lower() != "text/html":
            continue
        q = next((p[2:].strip() for p in params if p[:2].lower() == "q="), "1")
        try:
            return float(q) > 0
        except ValueError:
            return False
    return False


def fingerprint(statement: str) -> str:
    """A slow statement as the page names it: its verb and a digest of its text, never the
    text itself (no response carries SQL: the text is in the `pglayer.slow_query` log line
    with the same request id)."""
    verb = statement.split(None, 1)[0].upper()[:16] if statement.strip() else "?"
    return f"{verb} #{hashlib.blake2s(statement.encode(), digest_size=4).hexdigest()}"


def live_snapshot(db: Database) -> dict[str, Any]:
    """What the page shows: every pool (primary first, then each replica), now, of the
    worker process that answers (each worker has its own pools)."""
    return {
        "time": round(time.time(), 3),
        "worker": os.getpid(),
        "pools": [_pool_snapshot(pool, db) for pool in db.pools()],
    }


# -- the routes ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    media_type: str


def _read(name: str) -> bytes:
    return (resources.files("pglayer.fastapi") / "_static" / name).read_bytes()


_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}}


def _declared(*statuses: int, html: bool = False) -> dict[str, Any]:
    """What the OpenAPI document says of a page route: the bearer token (or the session
    cookie), and its answers."""
    ok = (
        {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}}
        if html
        else {"description": "Every pool's state, counters and slow statements (JSON)"}
    )
    unauthorized = {
        "description": "No valid bearer token or session cookie (`unauthorized`)"
        + ("; a browser (`Accept: text/html`) gets the token form" if html else ""),
        "content": {**_PROBLEM, "text/html": {"schema": {"type": "string"}}} if html else _PROBLEM,
    }
    answers = {200: ok, 401: unauthorized}
    return {
        "response_class": Response,
        "responses": {s: answers[s] for s in statuses},
        "openapi_extra": {"security": [{"HTTPBearer": []}]},
    }


_SESSION_DECLARED: dict[str, Any] = {
    "response_class": Response,
    "status_code": 303,
    "responses": {
        303: {"description": "Signed in: the session cookie is set, and `Location` is the page"},
        401: {"description": "Not the admin token (`unauthorized`)", "content": _PROBLEM},
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "properties": {"token": {"type": "string", "maxLength": 512}},
                        "required": ["token"],
                    }
                }
            },
        }
    },
}
_STATIC_DECLARED: dict[str, Any] = {
    "response_class": Response,
    "responses": {
        200: {"description": "A script, stylesheet or font of the page, cached for a day"}
    },
}


def add_live_routes(
    router: APIRouter, *, token: bytes | None, session_ttl: float = SESSION_TTL
) -> None:
    """Add the page's routes to `router` (the admin router: its prefix is theirs)."""
    assets = {name: _Asset(_read(path), media) for name, (path, media) in _ASSETS.items()}
    version = hashlib.sha256(b"".join(a.body for a in assets.values())).hexdigest()[:12]
    page = _read("pool.html").decode().replace("{{v}}", version).encode()
    login = _read("login.html").decode().replace("{{v}}", version)
    key = None if token is None else session_key(token)
    max_age = int(session_ttl)

    def login_page(request: Request, message: str) -> Response:
        # A browser gets the token form; any other client the problem every 401 is.
        if not _accepts_html(request.headers.get("accept", "")):
            detail = message or "A valid bearer token or session is required."
            raise Problem(401, "unauthorized", detail, headers=_UNAUTHORIZED)
        body = login.replace("{{message}}", html.escape(message))
        return Response(
            body.encode(), 401, {**_PAGE_HEADERS, **_UNAUTHORIZED}, media_type="text/html"
        )

    def configured() -> tuple[bytes, bytes]:
        if token is None or key is None:
            raise Problem(404, "not_found", "Not Found")
        return token, key

    def authorized(request: Request) -> bool:
        expected, signing_key = configured()
        given = request.headers.getlist("authorization")
        scheme, _, credentials = given[0].partition(" ") if len(given) == 1 else ("", "", "")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), expected
        ):
            return True
        cookie = request.cookies.get(SESSION_COOKIE)
        return cookie is not None and _session_valid(signing_key, cookie, time.time(), max_age)

    @router.get("/pool", **_declared(200, 401, html=True))
    async def pool_page(request: Request) -> Response:
        if not authorized(request):
            return login_page(request, "")
        return Response(page, 200, _PAGE_HEADERS, media_type="text/html")

    @router.post("/session", **_SESSION_DECLARED)
    async def open_session(request: Request) -> Response:
        expected, signing_key = configured()
        given = b""
        content_type = request.headers.get("content-type", "").partition(";")[0].strip()
        body = await request.body()
        if content_type.lower() == "application/x-www-form-urlencoded" and (
            len(body) <= MAX_FORM_BYTES
        ):
            try:
                fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
            except ValueError:
                fields = {}
            given = (fields.get("token") or [""])[0].strip().encode()
        # compare_digest takes the same time wherever the first difference is.
        if not hmac.compare_digest(given, expected):
            return login_page(request, "That is not the admin token.")
        response = Response(
            status_code=303, headers={"Location": "pool", "Cache-Control": "no-store"}
        )
        response.set_cookie(
            SESSION_COOKIE,
            session_value(signing_key, int(time.time()) + max_age),
            max_age=max_age,
            path=request.url.path.removesuffix("/session") or "/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    @router.get("/pool.json", **_declared(200, 401))
    async def pool_json(
        request: Request, db: Annotated[Database, Depends(get_database)]
    ) -> Response:
        if not authorized(request):
            raise Problem(
                401,
                "unauthorized",
                "A valid bearer token or session is required.",
                headers=_UNAUTHORIZED,
            )
        return json_response(live_snapshot(db), headers={"Cache-Control": "no-store"})

    @router.get("/pool/static/{name}", **_STATIC_DECLARED)
    async def pool_static(name: str) -> Response:
        configured()
        asset = assets.get(name)
        if asset is None:
            raise Problem(404, "not_found", "Not Found")
        # Named by content (`?v=`) in the page: cached for a day, revalidated never.
        return Response(
            asset.body,
            200,
            {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
            media_type=asset.media_type,
        )
