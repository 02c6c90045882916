"""What every module of the client API builds on: the methods' contract, their errors and
roles, and the readers of their parameters.

An API method is a plain function ``(ctx, params) -> data``, declared in its module's
:class:`ApiMethods` (``api = ApiMethods()``, then ``@api(module, name, http, roles)``) with the
HTTP verbs and the roles allowed to call it. ``app.make_app`` builds the registry from the list
of API modules (:func:`registry`); ``handlers.ApiHandler`` checks the caller, reads the
parameters and wraps the result as ``{"success", "message", "data"}``. Reads are open; writes
need an identity (a bearer token's subject or a certificate DN).
"""
from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .auth import Identity, KeyStore
from .submission import TaskSubmitter
from .taskbuffer import TaskBuffer

WRITERS = ("user", "admin")
ADMIN = ("admin",)
PILOTS = ("pilot", "admin")


class ApiError(Exception):
    """A call refused with a reason: success=false with the message, HTTP ``status`` (200 for
    a logical error, as PanDA replies)."""
    status = 200
    data: Any = None          # the reply's ``data``, e.g. PanDA's error code of a refusal

    def __init__(self, message: str, status: int | None = None, data: Any = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        if data is not None:
            self.data = data


class Forbidden(ApiError):
    """An unknown method, or a role that may not call it (HTTP 403)."""
    status = 403


@dataclass
class Context:
    tb: TaskBuffer
    keys: KeyStore
    submitter: TaskSubmitter
    identity: Identity | None
    clock: Callable[[], dt.datetime]
    site_loader: Callable[[list[dict]], tuple[list[dict], list[str]]] | None = None
    message: str = ""


class BadParameter(ApiError):
    """A parameter that does not match its declaration (HTTP 400, success=false)."""
    status = 400


#: JSON Schema / OpenAPI type of each parameter kind
KINDS = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean",
         "object": "object", "array": "array", "ids": "array", "any": None}
MAX_TEXT = 255                 # a text parameter's default length limit (the columns' own)
MAX_IDS = 10000
_NULLS = (None, "", "None")          # absent, as int_param and str_param read them


@dataclass(frozen=True)
class Param:
    """One parameter of an API method: what the handler checks before the method runs, and
    what the OpenAPI document (``server/openapi.py``) says about it; one declaration for both.

    ``kind``: string, integer, number, boolean, object, array, ids (one integer or a list
    of them, as PanDA's client sends job ids), or any (the method checks it themselves).
    ``minimum``/``maximum`` bound integers and numbers; ``max_length`` strings (characters)
    and arrays (items); ``enum`` lists the values a string may take."""
    name: str
    kind: str = "string"
    required: bool = False
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    enum: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"parameter {self.name}: unknown kind {self.kind!r}")

    def check(self, value: Any) -> Any:
        """The value as the method reads it; BadParameter naming the parameter and why."""
        kind, name = self.kind, self.name
        if kind == "any":
            return value
        if kind == "string":
            if isinstance(value, (dict, list)):
                raise BadParameter(f"parameter {name!r} must be one text value")
            text = value if isinstance(value, str) else str(value)
            limit = self.max_length or MAX_TEXT
            if len(text) > limit:
                raise BadParameter(f"parameter {name!r}: at most {limit} characters")
            if self.enum is not None and text not in self.enum:
                raise BadParameter(f"parameter {name!r} must be one of {', '.join(self.enum)}")
            return text
        if kind in ("integer", "number"):
            try:
                number = as_int(value) if kind == "integer" else _as_number(value)
            except (TypeError, ValueError, OverflowError):
                raise BadParameter(f"parameter {name!r} must be "
                                   f"{'an integer (64-bit)' if kind == 'integer' else 'a number'}"
                                   f", got {str(value)[:40]!r}") from None
            if self.minimum is not None and number < self.minimum or \
                    self.maximum is not None and number > self.maximum:
                raise BadParameter(f"parameter {name!r} must be within "
                                   f"{_bound(self.minimum)}..{_bound(self.maximum)}, got {number}")
            return number
        if kind == "boolean":
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0"):
                raise BadParameter(f"parameter {name!r} must be true or false")
            return text in ("true", "1")
        if kind == "object":
            if not isinstance(value, dict):
                raise BadParameter(f"parameter {name!r} must be a JSON object")
            return value
        items = value if isinstance(value, list) else [value]
        limit = self.max_length or (MAX_IDS if kind == "ids" else 100000)
        if len(items) > limit:
            raise BadParameter(f"parameter {name!r}: at most {limit} items")
        if kind == "array":
            if not isinstance(value, list):
                raise BadParameter(f"parameter {name!r} must be a JSON array")
            return value
        out = []
        for v in items:                                   # ids
            try:
                out.append(as_int(v))
            except (TypeError, ValueError, OverflowError):
                raise BadParameter(f"parameter {name!r}: {str(v)[:40]!r} is not an integer "
                                   "(64-bit)") from None
        return out


