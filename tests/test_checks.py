"""System checks: each declaration mistake is reported with the model and option at fault."""

from __future__ import annotations

import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.apps import apps
from django.apps.registry import Apps
from django.core import checks
from django.core.management import call_command
from django.db import models
from django.test import override_settings
from django.test.utils import isolate_apps

from django_pgnotify import Notify
from django_pgnotify.checks import check_declarations
from django_pgnotify.declarations import raw_declarations, resolve_model
from django_pgnotify.triggers import CONTEXT_MAX, context_limit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def registry():
    """A private app registry, so the models of a test exist only for it."""
    with isolate_apps("tests.testapp") as apps:
        yield apps


def declare(declared) -> type[models.Model]:
    """A ``testapp.Shipment`` with ``pgnotify = declared``, and relations to point at."""

    class Carrier(models.Model):
        name = models.CharField(max_length=50)

        class Meta:
            app_label = "testapp"

    class Shipment(models.Model):
        status = models.CharField(max_length=20)
        weight = models.IntegerField()
        carrier = models.ForeignKey(Carrier, on_delete=models.CASCADE)
        carriers = models.ManyToManyField(Carrier, related_name="+")

        class Meta:
            app_label = "testapp"
            pgnotify = declared

    class Parcel(models.Model):
        shipment = models.ForeignKey(Shipment, on_delete=models.CASCADE)

        class Meta:
            app_label = "testapp"

    return Shipment


def check_models(registry: Apps) -> list[checks.CheckMessage]:
    """The pgnotify check messages of the models defined in ``registry``."""
    return check_declarations(app_configs=[registry.get_app_config("testapp")])


def only(messages: list[checks.CheckMessage], id: str) -> checks.CheckMessage:
    """The one message, which must have ``id``."""
    assert [m.id for m in messages] == [id], messages
    return messages[0]


def test_the_projects_own_settings_produce_no_pgnotify_messages():
    assert check_declarations() == []


def test_w009_a_durable_lease_that_may_run_out_before_its_renewal():
    with override_settings(PGNOTIFY={"DURABLE_LEASE": 9, "PROBE_TIMEOUT": 5}):
        message = only(check_declarations(), "pgnotify.W009")
        # Only where durable declarations are checked (durableapp's): testapp has none.
        assert check_declarations([apps.get_app_config("testapp")]) == []
    with override_settings(PGNOTIFY={"DURABLE_LEASE": 10, "PROBE_TIMEOUT": 5}):
        assert check_declarations() == []

    assert message.msg.startswith(
        'PGNOTIFY["DURABLE_LEASE"] (9) is less than twice PGNOTIFY["PROBE_TIMEOUT"] (5): '
    )


def test_checks_run_with_manage_py_check():
    with override_settings(PGNOTIFY={"POLL_INTERVAL": 0}):
        ids = [m.id for m in checks.run_checks(tags=["pgnotify"])]

    assert ids == ["pgnotify.E010"]


def test_a_valid_declaration_passes(registry):
    declare(Notify(fields=["status", "carrier"], when_changed=["weight"], name="status"))

    assert check_models(registry) == []


@pytest.mark.parametrize(
    "pgnotify",
    ["yes", [Notify(), "status"], [], {"fields": ["status"]}],
    ids=["string", "list-with-a-string", "empty-list", "dict"],
)
def test_e001_pgnotify_that_is_not_notify(registry, pgnotify):
    declare(pgnotify)

    message = only(check_models(registry), "pgnotify.E001")
    assert "testapp.Shipment" in message.msg
    assert "pgnotify must be a Notify" in message.msg
    # An empty list most likely means "nothing": the hint says how to write that.
    declares_nothing = "pgnotify = None declares nothing" in message.hint
    assert declares_nothing == (pgnotify == [])


@pytest.mark.parametrize(
    ("events", "shown"),
    [(["insert", "upsert"], "'upsert'"), ("insert", "'insert'"), ([], "()"), (None, "None")],
    ids=["unknown", "bare-string", "empty", "none"],
)
def test_e002_events(registry, events, shown):
    declare(Notify(events=events))

    message = only(check_models(registry), "pgnotify.E002")
    assert "testapp.Shipment:default" in message.msg
    assert shown in message.msg
    assert "event" in message.msg


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("colour", "not a field of testapp.Shipment"),
        ("parcel", "no column of its own"),
        ("carriers", "no column of its own"),
    ],
    ids=["unknown", "reverse-relation", "many-to-many"],
)
def test_e003_fields_that_are_not_columns_of_the_table(registry, field, reason):
    declare(Notify(fields=["status", field]))

    message = only(check_models(registry), "pgnotify.E003")
    assert "testapp.Shipment:default: fields" in message.msg
    assert repr(field) in message.msg
    assert reason in message.msg


