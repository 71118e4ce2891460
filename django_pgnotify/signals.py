"""The signals django-pgnotify sends, with their arguments, in one place.

``row_changed``
    Sent by the listener for every committed change of a declared model.
    ``sender`` is the model class (the concrete model, never a proxy);
    ``event`` is a :class:`django_pgnotify.RowChange`. Receivers may be sync
    or async functions and take ``**kwargs`` as every Django receiver does. A
    receiver that raises is logged with its traceback and counted; the other
    receivers still run.

``listener_started``
    Sent once a listener is connected, listening and has proved delivery with
    its self-probe, before the first change is dispatched. ``sender`` is the
    :class:`~django_pgnotify.listener.Listener`; ``using`` the database alias
    it serves; ``backend_pid`` the PID of its connection.

``listener_reconnected``
    Sent after the listener lost its connection and is listening again.
    ``sender``, ``using`` and ``backend_pid`` as above; ``downtime`` is how many
    seconds (float) back changes may be missing: since the listener last read
    the connection, or since it fell behind (its local queue full, what it had
    not read was lost with the connection). Changes committed in that window
    may not have been delivered and never will be: resync caches here.

``listener_stopped``
    Sent when the listener returns, after the event in hand was finished.
    ``sender`` and ``using`` as above; ``stats`` is a copy of its counters.

The listener signals are sent from the listener's event loop thread: async
receivers run on it, sync ones in a thread of the listener's own (one for all
three signals; not asgiref's ``sync_to_async`` thread, which an ASGI server
shares with other code). That thread's Django connections are closed before
``listener_reconnected`` is sent (the database may have restarted) and when the
listener stops. A receiver that raises is logged and ignored.
"""

from django.dispatch import Signal

row_changed = Signal()
listener_started = Signal()
listener_reconnected = Signal()
listener_stopped = Signal()
