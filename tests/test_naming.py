"""How channels, triggers, functions and tables are named (pure, no database)."""

import pytest

from django_pgnotify import naming
from django_pgnotify.naming import TableName


def test_default_channel_is_prefix_app_label_and_model_name_in_lower_case():
    assert naming.default_channel("Shop", "Order") == "pgnotify_shop_order"


def test_long_default_channel_fits_63_bytes_and_stays_unique():
    first = naming.default_channel("inventory_" * 5, "warehouseitem")
    second = naming.default_channel("inventory_" * 5, "warehouseitemhistory")

    assert len(first.encode()) <= 63
    assert len(second.encode()) <= 63
    assert first.startswith("pgnotify_inventory_")
    assert first != second


@pytest.mark.parametrize(
    ("db_table", "expected"),
    [
        ("shop_order", TableName(None, "shop_order")),
        ('"sales"."order"', TableName("sales", "order")),
        ('sales"."order', TableName("sales", "order")),
        ("shop.order", TableName(None, "shop.order")),
        ('we""ird', TableName(None, 'we"ird')),
        ('"sales"."we""ird"', TableName("sales", 'we"ird')),
        ('"a"".""b"', TableName(None, 'a"."b')),
    ],
    ids=[
        "plain",
        "quoted-schema-and-table",
        "schema-and-table-django-wraps",
        "dot-without-quotes-is-one-name",
        "doubled-quote",
        "doubled-quote-in-schema-qualified",
        "quoted-dot-inside-one-name",
    ],
)
def test_parse_db_table_reads_the_name_as_postgresql_does(db_table, expected):
    assert naming.parse_db_table(db_table) == expected


def test_function_names_differ_when_table_and_declaration_names_run_together():
    order_x = naming.function_name(TableName(None, "shop_order"), "x")
    order_x_table = naming.function_name(TableName(None, "shop_order_x"), naming.DEFAULT_NAME)

    assert order_x != order_x_table


def test_function_names_differ_for_the_same_table_in_two_schemas():
    public = naming.function_name(TableName(None, "order"), naming.DEFAULT_NAME)
    sales = naming.function_name(TableName("sales", "order"), naming.DEFAULT_NAME)

    assert public != sales


def test_function_name_starts_with_prefix_and_table():
    name = naming.function_name(TableName("sales", "order"), "status")

    assert name.startswith("pgnotify_order_")
    assert len(name.encode()) <= 63


def test_trigger_name_of_the_default_declaration_is_prefix_and_event():
    assert naming.trigger_name(naming.DEFAULT_NAME, "insert") == "pgnotify_insert"


def test_trigger_name_of_a_named_declaration_includes_its_name():
    assert naming.trigger_name("status", "update") == "pgnotify_status_update"


def test_long_trigger_names_fit_63_bytes_and_stay_unique():
    names = {naming.trigger_name("x" * 70, event) for event in ("insert", "update", "delete")}

    assert len(names) == 3
    assert all(len(name.encode()) <= 63 for name in names)


@pytest.mark.parametrize(
    "build",
    [
        lambda text: naming.fit_identifier(text),
        lambda text: naming.default_channel("app", text),
        lambda text: naming.function_name(TableName(None, text), naming.DEFAULT_NAME),
    ],
    ids=["identifier", "channel", "function"],
)
def test_multi_byte_names_are_cut_on_a_character_boundary(build):
    text = "x" + "€" * 40  # 121 bytes; every builder's cut falls inside a "€"

    name = build(text)

    assert len(name.encode()) <= 63
    head = name.rsplit("_", 1)[0]
    assert "\ufffd" not in name
    assert text.startswith(head.removeprefix("pgnotify_").removeprefix("app_"))


def test_fit_identifier_leaves_names_within_the_limit_alone():
    name = "é" * 31  # 62 bytes

    assert naming.fit_identifier(name) == name


def test_uri_joins_model_label_and_declaration_name():
    assert naming.uri("shop.Order", "status") == "shop.Order:status"
