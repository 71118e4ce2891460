"""django-pgnotify: PostgreSQL row changes as Django signals.

Public API: ``Notify`` (declare what a model announces), ``row_changed`` (the
signal), ``RowChange`` (what receivers get), ``paused()`` (writes that
announce nothing) and ``context()`` (who made a change and why).
"""

from .audit import context
from .events import RowChange
from .notify import Notify
from .pausing import paused
from .signals import row_changed

__all__ = ["Notify", "RowChange", "context", "paused", "row_changed"]
__version__ = "0.1.0"
