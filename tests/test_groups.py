"""Channels group names: valid for any model label and pk, distinct, documented form."""

import datetime
import re
import uuid
from decimal import Decimal

import pytest
from django.db import models
from django.test.utils import isolate_apps

from django_pgnotify import groups
from django_pgnotify.consumers import _pk_value
from django_pgnotify.decoding import converter_for

VALID = re.compile(r"^[a-zA-Z\d\-_.]+$")  # Channels' rule, with length < 100


def assert_valid(name: str) -> None:
    assert VALID.match(name) and len(name) < groups.MAX_NAME_LENGTH, name


def test_plain_labels_and_pks_are_used_as_they_are():
    assert groups.model_group("shop.order") == "pgnotify.shop.order"
    assert groups.model_group("shop.Order") == "pgnotify.shop.order"
    assert groups.row_group("shop.order", 42) == "pgnotify.shop.order.row.42"
    key = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert groups.row_group("shop.order", key) == f"pgnotify.shop.order.row.{key}"
    assert groups.resync_group("shop.order") == "pgnotify.shop.order.resync"


@pytest.mark.parametrize(
    "label", ["café.commande", "shop.order", "a" * 60 + "." + "x" * 60, "app.model"]
)
@pytest.mark.parametrize(
    "pk", [1, -5, "x" * 500, "a b/c", "é", "", "with.dot", uuid.uuid4(), "h" + "0" * 32]
)
def test_every_label_and_pk_gives_a_valid_group_name(label, pk):
    for name in (
        groups.model_group(label),
        groups.row_group(label, pk),
        groups.resync_group(label),
    ):
        assert_valid(name)


def test_a_long_label_and_a_long_pk_that_fit_alone_are_hashed_when_too_long_together():
    label = "shop." + "o" * 43  # 48 characters: used as is
    longest = "k" * 40  # used as is with a short label

    name = groups.row_group(label, longest)

    assert_valid(name)
    assert name.startswith(f"pgnotify.{label}.rowh.")
    assert groups.row_group("shop.order", longest) == f"pgnotify.shop.order.row.{longest}"
    # Names that fit are unchanged: the longest plain name has 99 characters.
    assert groups.row_group(label, "k" * 37) == f"pgnotify.{label}.row.{'k' * 37}"


def test_hashed_names_never_equal_plain_ones():
    hashed = groups.row_group("shop.order", "x" * 41)
    assert hashed.startswith("pgnotify.shop.order.rowh.")
    # A pk that reads like the digest is named under ".row.", not ".rowh.".
    digest = hashed.rsplit(".", 1)[1]
    assert groups.row_group("shop.order", digest) == f"pgnotify.shop.order.row.{digest}"
    assert groups.model_group("café.commande").startswith("pgnotify.h.")


def test_different_pks_and_models_get_different_groups():
    names = {groups.row_group("shop.order", pk) for pk in ["a b", "a/b", "x" * 41, "x" * 42, 1]}
    names |= {groups.model_group(label) for label in ["shop.order", "shop.orders", "é.a", "é.b"]}
    assert len(names) == 9


def test_every_spelling_of_a_decimal_or_datetime_pk_names_one_valid_row_group():
    decimals = [Decimal("1.50"), Decimal("1.5"), Decimal("15E-1"), Decimal("1.500000")]
    assert {groups.pk_text(pk) for pk in decimals} == {"1.5"}
    assert groups.pk_text(Decimal("2E+2")) == groups.pk_text(Decimal("200.00")) == "200"
    assert groups.pk_text(Decimal("-0.00")) == groups.pk_text(Decimal("0")) == "0"
    # Past the decimal context's 28 digits: nothing rounded, distinct pks stay distinct.
    long = Decimal("1." + "0" * 40 + "1")
    assert groups.pk_text(long) != groups.pk_text(Decimal(1))
    utc = datetime.datetime(2024, 3, 1, 12, 0, tzinfo=datetime.timezone.utc)
    berlin = utc.astimezone(datetime.timezone(datetime.timedelta(hours=1)))
    assert groups.pk_text(utc) == groups.pk_text(berlin) == "2024-03-01T12:00:00+00:00"
    assert groups.pk_text(utc.replace(tzinfo=None)) == "2024-03-01T12:00:00"
    for pk in (*decimals, long, utc):
        assert_valid(groups.row_group("shop.order", pk))


def test_the_text_of_a_decimal_pk_stays_short_whatever_its_exponent():
    # A client's pk: written out in full, 1E+999999999 would be a billion digits.
    huge, tiny = Decimal("1E+999999999"), Decimal("-25E-999999999")
    assert len(groups.pk_text(huge)) < 20 and len(groups.pk_text(tiny)) < 20
    assert groups.pk_text(huge) == groups.pk_text(Decimal("10E+999999998"))
    assert groups.pk_text(Decimal("1E+64")) == "1" + "0" * 64
    assert groups.pk_text(Decimal("1E+65")) == "1E+65"


def test_a_datetime_pk_with_no_utc_value_keeps_its_offset():
    east = datetime.timezone(datetime.timedelta(hours=1))
    first = datetime.datetime(1, 1, 1, 0, 30, tzinfo=east)  # 23:30 UTC the day before year 1

    assert groups.pk_text(first) == "0001-01-01T00:30:00+01:00"
    assert_valid(groups.row_group("shop.shift", first))


def test_a_pk_with_a_lone_surrogate_gets_a_valid_name_and_other_names_are_unchanged():
    # JSON's "\ud800" escape decodes to a lone surrogate, which UTF-8 cannot encode.
    name = groups.row_group("shop.tag", "\ud800")
    assert_valid(name)
    assert name != groups.row_group("shop.tag", "\udfff")
    # Hashed names of real text are the SHA-256 of its UTF-8, as they always were.
    assert groups.row_group("shop.tag", "é") == (
        "pgnotify.shop.tag.rowh.4a99557e4033c3539de2eb65472017ca"
    )
    assert groups.row_group("shop.tag", "a b/c") == (
        "pgnotify.shop.tag.rowh.539138d518391ec4fc557ce35c37ead2"
    )
    assert groups.model_group("café.commande") == "pgnotify.h.43847478a7097ba4994fba64"


class NumericKey(models.Field):
    """A custom ``numeric`` primary key: its ``to_python`` (Field's) is the identity."""

    def db_type(self, connection):
        return "numeric(30, 2)"


class TokenKey(models.Field):
    def db_type(self, connection):
        return "uuid"


@pytest.mark.parametrize(
    ("field", "stored", "spellings"),
    [
        (NumericKey, "1.50", ["1.50", "1.5", "15E-1"]),
        (
            TokenKey,
            "6f1c2a4e-0b7e-4c1a-93d2-4f658a105c2e",
            ["6F1C2A4E-0B7E-4C1A-93D2-4F658A105C2E"],
        ),
    ],
)
def test_a_client_names_a_custom_pks_row_group_as_the_listener_does(field, stored, spellings):
    """The listener names the group from the pk it decodes by the column type."""
    with isolate_apps("tests.testapp"):

        class Keyed(models.Model):
            id = field(primary_key=True)

            class Meta:
                app_label = "testapp"

        decoded = converter_for(Keyed._meta.pk)(stored)  # as the trigger renders it

    for spelling in spellings:
        assert groups.pk_text(_pk_value(Keyed, spelling)) == groups.pk_text(decoded)
