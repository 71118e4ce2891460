"""Single-process mode: the listener inside the ASGI server's event loop.

``with_listener(application)`` wraps an ASGI application so that the server
process also runs a listener (``await listener.serve()``), started at ASGI
lifespan startup (Uvicorn, Hypercorn) or, for servers without lifespan
events (Daphne), with the first connection, and stopped at lifespan
shutdown. With a channel layer configured, its changes are forwarded there,
which is what lets the in-memory layer work: sender and consumers share the
process. Trade-offs are in docs/channels.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.db import DEFAULT_DB_ALIAS

from .conf import get_setting
from .declarations import get_declarations
from .dispatch import Dispatcher
from .listener import Listener

logger = logging.getLogger("django_pgnotify.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Seconds lifespan startup waits for the listener to be listening.
READY_TIMEOUT = 20.0


class ListenerApplication:
    """An ASGI application that runs a listener next to ``app`` in the same event loop.

    Args:
        app: The ASGI application to serve (a Channels ``ProtocolTypeRouter``).
        using: The database alias to listen on.
        selectors: App or model labels to narrow the models listened for.
        channel_layer: The ``CHANNEL_LAYERS`` alias to forward to;
            ``PGNOTIFY["CHANNEL_LAYER"]`` by default; ``None`` there means
            signals only.

    Attributes:
        listener: The :class:`~django_pgnotify.listener.Listener`, once started.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        using: str = DEFAULT_DB_ALIAS,
        selectors: tuple[str, ...] = (),
        channel_layer: str | None = None,
    ) -> None:
        self.app = app
        self.using = using
        self.selectors = selectors
        self.channel_layer = channel_layer
        self.listener: Listener | None = None
        self.task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if self.task is None:  # a server without lifespan events
            self.start()
        await self.app(scope, receive, send)

    def start(self) -> Listener:
        """Create the listener and start it as a task of the running loop."""
        declarations = get_declarations(self.selectors)
        layer = self.channel_layer or get_setting("CHANNEL_LAYER")
        dispatcher: Dispatcher | None = None
        if layer:
            from .channels_bridge import ChannelsDispatcher

            labels = {d.model._meta.label_lower for d in declarations}
            dispatcher = ChannelsDispatcher(layer, labels, in_process=True)
        self.listener = Listener(declarations, self.using, dispatcher=dispatcher)
        self.task = asyncio.get_running_loop().create_task(
            self.listener.serve(), name="pgnotify-listener"
        )
        self.task.add_done_callback(self._report)
        return self.listener

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> bool:
        """Wait until the listener listens; ``False`` if it failed or the time ran out."""
        deadline = time.monotonic() + timeout
        while self.listener is not None and self.task is not None:
            if self.listener.ready.is_set():
                return True
            if self.task.done() or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return False

    async def stop(self) -> None:
        """Stop the listener (after the event in hand) and wait for it."""
        if self.listener is not None:
            self.listener.stop()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.start()
                    if not await self.wait_ready():
                        raise RuntimeError("the pgnotify listener did not start (see the log)")
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _report(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("pgnotify: the in-process listener failed", exc_info=task.exception())


def with_listener(app: ASGIApp, **options: Any) -> ListenerApplication:
    """Wrap ``app`` so that its server process also runs the listener (single-process mode).

    ``options`` are those of :class:`ListenerApplication`. Use it in one
    process only: each process that runs it handles every change.
    """
    return ListenerApplication(app, **options)