def declare_truck(notify: Notify) -> None:
    """``testapp.Truck``, a child of the multi-table parent ``testapp.Vehicle``, declaring
    ``notify``."""

    class Vehicle(models.Model):
        name = models.CharField(max_length=50)

        class Meta:
            app_label = "testapp"

    class Truck(Vehicle):
        axles = models.IntegerField()

        class Meta:
            app_label = "testapp"
            pgnotify = notify


def test_e003_field_inherited_from_a_multi_table_parent(registry):
    declare_truck(Notify(fields=["axles", "name"]))

    message = only(check_models(registry), "pgnotify.E003")
    assert "testapp.Truck:default: fields names 'name'" in message.msg
    assert "inherits from testapp.Vehicle" in message.msg
    assert message.hint == "Declare it on testapp.Vehicle."


@pytest.mark.parametrize("named", ["id", "pk_first"], ids=["by-name", "first"])
def test_w008_fields_naming_the_primary_key_is_sent_twice(registry, named):
    fields = ["id", "status"] if named == "id" else ["status", "id"]
    declare(Notify(fields=fields))

    message = only(check_models(registry), "pgnotify.W008")
    assert message.msg == (
        "testapp.Shipment:default: fields names the primary key, 'id', which every change "
        "carries anyway (event.pk): it is sent twice."
    )
    assert message.hint == "Leave 'id' out of fields and read event.pk."


def test_w008_a_primary_key_named_by_its_attname(registry):
    declare_truck(Notify(fields=["vehicle_ptr_id", "axles"]))

    message = only(check_models(registry), "pgnotify.W008")
    assert "testapp.Truck:default: fields names the primary key, 'vehicle_ptr'" in message.msg


@pytest.mark.parametrize(
    ("notify", "text"),
    [
        (Notify(fields=["status", "weight", "status"]), "fields names 'status' twice."),
        (
            Notify(fields=["carrier_id", "carrier"]),
            "fields names 'carrier_id' and 'carrier', one field.",
        ),
        (
            Notify(fields=["status"], when_changed=["weight", "status", "weight"]),
            "when_changed names 'weight' twice.",
        ),
        (
            Notify(when_changed=["carrier", "carrier_id"]),
            "when_changed names 'carrier' and 'carrier_id', one field.",
        ),
    ],
    ids=["fields", "attname", "when-changed", "when-changed-attname"],
)
def test_w010_a_field_named_twice(registry, notify, text):
    """A warning that names the field: a typo for another field, most likely."""
    declare(notify)

    message = only(check_models(registry), "pgnotify.W010")
    assert message.msg == f"testapp.Shipment:default: {text}"
    field = "carrier" if "carrier" in text else text.split("'")[1]
    assert message.hint == f"Name it once, as {field!r}; did you mean another field?"


def test_w010_a_field_named_twice_is_sent_and_watched_once(registry):
    Shipment = declare(
        Notify(fields=["carrier", "status", "carrier_id"], when_changed=["status", "status"])
    )

    (declaration,), _ = resolve_model(Shipment, raw_declarations(Shipment))
    assert [column.field for column in declaration.fields] == ["carrier", "status"]
    assert [column.field for column in declaration.when_changed] == ["status"]


def test_w008_still_sends_the_primary_key_as_declared(registry):
    """A warning: receivers that read it from event.fields keep getting it."""
    Shipment = declare(Notify(fields=["id", "status"]))

    (declaration,), _ = resolve_model(Shipment, raw_declarations(Shipment))
    assert [column.field for column in declaration.fields] == ["id", "status"]


@pytest.mark.parametrize(
    "notify", [Notify(fields="__all__"), Notify(when_changed=["id"])], ids=["all", "when-changed"]
)
def test_all_fields_and_when_changed_on_the_primary_key_are_no_w008(registry, notify):
    declare(notify)

    assert check_models(registry) == []


@pytest.mark.parametrize(
    ("notify", "id", "hint"),
    [
        (
            Notify(fields=["pk", "status"]),
            "pgnotify.E003",
            "The primary key is always sent, as event.pk: leave 'pk' out of fields.",
        ),
        (
            Notify(when_changed=["pk"]),
            "pgnotify.E004",
            "Name the primary key by its field name, 'id'.",
        ),
    ],
    ids=["fields", "when-changed"],
)
def test_e003_e004_pk_is_not_a_field_name_and_the_hint_says_what_to_write(
    registry, notify, id, hint
):
    declare(notify)

    message = only(check_models(registry), id)
    option = "fields" if id == "pgnotify.E003" else "when_changed"
    assert message.msg == (
        f"testapp.Shipment:default: {option} names 'pk', which is not a field of "
        "testapp.Shipment; its primary key is 'id'."
    )
    assert message.hint == hint


