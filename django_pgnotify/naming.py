"""How django-pgnotify names things: channels, triggers, functions, URIs.

Every name here is a plain string; quoting happens where SQL is built.
"""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

#: PostgreSQL's identifier limit (NAMEDATALEN - 1), in bytes.
MAX_IDENTIFIER_BYTES = 63

#: Prefix of every trigger and function we create.
PREFIX = "pgnotify"

#: Name of a model's declaration when it has only one and gives none.
DEFAULT_NAME = "default"

# One or two double-quoted identifiers separated by a dot; "" is a quote inside one.
_QUOTED_TABLE = re.compile(r'"((?:[^"]|"")*)"(?:\."((?:[^"]|"")*)")?')


class TableName(NamedTuple):
    """A table as ``(schema, name)``; ``schema`` is ``None`` for the search path."""

    schema: str | None
    name: str


def parse_db_table(db_table: str) -> TableName:
    """Split a Django ``db_table`` into schema and table.

    Django leaves a ``db_table`` that is already wrapped in double quotes as it
    is, which is how projects put a model in a schema: ``'"sales"."order"'``
    (or ``'sales"."order'``, which Django wraps). A plain name, even one with a
    dot in it, is a single table name on the search path. Read as PostgreSQL
    reads it, ``""`` is a quote inside a name, so ``'"a"".""b"'`` is one table.
    """
    quoted = db_table if db_table.startswith('"') and db_table.endswith('"') else f'"{db_table}"'
    match = _QUOTED_TABLE.fullmatch(quoted)
    if match is None:  # not valid quoted SQL; keep the name as written
        return TableName(None, quoted[1:-1])
    first, second = match.groups()
    if second is None:
        return TableName(None, first.replace('""', '"'))
    return TableName(first.replace('""', '"'), second.replace('""', '"'))


def fit_identifier(name: str) -> str:
    """Shorten ``name`` to PostgreSQL's 63-byte limit, keeping it unique.

    A name that is too long keeps its start and ends with a short hash of the
    whole, so two long names that share a prefix stay distinct.
    """
    encoded = name.encode()
    if len(encoded) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha1(encoded).hexdigest()[:8]
    head = encoded[: MAX_IDENTIFIER_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}_{digest}"


def default_channel(app_label: str, model_name: str) -> str:
    """The channel a model notifies on unless its declaration names one.

    ``pgnotify_<app_label>_<model_name>`` in lower case, so that ``LISTEN``
    works unquoted from any client; shortened with a hash past 63 bytes.
    """
    return fit_identifier(f"{PREFIX}_{app_label}_{model_name}".lower())


def trigger_name(declaration_name: str, event: str) -> str:
    """Name of the trigger for one event of a declaration (unique per table)."""
    if declaration_name == DEFAULT_NAME:
        return fit_identifier(f"{PREFIX}_{event}")
    return fit_identifier(f"{PREFIX}_{declaration_name}_{event}")


def function_name(table: TableName, declaration_name: str) -> str:
    """Name of a declaration's trigger function, unique per schema.

    Table names may themselves contain underscores, so a short hash of the
    schema, table and declaration keeps ``shop_order`` + ``x`` apart from
    ``shop_order_x``.
    """
    key = f"{table.schema or ''}\0{table.name}\0{declaration_name}".encode()
    digest = hashlib.sha1(key).hexdigest()[:8]
    stem = f"{PREFIX}_{table.name}".encode()[: MAX_IDENTIFIER_BYTES - len(digest) - 1]
    return f"{stem.decode(errors='ignore')}_{digest}"


def uri(model_label: str, declaration_name: str) -> str:
    """The one way a declaration is named in the API, the CLI and errors."""
    return f"{model_label}:{declaration_name}"
