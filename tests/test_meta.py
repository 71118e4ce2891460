"""Where declarations come from: ``class Meta``, inheritance and ``PGNOTIFY["MODELS"]``."""

import re
import subprocess
import sys

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.db import models
from django.db.migrations.state import ModelState
from django.test import override_settings
from django.test.utils import isolate_apps

from django_pgnotify import Notify
from django_pgnotify.checks import check_declarations
from django_pgnotify.declarations import get_declarations, raw_declarations, resolve_model
from tests.conftest import ROOT
from tests.testapp.models import (
    Article,
    Customer,
    Legacy,
    Logbook,
    Measurement,
    Named,
    Order,
    OrderProxy,
    Place,
    Price,
    Reading,
    Restaurant,
    Shift,
    Supplier,
    Tag,
    Weird,
)


def fields_of(declaration) -> tuple[str, ...]:
    return tuple(column.field for column in declaration.fields)


@isolate_apps("tests.testapp")
def test_meta_accepts_pgnotify_and_keeps_it_on_meta():
    declared = Notify(fields=["title"])

    class Note(models.Model):
        title = models.CharField(max_length=50)

        class Meta:
            app_label = "testapp"
            pgnotify = declared

    assert Note._meta.pgnotify is declared


def test_pgnotify_is_kept_out_of_migrations():
    state = ModelState.from_model(Order)

    assert "pgnotify" not in state.options
    assert Order._meta.pgnotify == Notify(
        fields=["status", "total"], when_changed=["status", "total"]
    )


def test_a_child_without_meta_inherits_the_declaration_of_its_abstract_parent():
    (declaration,) = get_declarations(["testapp.Customer"])

    assert declaration.model is Customer
    assert declaration.table.name == "testapp_customer"
    assert fields_of(declaration) == ("name",)


def test_a_child_with_its_own_meta_does_not_inherit_the_abstract_parents_declaration():
    assert not hasattr(Supplier._meta, "pgnotify")
    assert get_declarations(["testapp.Supplier"]) == []


@isolate_apps("tests.testapp")
def test_a_child_whose_meta_subclasses_the_parents_declares_nothing_with_none():
    """As the docs show it: the parent's Meta is subclassed, its declaration dropped."""

    class Depot(Named):
        class Meta(Named.Meta):
            app_label = "testapp"
            pgnotify = None

    assert raw_declarations(Depot) is None
    assert resolve_model(Depot, raw_declarations(Depot)) == ([], [])


def test_a_multi_table_child_announces_only_its_own_declaration_and_table():
    (restaurant,) = get_declarations(["testapp.Restaurant"])
    (place,) = get_declarations(["testapp.Place"])

    assert restaurant.model is Restaurant
    assert restaurant.table.name == "testapp_restaurant"
    assert restaurant.pk.column == "place_ptr_id"
    assert fields_of(restaurant) == ("cuisine",)
    assert place.model is Place
    assert fields_of(place) == ("name",)


def titled_and_post() -> tuple[type[models.Model], type[models.Model]]:
    """An abstract model whose Meta declares, and a concrete child without a Meta of its
    own (it takes the abstract one's). Call it inside ``isolate_apps``."""

    class Titled(models.Model):
        title = models.CharField(max_length=50)

        class Meta:
            abstract = True
            app_label = "testapp"
            pgnotify = Notify(fields=["title"])

    class Post(Titled):
        pass

    return Titled, Post


@isolate_apps("tests.testapp")
def test_a_multi_table_child_without_meta_takes_its_parents_abstract_declaration():
    # Django's rule: a child with no Meta of its own takes the first Meta along its
    # bases, here the abstract grandparent's. The check says so when fields clash.
    Titled, Post = titled_and_post()

    class LongPost(Post):
        body = models.TextField()

    class Note(Post):
        class Meta:
            app_label = "testapp"

    assert LongPost._meta.pgnotify is Titled.Meta.pgnotify
    assert getattr(Note._meta, "pgnotify", None) is None
    _, (error,) = resolve_model(LongPost, LongPost._meta.pgnotify)
    assert error.id == "pgnotify.E003"
    assert "LongPost takes this declaration from an abstract ancestor's Meta" in error.hint


