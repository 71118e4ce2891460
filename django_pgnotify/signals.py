"""The signals django-pgnotify sends.

``row_changed``
    Sent by the listener for every committed change of a declared model.
    ``sender`` is the model class (the concrete model, never a proxy);
    ``event`` is a :class:`django_pgnotify.RowChange`. Receivers take
    ``**kwargs`` as every Django receiver does. A receiver that raises is
    logged with its traceback and counted; the other receivers still run.
"""

from django.dispatch import Signal

row_changed = Signal()