def test_e003_fields_given_as_a_bare_string(registry):
    declare(Notify(fields="status"))

    message = only(check_models(registry), "pgnotify.E003")
    assert "testapp.Shipment:default: fields must be a list" in message.msg
    assert "lower case" not in message.msg


def test_e003_all_fields_in_the_wrong_case_is_told_so(registry):
    declare(Notify(fields="__ALL__"))

    message = only(check_models(registry), "pgnotify.E003")
    assert message.msg.endswith(
        "fields must be a list of field names, got '__ALL__' (\"__all__\" is written in lower "
        "case)."
    )


@pytest.mark.parametrize(
    ("notify", "text"),
    [
        (Notify(fields="__all__"), "fields names 'agent', a relation whose column type"),
        (Notify(fields=["agent"]), "fields names 'agent', a relation whose column type"),
        (Notify(when_changed=["agent"]), "when_changed names 'agent', a relation whose"),
    ],
    ids=["all-fields", "fields", "when-changed"],
)
def test_e003_e004_a_relation_to_a_model_that_is_not_installed(registry, notify, text):
    """Not a crash of the checks that hides Django's own fields.E300."""

    class Shipment(models.Model):
        agent = models.ForeignKey("testapp.Agent", on_delete=models.CASCADE)

        class Meta:
            app_label = "testapp"
            pgnotify = notify

    (message,) = check_models(registry)
    assert message.id in {"pgnotify.E003", "pgnotify.E004"}
    assert f"testapp.Shipment:default: {text}" in message.msg
    assert "'testapp.Agent' cannot be resolved" in message.msg


def test_e003_a_primary_key_relation_to_a_model_that_is_not_installed(registry):
    class Shipment(models.Model):
        agent = models.OneToOneField("testapp.Agent", on_delete=models.CASCADE, primary_key=True)

        class Meta:
            app_label = "testapp"
            pgnotify = Notify()

    message = only(check_models(registry), "pgnotify.E003")
    assert message.msg.startswith("testapp.Shipment: its primary key 'agent' is a relation")
    assert "'testapp.Agent' cannot be resolved" in message.msg


def test_e004_unknown_when_changed_field(registry):
    declare(Notify(when_changed=["colour"]))

    message = only(check_models(registry), "pgnotify.E004")
    assert "testapp.Shipment:default: when_changed names 'colour'" in message.msg


def declare_generated(declared) -> type[models.Model]:
    """A ``testapp.Gauge`` with a virtual and a stored generated column."""

    class Gauge(models.Model):
        value = models.IntegerField()
        double = models.GeneratedField(
            expression=models.F("value") * 2, output_field=models.IntegerField(), db_persist=False
        )
        triple = models.GeneratedField(
            expression=models.F("value") * 3, output_field=models.IntegerField(), db_persist=True
        )

        class Meta:
            app_label = "testapp"
            pgnotify = declared

    return Gauge


@pytest.mark.parametrize("level", ["statement", "row"])
def test_all_fields_leaves_virtual_generated_columns_out(registry, level):
    """A trigger cannot read them: transition tables refuse them, row-level NEW has NULL."""
    gauge = declare_generated(Notify(fields="__all__", level=level))

    (declaration,), messages = resolve_model(gauge, raw_declarations(gauge))
    assert messages == []
    assert [c.field for c in declaration.fields] == ["value", "triple"]


@pytest.mark.parametrize(
    ("notify", "id", "option"),
    [
        (Notify(fields=["value", "double"]), "pgnotify.E003", "fields"),
        (Notify(fields=["double"], durable=True), "pgnotify.E003", "fields"),
        (Notify(when_changed=["double"]), "pgnotify.E004", "when_changed"),
        (
            Notify(fields=["value"], when_changed=["double"], level="row"),
            "pgnotify.E004",
            "when_changed",
        ),
    ],
    ids=["fields", "durable-fields", "when-changed", "row-level-when-changed"],
)
def test_e003_e004_a_virtual_generated_column(registry, notify, id, option):
    declare_generated(notify)

    message = only(check_models(registry), id)
    assert f"testapp.Gauge:default: {option} names 'double', a virtual generated" in message.msg
    assert "cannot be read by triggers; use db_persist=True" in message.hint