def test_a_proxy_without_pgnotify_has_no_declarations_of_its_own():
    assert get_declarations(["testapp.OrderProxy"]) == []
    assert OrderProxy not in {d.model for d in get_declarations()}


@isolate_apps("tests.testapp")
def test_a_proxy_inheriting_the_meta_declaration_of_a_model_that_settings_redeclare():
    """The proxy declares nothing of its own: no E006 for a declaration it inherits."""
    _, Post = titled_and_post()

    class PostProxy(Post):
        class Meta(Post.Meta):
            proxy = True

    with override_settings(PGNOTIFY={"MODELS": {"testapp.Post": Notify()}}):
        assert resolve_model(PostProxy, raw_declarations(PostProxy)) == ([], [])
        ((declaration,), []) = resolve_model(Post, raw_declarations(Post))

    assert fields_of(declaration) == ()


def test_settings_declare_models_whose_meta_you_cannot_edit():
    (declaration,) = get_declarations(["auth.User"])

    assert declaration.model is User
    assert declaration.events == ("insert",)
    assert fields_of(declaration) == ("username",)


def test_settings_replace_a_meta_declaration():
    with override_settings(PGNOTIFY={"MODELS": {"testapp.Order": Notify(fields=["note"])}}):
        (declaration,) = get_declarations(["testapp.Order"])

    assert fields_of(declaration) == ("note",)
    assert declaration.when_changed == ()


def test_settings_turn_a_meta_declaration_off_with_none():
    """For a model whose Meta declares (a third-party app's, say) and announces nothing
    here: no declaration, no check message, nothing installed for it."""
    with override_settings(PGNOTIFY={"MODELS": {"testapp.Order": None}}):
        assert resolve_model(Order, raw_declarations(Order)) == ([], [])
        assert Order not in {d.model for d in get_declarations()}
        assert not [m for m in check_declarations() if m.obj is Order]


def test_selecting_an_app_gives_the_declarations_of_its_models():
    models_ = {d.model for d in get_declarations(["testapp"])}

    assert models_ == {
        Order,
        Reading,
        Tag,
        Article,
        Weird,
        Customer,
        Place,
        Restaurant,
        Legacy,
        Shift,
        Price,
        Measurement,
        Logbook,
    }


def test_selecting_a_model_gives_its_declarations_only():
    (declaration,) = get_declarations(["testapp.Order"])

    assert declaration.model is Order
    assert declaration.uri == "testapp.Order:default"


def test_no_selector_gives_every_declared_model():
    models_ = {d.model for d in get_declarations()}

    assert User in models_
    assert Order in models_


@pytest.mark.parametrize("selector", ["shop", "testapp.Nope", "testapp.Order.status"])
def test_an_unknown_selector_is_improperly_configured_and_named(selector):
    with pytest.raises(ImproperlyConfigured, match=re.escape(repr(selector))):
        get_declarations([selector])


def test_an_invalid_declaration_is_improperly_configured_with_its_check_id():
    with (
        override_settings(PGNOTIFY={"MODELS": {"testapp.Tag": Notify(fields=["nope"])}}),
        pytest.raises(ImproperlyConfigured, match=r"testapp\.Tag:default.*pgnotify\.E003"),
    ):
        get_declarations(["testapp.Tag"])


def test_meta_option_can_be_turned_off_leaving_django_untouched():
    script = """
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["django.contrib.contenttypes", "django_pgnotify"],
    PGNOTIFY={"META_OPTION": False},
)
django.setup()
from django.db import models
from django.db.models import options
assert "pgnotify" not in options.DEFAULT_NAMES
try:
    class Note(models.Model):
        class Meta:
            app_label = "contenttypes"
            pgnotify = None
except TypeError as exc:
    print("refused:", exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )

    assert result.returncode == 0, result.stderr
    assert "refused: 'class Meta' got invalid attribute(s): pgnotify" in result.stdout
