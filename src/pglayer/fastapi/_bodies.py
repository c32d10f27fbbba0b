"""Request bodies: JSON only, parsed strictly, before FastAPI sees them.

A body must come as `application/json` (or `application/*+json`), UTF-8, without any
`Content-Encoding` (else 415); it must be one JSON document, nested at most `MAX_DEPTH`
deep, of at most `MAX_CONTAINERS` objects and arrays, with no key twice in an object (else
422 saying what is wrong and where). The second bound keeps the exact parse below cheap: its
cost is per object, and a MiB of `[{},{},...]` took the event loop 0.3-0.5 s.

orjson parses and validates it (UTF-8, syntax, NaN, lone surrogates) in well under a
microsecond for a small body. It keeps the last of duplicate keys and turns integers past
64 bits into floats, so the standard library parses again, with a duplicate check, unless
byte counts prove neither happened: one flat object with as many `:` as keys, and no float.
orjson refuses a number past a double's range (`1e999`, 400 digits), which is valid JSON: that
body is the standard library's alone, checked for what orjson checks, so that the field's own
validation names it.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request
from fastapi._compat import ModelField
from pydantic import BaseModel
from starlette.responses import Response

from pglayer.fastapi._problems import MAX_ERRORS, OMITTED_ERRORS, Problem, clip, field_error

__all__ = ["MAX_CONTAINERS", "MAX_DEPTH", "check_media_type", "json_body_handler", "parse_json"]

MAX_DEPTH = 64
MAX_CONTAINERS = 10_000
_NESTED = f"The body is not valid JSON: it is nested deeper than {MAX_DEPTH} levels."
_TOO_MANY = (
    f"The body holds more than {MAX_CONTAINERS:,} JSON objects and arrays: send fewer at a time."
)

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return obj


class _ConstantError(ValueError):
    """NaN, Infinity or -Infinity, which the standard library takes and JSON does not."""


def _no_constant(name: str) -> None:
    raise _ConstantError(f"{name} is not a JSON value")


_EXACT = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_no_constant)
_BEYOND_DOUBLE = "number is infinity when parsed as double"  # orjson's words for 1e999
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a body can name one


def _invalid(detail: str) -> Problem:
    return Problem(
        422, "validation_error", detail, errors=[field_error(["body"], detail, "json_invalid")]
    )


def _syntax_error(body: bytes, exc: orjson.JSONDecodeError) -> Problem:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as bad:
        return _invalid(f"The body is not valid UTF-8: {bad.reason} at byte {bad.start}.")
    if "depth" in exc.msg:
        return _invalid(_NESTED)
    at = len(text[: exc.pos].encode("utf-8", "surrogatepass"))
    return _invalid(f"The body is not valid JSON: {exc.msg} at byte {at}.")


def _refused_shape(value: Any) -> str | None:
    """Why `value` (an object or array) is refused: nested too deep, or too many objects and
    arrays; None if neither. One level at a time, so each child is looked at once."""
    level, depth, count = [value], 1, 0
    while level:
        if depth > MAX_DEPTH:
            return _NESTED
        count += len(level)
        if count > MAX_CONTAINERS:
            return _TOO_MANY
        below = []
        for item in level:
            for child in item.values() if type(item) is dict else item:
                if type(child) is dict or type(child) is list:
                    below.append(child)
        level, depth = below, depth + 1
    return None


def _encodable(value: Any) -> bool:
    """Whether every string in `value` is valid UTF-8 (the standard library lets an escaped
    lone surrogate through, which orjson refuses)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json(body: bytes) -> Any:
    """The JSON document in `body`; a 422 `Problem` saying why if it is not valid JSON."""
    if (
        len(body) > 2 * MAX_CONTAINERS  # the least that many containers take
        and body.find(b'"') == -1  # no string: every bracket is one
        and body.count(b"{") + body.count(b"[") > MAX_CONTAINERS
    ):
        raise _invalid(_TOO_MANY)  # before a parse that makes each (GC: 0.15-0.3 s a MiB)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if not exc.msg.startswith(_BEYOND_DOUBLE):
            raise _syntax_error(body, exc) from None
        return _beyond_double(body)
    objects, arrays = body.count(b"{"), body.count(b"[")  # at least as many as there are
    if objects + arrays > MAX_DEPTH and type(value) in (dict, list):
        refused = _refused_shape(value)
        if refused is not None:
            raise _invalid(refused)
    if (
        objects == 1
        and not arrays
        and type(value) is dict
        and body.count(b":") == len(value)
        and float not in map(type, value.values())
    ):
        return value  # one flat object, no key twice, no integer orjson made a float
    return _exact(body)