def test_a_stored_generated_column_is_accepted(registry):
    declare_generated(Notify(fields=["triple"], when_changed=["triple"]))

    assert check_models(registry) == []


@pytest.mark.parametrize(
    ("channel", "shown"),
    [
        ("c" * 64, "64 bytes"),
        ("é" * 32, "64 bytes"),
        ("", "''"),
        (5, "5"),
        ("a\0b", "'a\\x00b'"),
        ("orders\ud800", "is not valid Unicode text"),
        ("pgnotify_durable", "the channel of durable declarations' wake-ups"),
    ],
    ids=[
        "too-long",
        "too-long-in-bytes",
        "empty",
        "not-a-string",
        "nul",
        "lone-surrogate",
        "durable-wake-ups",
    ],
)
def test_e005_channel(registry, channel, shown):
    declare(Notify(channel=channel))

    message = only(check_models(registry), "pgnotify.E005")
    assert "testapp.Shipment:default: channel" in message.msg
    assert shown in message.msg


def test_a_channel_of_exactly_63_bytes_is_accepted(registry):
    declare(Notify(channel="c" * 63))

    assert check_models(registry) == []


def test_e006_proxy_declaring_something_else_than_its_concrete_model(registry):
    shipment = declare(Notify(fields=["status"]))

    class ShipmentProxy(shipment):
        class Meta:
            app_label = "testapp"
            proxy = True
            pgnotify = Notify(fields=["weight"])

    message = only(check_models(registry), "pgnotify.E006")
    assert "testapp.ShipmentProxy is a proxy model" in message.msg
    assert "testapp.Shipment" in message.hint


def test_a_proxy_repeating_its_concrete_models_declaration_is_accepted(registry):
    shipment = declare(Notify(fields=["status"]))

    class ShipmentProxy(shipment):
        class Meta:
            app_label = "testapp"
            proxy = True
            pgnotify = Notify(fields=["status"])

    assert check_models(registry) == []


@pytest.mark.parametrize(
    ("declarations", "names"),
    [
        ([Notify(name="status"), Notify(name="status")], ["'status'", "'status'"]),
        ([Notify(name="by-status"), Notify(name="all")], ["'by-status'"]),
        ([Notify(name="status\n"), Notify(name="all")], ["'status\\n'"]),
        ([Notify(name="notify2"), Notify()], ["'notify2'", "'notify2'"]),
        (Notify(name=""), ["''"]),
        (Notify(name=7), ["7"]),
    ],
    ids=["duplicate", "dash", "trailing-newline", "clashes-with-default", "empty", "not-a-string"],
)
def test_e007_declaration_names(registry, declarations, names):
    declare(declarations)

    messages = check_models(registry)
    assert [m.id for m in messages] == ["pgnotify.E007"] * len(names)
    for message, name in zip(messages, names, strict=True):
        assert message.msg.startswith("testapp.Shipment: declaration #")
        problem = "another declaration's too" if names.count(name) > 1 else "not valid"
        assert f"has name {name} ({problem});" in message.msg


def test_several_declarations_with_distinct_names_are_accepted(registry):
    declare([Notify(events=["insert"]), Notify(events=["delete"], name="gone")])

    assert check_models(registry) == []


def test_e008_durable_that_is_not_a_bool(registry):
    declare(Notify(durable="yes"))

    message = only(check_models(registry), "pgnotify.E008")
    assert "testapp.Shipment:default: durable must be True or False" in message.msg


def test_durable_declaration_with_max_attempts_is_accepted(registry):
    declare(Notify(durable=True, max_attempts=3))

    assert check_models(registry) == []


@pytest.mark.parametrize(
    ("max_attempts", "shown"), [(0, "0"), (True, "True"), ("3", "'3'")], ids=["zero", "bool", "str"]
)
def test_e008_max_attempts_must_be_a_positive_integer(registry, max_attempts, shown):
    declare(Notify(durable=True, max_attempts=max_attempts))

    message = only(check_models(registry), "pgnotify.E008")
    assert message.msg == (
        f"testapp.Shipment:default: max_attempts must be a positive integer, got {shown}."
    )


def test_e008_max_attempts_on_a_live_declaration_says_it_is_for_durable_ones(registry):
    """Not "must be a positive integer ... got 3": 3 is one, durable=True is missing."""
    declare(Notify(fields=["status"], max_attempts=3))

    message = only(check_models(registry), "pgnotify.E008")
    assert message.msg.startswith(
        "testapp.Shipment:default: max_attempts applies to durable declarations only"
    )
    assert "positive integer" not in message.msg
    assert "durable=True" in message.hint


