"""Channels group names for models and rows.

Channels accepts group names of ASCII letters, digits, ``-``, ``_`` and ``.``,
shorter than 100 characters. Model labels and primary keys can be neither
(a Unicode app label, a long or odd string pk), so names that would not fit
are replaced by a hash, under a different prefix so that a hashed name can
never equal a plain one. Pure functions: no Channels import, no database.

======================  ==========================================
Group                   Name
======================  ==========================================
every change of a model ``pgnotify.shop.order``
one row of it           ``pgnotify.shop.order.row.42``
row, pk odd or too long ``pgnotify.shop.order.rowh.<32 hex digits>``
resync of row followers ``pgnotify.shop.order.resync``
model label not plain   ``pgnotify.h.<24 hex digits>``
======================  ==========================================
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import re
from decimal import Decimal
from typing import Any

#: Every group name starts with this.
PREFIX = "pgnotify"
#: Channels' limit: names must be shorter than this.
MAX_NAME_LENGTH = 100
#: A model label is used as is up to this length (so that row names still fit).
MAX_LABEL_LENGTH = 48
#: A pk is used as is up to this length (a UUID's 36 characters fit), if the
#: whole name is shorter than ``MAX_NAME_LENGTH``.
MAX_PK_LENGTH = 40

_PLAIN_LABEL = re.compile(r"[a-z0-9_]+\.[a-z0-9_]+")
_PLAIN_PK = re.compile(r"[A-Za-z0-9_\-]+")


def _digest(text: str, length: int) -> str:
    # surrogatepass: a lone surrogate (which UTF-8 cannot encode) still gets a name;
    # every other text has the same bytes either way, so no name changes.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def pk_text(pk: Any) -> str:
    """The text a pk is named by: one text for every spelling of one value.

    The listener names a row's group from the pk it decoded, a consumer from
    the pk a client sent, made a Python value by the pk field's ``to_python``:
    both come here. ``str()`` of the value (a UUID's canonical form), except
    that a ``Decimal`` loses trailing zeros (``1.50``, ``1.5`` and ``15E-1`` are
    one number, ``1.5``; see ``_decimal_text``) and a datetime is ISO 8601, in
    UTC when it is aware (``12:00+00:00`` and ``13:00+01:00`` are one instant).
    """
    if isinstance(pk, Decimal):
        return _decimal_text(pk)
    if isinstance(pk, datetime.datetime):
        # Within hours of year 1 or 9999 there is no UTC value: kept with its offset.
        with contextlib.suppress(OverflowError):
            if pk.utcoffset() is not None:
                pk = pk.astimezone(datetime.timezone.utc)
        return pk.isoformat()
    return str(pk)


def _decimal_text(value: Decimal) -> str:
    """One text per number, exact (no rounding to the context's precision), and
    bounded: written out in full only while its exponent is small, since a
    client's ``1E+999999999`` would be a billion digits."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # NaN or infinity
        return str(value)
    while len(digits) > 1 and digits[-1] == 0:
        digits, exponent = digits[:-1], exponent + 1
    if digits == (0,):
        return "0"
    value = Decimal((sign, digits, exponent))
    return format(value, "f") if -_PLAIN_EXPONENT <= exponent <= _PLAIN_EXPONENT else str(value)


# Decimal pks whose exponent is within this are written as plain digits.
_PLAIN_EXPONENT = 64


def model_group(label: str) -> str:
    """The group every change of the model ``label`` (``"shop.order"``) is sent to.

    Args:
        label: The model's ``app_label.model_name`` (``Model._meta.label_lower``).
    """
    label = label.lower()
    if _PLAIN_LABEL.fullmatch(label) and len(label) <= MAX_LABEL_LENGTH:
        return f"{PREFIX}.{label}"
    return f"{PREFIX}.h.{_digest(label, 24)}"


def row_group(label: str, pk: Any) -> str:
    """The group the changes of one row (model ``label``, primary key ``pk``) are sent to.

    Args:
        label: The model's ``app_label.model_name``.
        pk: The row's primary key as a Python value (or its text).
    """
    text, model = pk_text(pk), model_group(label)
    plain = f"{model}.row.{text}"
    # A label and a pk each within their limits can still be too long together.
    if _PLAIN_PK.fullmatch(text) and len(text) <= MAX_PK_LENGTH and len(plain) < MAX_NAME_LENGTH:
        return plain
    return f"{model}.rowh.{_digest(text, 32)}"


def resync_group(label: str) -> str:
    """The group of consumers that follow single rows of ``label``, for ``resync`` messages.

    Model subscribers get ``resync`` through the model group; followers of
    single rows are not in it, so they join this one.
    """
    return f"{model_group(label)}.resync"