def _as_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    number = float(value)
    if not math.isfinite(number):
        raise ValueError
    return number


def _bound(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


@dataclass
class Method:
    func: Callable[[Context, dict], Any]
    http: tuple[str, ...]
    roles: tuple[str, ...] | None   # None: open to anyone
    params: tuple[Param, ...] = ()
    summary: str = ""
    bulk: bool = False              # long work (many rows): runs on the server's bulk threads

    def checked(self, params: dict) -> dict:
        """``params`` with every declared one checked and converted (:meth:`Param.check`);
        an absent or empty optional one is dropped, an absent required one refused.
        Undeclared keys pass untouched (PanDA's client sends some the server ignores)."""
        out = dict(params)
        for p in self.params:
            value = params.get(p.name)
            if value is None and p.required:
                raise BadParameter(f"parameter {p.name!r} is required")
            if not p.required and (value in _NULLS or (
                    isinstance(value, (list, dict)) and not value
                    and p.kind not in ("object", "array"))):
                out.pop(p.name, None)
                continue
            # a required one given empty goes on to its check and the method's (which may
            # say more than "required": an empty scope is refused as a name)
            out[p.name] = p.check(value)
        return out


class ApiMethods:
    """The API methods of one module, declared with
    ``@api(module, name, http, roles, params=(Param(...), ...))``."""

    def __init__(self):
        self.methods: dict[tuple[str, str], Method] = {}

    def __call__(self, module: str, name: str, http: tuple[str, ...] = ("GET",),
                 roles: tuple[str, ...] | None = None, params: tuple[Param, ...] = (),
                 bulk: bool = False):
        def declare(func):
            doc = (func.__doc__ or "").strip().split("\n\n")[0]
            self.methods[(module, name)] = Method(func, http, roles, tuple(params),
                                                  " ".join(doc.split()), bulk)
            return func
        return declare


def registry(modules: Iterable[ModuleType]) -> dict[tuple[str, str], Method]:
    """Every method the API ``modules`` declare (in their ``api``), by (module, name)."""
    out: dict[tuple[str, str], Method] = {}
    for module in modules:
        for key, method in module.api.methods.items():
            if key in out:
                raise ValueError(f"API method {key[0]}/{key[1]} is declared twice")
            out[key] = method
    return out


# ---------------------------------------------------------------------- parameters
MAX_ID = 2**63   # a BIGINT: larger values would overflow the database driver


def as_int(value: Any) -> int:
    """An integer from JSON or query text; floats only when whole. ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    number = int(value)
    if not -MAX_ID < number < MAX_ID:
        raise ValueError
    return number


def int_param(params: dict, key: str, required: bool = True) -> int | None:
    value = params.get(key)
    if value in (None, "", "None"):
        if required:
            raise ApiError(f"parameter {key!r} is required")
        return None
    try:
        return as_int(value)
    except (TypeError, ValueError, OverflowError):
        raise ApiError(f"parameter {key!r} must be an integer (64-bit), got "
                       f"{str(value)[:40]!r}") from None


def str_param(params: dict, key: str) -> str | None:
    """An optional text parameter; a list (a repeated query key) or an object is refused."""
    value = params.get(key)
    if value in (None, "", "None"):
        return None
    if isinstance(value, (list, dict)):
        raise ApiError(f"parameter {key!r} must be one text value")
    return str(value)


def id_list(params: dict, key: str) -> list[int]:
    value = params.get(key)
    if value is None:
        raise ApiError(f"parameter {key!r} is required")
    if not isinstance(value, list):
        value = [value]
    if len(value) > 10000:
        raise ApiError(f"parameter {key!r}: at most 10000 ids")
    out = []
    for v in value:
        try:
            out.append(as_int(v))
        except (TypeError, ValueError, OverflowError):
            raise ApiError(f"parameter {key!r}: {str(v)[:40]!r} is not an integer (64-bit)"
                           ) from None
    return out