def test_e008_a_live_declaration_with_max_attempts_zero_is_told_both(registry):
    declare(Notify(max_attempts=0))

    messages = check_models(registry)
    assert [m.id for m in messages] == ["pgnotify.E008", "pgnotify.E008"]
    assert "must be a positive integer, got 0" in messages[0].msg
    assert "applies to durable declarations only" in messages[1].msg


def test_row_level_live_declaration_is_accepted(registry):
    declare(Notify(fields=["status"], when_changed=["status"], level="row"))

    assert check_models(registry) == []


@pytest.mark.parametrize(
    ("notify", "text"),
    [
        (Notify(level="rows"), "level must be one of 'statement', 'row', got 'rows'"),
        (Notify(level="row", durable=True), "level='row' is for live declarations"),
    ],
    ids=["unknown", "durable"],
)
def test_e013_level_is_statement_or_row_and_row_is_live_only(registry, notify, text):
    declare(notify)

    message = only(check_models(registry), "pgnotify.E013")
    assert f"testapp.Shipment:default: {text}" in message.msg


def test_w002_when_changed_without_update(registry):
    declare(Notify(events=["insert", "delete"], when_changed=["status"]))

    message = only(check_models(registry), "pgnotify.W002")
    assert message.level == checks.WARNING
    assert "testapp.Shipment:default: when_changed has no effect" in message.msg


def test_old_false_live_durable_and_row_level_declarations_are_accepted(registry):
    declare(
        [
            Notify(fields=["status"], old=False),
            Notify(fields=["status"], old=False, durable=True, name="stored"),
            Notify(fields=["status"], old=False, level="row", name="rows"),
        ]
    )

    assert check_models(registry) == []


@pytest.mark.parametrize(
    ("notify", "text"),
    [
        (Notify(old="no"), "old must be True or False, got 'no'"),
        (Notify(old=0), "old must be True or False, got 0"),
        (
            Notify(fields=["status"], when_changed=["status"], old=False),
            "when_changed compares an update's old and new values, which old=False leaves unread",
        ),
    ],
    ids=["string", "zero", "when-changed"],
)
def test_e015_old_is_a_bool_and_false_cannot_have_when_changed(registry, notify, text):
    declare(notify)

    message = only(check_models(registry), "pgnotify.E015")
    assert f"testapp.Shipment:default: {text}" in message.msg


def test_w002_old_false_without_update(registry):
    declare(Notify(events=["insert"], old=False))

    message = only(check_models(registry), "pgnotify.W002")
    assert "testapp.Shipment:default: old=False has no effect" in message.msg


def test_w002_channel_of_a_durable_declaration(registry):
    declare(Notify(durable=True, channel="shipments"))

    message = only(check_models(registry), "pgnotify.W002")
    assert message.msg.startswith(
        "testapp.Shipment:default: channel has no effect because the declaration is durable"
    )


def test_every_mistake_of_a_declaration_is_reported_at_once(registry):
    declare(Notify(events=["upsert"], fields=["colour"], when_changed=["size"], channel=""))

    ids = {m.id for m in check_models(registry)}
    assert ids == {"pgnotify.E002", "pgnotify.E003", "pgnotify.E004", "pgnotify.E005"}


def test_w007_notify_on_the_class_body_instead_of_meta(registry):
    class Shipment(models.Model):
        status = models.CharField(max_length=20)
        pgnotify = Notify(fields=["status"])

        class Meta:
            app_label = "testapp"

    message = only(check_models(registry), "pgnotify.W007")
    assert message.msg == (
        "testapp.Shipment has pgnotify = Notify(...) as a class attribute, where it declares "
        "nothing: a declaration goes in the model's class Meta."
    )
    assert message.hint == "Move it into the model's Meta: class Meta: pgnotify = Notify(...)."
    assert message.obj is Shipment
    assert raw_declarations(Shipment) is None


def test_w007_any_attribute_name_a_list_and_an_abstract_parents(registry):
    class Base(models.Model):
        notify = [Notify(name="a"), Notify(name="b")]

        class Meta:
            abstract = True
            app_label = "testapp"

    class Shipment(Base):
        status = models.CharField(max_length=20)
        changes = Notify()

        class Meta:
            app_label = "testapp"
            pgnotify = Notify(fields=["status"])

    messages = check_models(registry)
    assert [m.id for m in messages] == ["pgnotify.W007", "pgnotify.W007"]
    assert "testapp.Shipment has changes = Notify(...) as a class attribute," in messages[0].msg
    assert "has notify = Notify(...) as a class attribute (from Base)," in messages[1].msg


