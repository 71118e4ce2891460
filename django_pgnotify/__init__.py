"""django-pgnotify: PostgreSQL row changes as Django signals.

Public API: ``Notify`` (declare what a model announces), ``row_changed`` (the
signal) and ``RowChange`` (what receivers get).
"""

from .events import RowChange
from .notify import Notify
from .signals import row_changed

__all__ = ["Notify", "RowChange", "row_changed"]
__version__ = "0.1.0"
