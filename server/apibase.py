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


@dataclass
class Method:
    func: Callable[[Context, dict], Any]
    http: tuple[str, ...]
    roles: tuple[str, ...] | None   # None: open to anyone


class ApiMethods:
    """The API methods of one module, declared with ``@api(module, name, http, roles)``."""

    def __init__(self):
        self.methods: dict[tuple[str, str], Method] = {}

    def __call__(self, module: str, name: str, http: tuple[str, ...] = ("GET",),
                 roles: tuple[str, ...] | None = None):
        def declare(func):
            self.methods[(module, name)] = Method(func, http, roles)
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