def test_w007_is_reported_on_the_model_that_has_it_not_its_children(registry):
    class Vehicle(models.Model):
        pgnotify = Notify()

        class Meta:
            app_label = "testapp"

    class Truck(Vehicle):
        class Meta:
            app_label = "testapp"

    class TruckProxy(Truck):
        class Meta:
            app_label = "testapp"
            proxy = True

    message = only(check_models(registry), "pgnotify.W007")
    assert message.obj is Vehicle


def test_no_w007_for_a_class_attribute_that_is_the_declaration_meta_uses(registry):
    declared = Notify()

    class Shipment(models.Model):
        notify = declared

        class Meta:
            app_label = "testapp"
            pgnotify = declared

    assert check_models(registry) == []


def test_w007_hint_when_the_meta_option_is_off(registry):
    class Shipment(models.Model):
        pgnotify = Notify()

        class Meta:
            app_label = "testapp"

    with override_settings(PGNOTIFY={"META_OPTION": False}):
        message = only(check_models(registry), "pgnotify.W007")
    assert message.hint == (
        'PGNOTIFY["META_OPTION"] is off: declare it in PGNOTIFY["MODELS"]["testapp.Shipment"] '
        "instead."
    )


def test_e011_composite_primary_key(registry):
    class OrderLine(models.Model):
        pk = models.CompositePrimaryKey("order_no", "line_no")
        order_no = models.IntegerField()
        line_no = models.IntegerField()

        class Meta:
            app_label = "testapp"
            pgnotify = Notify(fields="__all__")

    message = only(check_models(registry), "pgnotify.E011")
    assert "testapp.OrderLine has a composite primary key (order_no, line_no)" in message.msg


def wide_model(count: int, durable: bool = False) -> type[models.Model]:
    """A model of ``count`` fields with 60-character names, all declared."""
    columns = {f"{'c' * 56}{i:04}": models.IntegerField(null=True) for i in range(count)}
    notify = Notify(fields="__all__", durable=durable)
    meta = type("Meta", (), {"app_label": "testapp", "pgnotify": notify})
    return type("Wide", (models.Model,), {"__module__": __name__, "Meta": meta, **columns})


def test_e012_column_names_that_leave_no_room_for_rows_in_a_notification(registry):
    wide_model(120)  # the update header lists 120 names twice: about 15 KB

    message = only(check_models(registry), "pgnotify.E012")
    assert message.msg.startswith("testapp.Wide:default: the names of its fields")
    assert "at least 1000 are needed" in message.msg


def test_e012_holds_with_the_checks_skipped(registry):
    """The commands read declarations through resolve_model, which refuses it too:
    installed, the trigger would fail every update of the table."""
    model = wide_model(120)

    declarations, messages = resolve_model(model, raw_declarations(model))

    assert declarations == []
    assert [m.id for m in messages] == ["pgnotify.E012"]


@pytest.mark.parametrize(("count", "durable"), [(30, False), (120, True)])
def test_e012_spares_headers_that_fit_and_durable_declarations(registry, count, durable):
    wide_model(count, durable)  # 30 names twice: about 3.8 KB, leaving over 3200 bytes

    assert check_models(registry) == []


def test_w004_a_header_that_leaves_a_long_context_no_room(registry):
    """50 names twice leave about 1500 bytes: rows keep 1000 of them, a context the rest."""
    model = wide_model(50)

    message = only(check_models(registry), "pgnotify.W004")
    limit = context_limit(resolve_model(model, raw_declarations(model))[0][0])
    assert 0 < limit < CONTEXT_MAX
    assert f"a context() longer than {limit} bytes as JSON text is left out" in message.msg


def unmanaged_twin(
    model: type[models.Model], declared: Notify, db_table: str | None = None
) -> type[models.Model]:
    """``testapp.ShipmentTwin``: an unmanaged model on ``model``'s table, or on ``db_table``."""
    meta = {"app_label": "testapp", "managed": False, "db_table": db_table or model._meta.db_table}
    return type(
        "ShipmentTwin",
        (models.Model,),
        {
            "__module__": __name__,
            "status": models.CharField(max_length=20),
            "Meta": type("Meta", (), {**meta, "pgnotify": declared}),
        },
    )