def _beyond_double(body: bytes) -> Any:
    """A body orjson stops at for a number past a double's range, which is valid JSON all
    the same (its field's own check says why not): the standard library's, checked for what
    orjson would have refused after that number. Each check only where bytes say it can
    fail: a MiB took four passes, 0.2 s."""
    containers = body.count(b"{") + body.count(b"[")  # at least as many as there are
    if containers > MAX_CONTAINERS:
        # Too many, perhaps (some may be in strings): counted in the plain parse, which has
        # no hook per object, before the exact one, which has.
        try:
            plain = json.loads(body)
        except (ValueError, RecursionError):
            plain = None  # said by the exact parse below
        if type(plain) in (dict, list):
            refused = _refused_shape(plain)
            if refused is not None:
                raise _invalid(refused)
    value = _exact(body)
    if containers > MAX_DEPTH and type(value) in (dict, list):
        refused = _refused_shape(value)
        if refused is not None:
            raise _invalid(refused)
    if _SURROGATE_ESCAPE.search(body) and not _encodable(value):
        raise _invalid("The body is not valid JSON: it escapes a lone UTF-16 surrogate.")
    return value


def _exact(body: bytes) -> Any:
    """`body` parsed by the standard library: the exact integers, and no key twice."""
    try:
        return _EXACT.decode(body.decode("utf-8"))
    except UnicodeDecodeError as bad:
        raise _invalid(f"The body is not valid UTF-8: {bad.reason} at byte {bad.start}.") from None
    except RecursionError:
        raise _invalid(_NESTED) from None
    except _DuplicateKeyError as exc:
        raise _invalid(
            f"The body is not valid JSON: the key {clip(exc.key)!r} appears twice in an"
            " object (duplicate keys are ambiguous)."
        ) from None
    except json.JSONDecodeError as exc:
        raise _invalid(f"The body is not valid JSON: {exc.msg} at character {exc.pos}.") from None
    except _ConstantError as exc:
        raise _invalid(f"The body is not valid JSON: {exc}.") from None
    except ValueError:  # the only other: an integer of more than 4,300 digits
        raise _invalid("The body holds a number of more than 4,300 digits.") from None


def check_media_type(headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Raise a 415 `Problem` unless the body is plain JSON (or absent, with no type)."""
    content_type = None
    for name, value in headers:  # the raw ASGI headers: one pass, no decoding
        if name == b"content-type":
            if content_type is not None:  # which one counts, the framework and we differ
                raise Problem(415, "unsupported_media_type", "Send one Content-Type.")
            content_type = value
        elif name == b"content-encoding":
            raise Problem(
                415,
                "unsupported_media_type",
                "Content-Encoding is not supported: send the body uncompressed.",
            )
    if content_type == b"application/json":
        return
    if content_type is None:
        if body:
            raise Problem(
                415, "unsupported_media_type", "A body needs `Content-Type: application/json`."
            )
        return
    mime, _, params = content_type.decode("latin-1").partition(";")
    mime = mime.strip().lower()
    json_type = mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json") and len(mime) > 17
    )  # application/x+json, not application/+json
    charset = "utf-8"
    for param in params.split(";"):
        key, _, given = param.partition("=")
        if key.strip().lower() == "charset":
            charset = given.strip().strip('"').lower()
    if not json_type or charset not in ("utf-8", "utf8"):
        raise Problem(
            415,
            "unsupported_media_type",
            "The body must be JSON, sent as `Content-Type: application/json` in UTF-8.",
        )


def known_keys(field: ModelField) -> frozenset[str] | None:
    """The keys a body model with `extra="forbid"` accepts; None for any other body."""
    model = field.field_info.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    config = model.model_config
    if config.get("extra") != "forbid":
        return None
    keys: set[str] = set()
    by_name = bool(config.get("validate_by_name") or config.get("populate_by_name"))
    for name, info in model.model_fields.items():
        alias = info.validation_alias if info.validation_alias is not None else info.alias
        if alias is not None and not isinstance(alias, str):
            return None  # AliasPath / AliasChoices: leave it all to pydantic
        keys.add(alias or name)
        if by_name or alias is None:
            keys.add(name)
    return frozenset(keys)


def _without_most_unknown_keys(
    request: Request, value: dict[str, Any], known: frozenset[str]
) -> dict[str, Any]:
    # pydantic reports each unknown key of a model that forbids them: 100,000 keys make
    # 100,000 errors and half a second of CPU. Only the first few are validated and listed;
    # the others are counted for the problem's detail.
    present = [key for key in known if key in value]
    unknown = len(value) - len(present)
    if unknown <= MAX_ERRORS:
        return value
    kept = {key: value[key] for key in present}
    for key in itertools.islice((k for k in value if k not in known), MAX_ERRORS):
        kept[key] = value[key]
    request.scope[OMITTED_ERRORS] = unknown - MAX_ERRORS
    return kept


def json_body_handler(handler: Handler, known: frozenset[str] | None) -> Handler:
    """`handler` (FastAPI's, for a route with a JSON body) behind the rules above."""

    async def parse_then_handle(request: Request) -> Response:
        body = await request.body()
        check_media_type(request.scope["headers"], body)
        if body:
            value = parse_json(body)
            if known is not None and type(value) is dict and len(value) > MAX_ERRORS:
                value = _without_most_unknown_keys(request, value, known)
            # FastAPI reads the body through `request.json()`, which returns this.
            request._json = value
        return await handler(request)

    return parse_then_handle
