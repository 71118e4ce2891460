"""``AuditContextMiddleware``: every write of a request says who and which request.

Optional; add it after ``AuthenticationMiddleware``. Each change a request
makes carries ``{"actor": "user:<pk>", "request_id": "..."}`` in
``event.context`` (``actor`` is left out for anonymous requests).

A sync middleware on purpose: Django's database connections belong to a
thread, and under ASGI Django runs a sync middleware in the thread where the
request's ORM calls run, an async view's included. An async one would put
the context on the event loop thread's connections, which those calls never use.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from django.db import connections
from django.http import HttpRequest, HttpResponse

from .transaction_settings import CONTEXT, LazyContext, setting_frame

#: The request header a proxy or load balancer sets, as Django names it in META.
REQUEST_ID_HEADER = "HTTP_X_REQUEST_ID"
# Accepted as it comes only if short and plain: it is client input.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")


class AuditContextMiddleware:
    """Put the authenticated user and a request id into the context of each write.

    The request id is the ``X-Request-ID`` header when it is a plain string of
    at most 100 characters, else a new UUID; it is also stored as
    ``request.request_id``. The user is looked up only when the request
    first writes (or first queries inside a transaction, as with
    ``ATOMIC_REQUESTS``), so read-only requests outside a transaction cost
    nothing, and a user who logs in during the request is the actor of what
    follows. Covers every
    PostgreSQL database alias.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        header = request.META.get(REQUEST_ID_HEADER, "")
        request_id = header if _REQUEST_ID.fullmatch(header) else uuid.uuid4().hex
        request.request_id = request_id  # type: ignore[attr-defined]
        # login() and logout() replace request.user: a write after them has its actor.
        values = LazyContext(
            lambda: self.context_for(request, request_id),
            key=lambda: id(request.__dict__.get("user")),
        )
        with ExitStack() as stack:
            for alias in connections:
                if connections[alias].vendor == "postgresql":
                    stack.enter_context(setting_frame(alias, CONTEXT, values))
            return self.get_response(request)

    def context_for(self, request: HttpRequest, request_id: str) -> dict[str, Any]:
        """The values a request's writes carry; override to add your own."""
        values: dict[str, Any] = {}
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            values["actor"] = f"user:{user.pk}"
        values["request_id"] = request_id
        return values