def test_e014_two_models_declaring_on_one_table_under_one_name(registry):
    shipment = declare(Notify(fields=["status"]))
    twin = unmanaged_twin(shipment, Notify(fields=["status"]))

    messages = [m for m in check_models(registry) if m.id == "pgnotify.E014"]

    assert [m.obj for m in messages] == [shipment, twin]
    assert "testapp.Shipment:default and testapp.ShipmentTwin:default" in messages[0].msg
    assert f"on table '{shipment._meta.db_table}'" in messages[0].msg


def test_w005_a_twin_naming_the_table_in_public_is_on_the_same_table_by_default(registry):
    """Only the database knows the search path: the installer refuses them if it is."""
    shipment = declare(Notify(fields=["status"]))
    twin = unmanaged_twin(shipment, Notify(fields=["status"]), '"public"."testapp_shipment"')

    messages = check_models(registry)

    assert [(m.id, m.obj) for m in messages] == [
        ("pgnotify.W005", shipment),
        ("pgnotify.W005", twin),
    ]
    assert (
        "testapp.Shipment:default on table 'testapp_shipment' and "
        "testapp.ShipmentTwin:default on table 'public.testapp_shipment'" in messages[0].msg
    )


def test_a_twin_naming_the_table_in_another_schema_is_on_another_table(registry):
    shipment = declare(Notify(fields=["status"]))
    unmanaged_twin(shipment, Notify(fields=["status"]), '"sales"."testapp_shipment"')

    assert check_models(registry) == []


def test_two_models_on_one_table_with_distinct_declaration_names_are_accepted(registry):
    unmanaged_twin(declare(Notify(fields=["status"])), Notify(fields=["status"], name="twin"))

    assert check_models(registry) == []


@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        (["MODELS"], "PGNOTIFY must be a dict"),
        ({"MODELS": ["auth.User"]}, 'PGNOTIFY["MODELS"] must map'),
        ({"MODELS": {"testapp.Nope": Notify()}}, "'testapp.Nope', which is not an installed"),
        ({"MODELS": {"testapp": Notify()}}, "'testapp', which is not an installed"),
        ({"MODELS": {5: Notify()}}, "names 5, which is not an installed"),
        ({"POLL_INTERVAL": 0}, 'PGNOTIFY["POLL_INTERVAL"] must be a finite number greater than 0'),
        ({"POLL_INTERVAL": -1}, "got -1"),
        ({"POLL_INTERVAL": "1"}, "got '1'"),
        ({"POLL_INTERVAL": True}, "got True"),
        ({"DURABLE_WAKEUP": "yes"}, 'PGNOTIFY["DURABLE_WAKEUP"] must be True or False'),
        ({"INSTALL_ON_MIGRATE": 1}, 'PGNOTIFY["INSTALL_ON_MIGRATE"] must be True or False'),
        ({"DURABLE_BATCH_SIZE": 0}, 'PGNOTIFY["DURABLE_BATCH_SIZE"] must be an integer at least 1'),
        ({"DURABLE_LEASE": -5}, 'PGNOTIFY["DURABLE_LEASE"] must be a finite number greater than 0'),
        ({"CHANNEL_LAYER": "nope"}, "PGNOTIFY[\"CHANNEL_LAYER\"] is 'nope', which is not in"),
        ({"CHANNEL_LAYER": ["default"]}, "is ['default'], which is not in"),
        ({"APPLICATION_NAME": "x" * 56}, 'PGNOTIFY["APPLICATION_NAME"] must be printable ASCII'),
        ({"APPLICATION_NAME": "pgnotify_écoute"}, "got 'pgnotify_écoute'"),
    ],
    ids=[
        "not-a-dict",
        "models-not-a-dict",
        "unknown-model",
        "app-label-only",
        "label-not-a-string",
        "poll-zero",
        "poll-negative",
        "poll-string",
        "poll-bool",
        "flag-string",
        "flag-number",
        "durable-batch-zero",
        "durable-lease-negative",
        "channel-layer-unknown",
        "channel-layer-not-a-name",
        "application-name-too-long",
        "application-name-not-ascii",
    ],
)
def test_e010_pgnotify_setting(setting, shown):
    with override_settings(PGNOTIFY=setting):
        message = only(check_declarations(), "pgnotify.E010")

    assert shown in message.msg


@pytest.mark.parametrize(
    ("declared", "shown"),
    [
        (
            {"auth.User_groups": Notify()},
            "names 'auth.User_groups', the table Django creates for a many-to-many field",
        ),
        (
            {"testapp.Tag": Notify(), "testapp.tag": Notify(fields=["colour"])},
            "names testapp.Tag twice, as 'testapp.Tag' and 'testapp.tag'",
        ),
    ],
    ids=["auto-created-through-model", "same-model-twice"],
)
def test_e010_models_entries_that_would_be_ignored(declared, shown):
    with override_settings(PGNOTIFY={"MODELS": declared}):
        message = only(check_declarations(), "pgnotify.E010")

    assert shown in message.msg


def test_e010_models_entry_for_a_swapped_out_model():
    """Swapped out (here for a model of the test app), auth.User has no table: the
    test settings' declaration of it would never be installed."""
    with override_settings(AUTH_USER_MODEL="testapp.Customer"):
        message = only(check_declarations(), "pgnotify.E010")

    assert message.msg.startswith(
        "PGNOTIFY[\"MODELS\"] names 'auth.User', which is swapped out for 'testapp.Customer' "
        "(settings.AUTH_USER_MODEL)"
    )


def test_models_keys_are_case_insensitive_for_the_checks_too():
    declared = Notify(fields=["colour"])
    with override_settings(PGNOTIFY={"MODELS": {"TestApp.TAG": declared}}):
        assert check_declarations() == []
        assert raw_declarations(apps.get_model("testapp", "Tag")) is declared


def test_models_that_is_not_a_dict_does_not_hide_the_other_settings_mistakes():
    with override_settings(PGNOTIFY={"MODELS": ["auth.User"], "POLL_INTERVAL": 0}):
        messages = check_declarations()

    assert [m.id for m in messages] == ["pgnotify.E010", "pgnotify.E010"]
    assert 'PGNOTIFY["POLL_INTERVAL"]' in messages[1].msg


def test_e001_for_a_model_declared_in_settings_with_something_else_than_notify():
    with override_settings(PGNOTIFY={"MODELS": {"testapp.Tag": "yes"}}):
        message = only(check_declarations(), "pgnotify.E001")

    assert "testapp.Tag" in message.msg


def test_w003_unknown_pgnotify_key():
    with override_settings(PGNOTIFY={"POLL_INTERVALL": 1}):
        message = only(check_declarations(), "pgnotify.W003")

    assert message.level == checks.WARNING
    assert "'POLL_INTERVALL'" in message.msg
    assert message.hint.startswith("Did you mean 'POLL_INTERVAL'? Known settings: MODELS, ")


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("durable_batchsize", "Did you mean 'DURABLE_BATCH_SIZE'? Known settings: "),
        ("COLOUR", "Known settings: MODELS, "),
    ],
)
def test_w003_suggests_the_setting_a_key_most_likely_misspells(key, hint):
    with override_settings(PGNOTIFY={key: 1}):
        message = only(check_declarations(), "pgnotify.W003")

    assert message.hint.startswith(hint)


class EventTableOnDefaultOnly:
    """A router that keeps django_pgnotify (its event table) off every database but
    "default", while other apps, the durable test app's included, migrate everywhere."""

    def allow_migrate(self, db: str, app_label: str, **hints: object) -> bool | None:
        return db == "default" if app_label == "django_pgnotify" else None


@override_settings(DATABASE_ROUTERS=[f"{__name__}.EventTableOnDefaultOnly"])
def test_w006_a_durable_model_on_a_database_the_event_table_is_not_migrated_to():
    """A warning, which blocks neither migrate nor any command: "other" may be another
    alias of the default database (a pooled and a direct connection), and the installer
    refuses the model's triggers where the event table is not."""
    from tests.durableapp.models import Job

    message = only(check_declarations(), "pgnotify.W006")

    assert message.level == checks.WARNING
    assert message.obj is Job
    assert message.msg.startswith(
        "durableapp.Job declares durable=True and migrates to database 'other', but the "
        "database router does not migrate django_pgnotify there"
    )
    assert "'pgnotify_event'" in message.msg
    assert (
        "This is fine if 'other' shares its database with an alias where django_pgnotify "
        "is migrated"
    ) in message.msg
    assert "migrate django_pgnotify --database other" in message.hint
    assert "add 'pgnotify.W006' to SILENCED_SYSTEM_CHECKS" in message.hint
    call_command("check", "--fail-level", "ERROR", stdout=StringIO(), stderr=StringIO())


def test_e009_declarations_on_a_database_that_is_not_postgresql():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)

    result = subprocess.run(
        [sys.executable, "-m", "django", "check", "--settings", "tests.settings_sqlite"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "pgnotify.E009" in result.stderr
    assert "testapp.Order declares pgnotify but database 'default'" in result.stderr
    assert "sqlite3" in result.stderr
