import codecs
import uuid
from zoneinfo import ZoneInfo

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.utils import timezone

from django_pgnotify import Notify


class Order(models.Model):
    status = models.CharField(max_length=20, default="new")
    total = models.DecimalField(max_digits=10, decimal_places=2, default=0)
    note = models.TextField(blank=True)

    class Meta:
        pgnotify = Notify(fields=["status", "total"], when_changed=["status", "total"])


class OrderProxy(Order):
    class Meta:
        proxy = True


class Reading(models.Model):
    """Every common field type, to check values arrive as Python types."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    order = models.ForeignKey(Order, null=True, on_delete=models.SET_NULL)
    taken_at = models.DateTimeField(default=timezone.now)
    day = models.DateField(null=True)
    at = models.TimeField(null=True)
    took = models.DurationField(null=True)
    amount = models.DecimalField(max_digits=20, decimal_places=6, null=True)
    ratio = models.FloatField(null=True)
    flag = models.BooleanField(default=False)
    data = models.JSONField(null=True)
    blob = models.BinaryField(null=True)
    token = models.UUIDField(null=True)
    count = models.BigIntegerField(null=True)

    class Meta:
        pgnotify = Notify(fields="__all__")


class Tag(models.Model):
    """A string primary key and the default declaration (pk only)."""

    name = models.CharField(max_length=50, primary_key=True)
    colour = models.CharField(max_length=20, default="red")

    class Meta:
        pgnotify = Notify()


class Article(models.Model):
    title = models.CharField(max_length=200)
    body = models.TextField(blank=True)

    class Meta:
        pgnotify = Notify(fields=["title", "body"], events=["insert", "update"])


class Weird(models.Model):
    """Names that need quoting everywhere: schema, table, column, channel."""

    label = models.CharField(max_length=50, db_column="La bel's $$ é")

    class Meta:
        db_table = '"pgnotify odd"."Weird Table\'s $$"'
        pgnotify = Notify(fields=["label"], channel='Odd "Channel" %s é')


class Named(models.Model):
    """Abstract parent whose declaration children inherit with its Meta."""

    name = models.CharField(max_length=50)

    class Meta:
        abstract = True
        pgnotify = Notify(fields=["name"])


class Customer(Named):
    pass


class Supplier(Named):
    class Meta:  # a Meta of its own that does not inherit Named.Meta: no declaration
        ordering = ["name"]


class Place(models.Model):
    name = models.CharField(max_length=50)

    class Meta:
        pgnotify = Notify(fields=["name"])


class Restaurant(Place):
    cuisine = models.CharField(max_length=50)

    class Meta:
        pgnotify = Notify(fields=["cuisine"])


class PlainJSONField(models.TextField):
    """A column of type json, which has no equality operator."""

    def db_type(self, connection):
        return "json"


class Legacy(models.Model):
    """A table with a column type that cannot be compared with '='."""

    doc = PlainJSONField(default="{}")
    title = models.CharField(max_length=50, default="")

    class Meta:
        pgnotify = Notify(fields=["title"])


class Shift(models.Model):
    """A DateTimeField primary key: its text differs between str() and ISO 8601."""

    starts_at = models.DateTimeField(primary_key=True)
    name = models.CharField(max_length=50, default="")

    class Meta:
        pgnotify = Notify(fields=["name"])


class Price(models.Model):
    """A DecimalField primary key: 1.5 and 1.50 are one row."""

    amount = models.DecimalField(max_digits=8, decimal_places=2, primary_key=True)
    label = models.CharField(max_length=50, default="")

    class Meta:
        pgnotify = Notify(fields=["label"])


class Measurement(models.Model):
    """Decimals of more digits than a float holds, in arrays of one and two dimensions."""

    readings = ArrayField(
        models.DecimalField(max_digits=30, decimal_places=10, null=True), default=list
    )
    grid = ArrayField(
        ArrayField(models.DecimalField(max_digits=30, decimal_places=10, null=True)), null=True
    )
    label = models.CharField(max_length=50, default="")

    class Meta:
        pgnotify = Notify(fields=["readings", "grid", "label"])


class Unsealed(Exception):
    """What ``SealedTextField`` raises for a stored value it did not seal (as a
    decryption library raises an error of its own, not a ``ValueError``)."""


class SealedTextField(models.TextField):
    """Stores its text sealed, as an encrypting field would (ROT13 behind a prefix):
    ``from_db_value`` opens it, and refuses a stored value that is not sealed."""

    SEAL = "sealed:"

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        return None if value is None else self.SEAL + codecs.encode(value, "rot13")

    def from_db_value(self, value, expression, connection):
        if value is None:
            return None
        if not value.startswith(self.SEAL):
            raise Unsealed(f"{value!r} was not sealed")
        return codecs.decode(value[len(self.SEAL) :], "rot13")


class CommaSeparatedField(models.TextField):
    """A list of words stored as one comma-separated text; NULL reads as no words."""

    def get_prep_value(self, value):
        return None if value is None else ",".join(value)

    def from_db_value(self, value, expression, connection):
        return [] if value is None else value.split(",")

    def to_python(self, value):
        return value.split(",") if isinstance(value, str) else value


class WallClockDateTimeField(models.DateTimeField):
    """Reads its instants as Berlin wall-clock time: ``from_db_value`` is given the
    ``datetime`` the database adapter makes, not text."""

    def from_db_value(self, value, expression, connection):
        return None if value is None else value.astimezone(ZoneInfo("Europe/Berlin"))


class Logbook(models.Model):
    """Arrays of the types whose JSON rendering depends on the writer's session
    (timestamptz, interval, bytea) and of other types the ORM reads into Python
    objects, in one and two dimensions; and fields whose ``from_db_value``
    changes what is stored."""

    moments = ArrayField(models.DateTimeField(null=True), default=list)
    shifts = ArrayField(ArrayField(models.DateTimeField(null=True)), null=True)
    days = ArrayField(models.DateField(null=True), default=list)
    times = ArrayField(models.TimeField(null=True), default=list)
    spans = ArrayField(ArrayField(models.DurationField(null=True)), null=True)
    tokens = ArrayField(models.UUIDField(null=True), default=list)
    blobs = ArrayField(models.BinaryField(null=True), default=list)
    ratios = ArrayField(models.FloatField(null=True), default=list)
    names = ArrayField(models.CharField(max_length=20, null=True), default=list)
    secret = SealedTextField(null=True)
    secrets = ArrayField(SealedTextField(null=True), default=list)
    tags = CommaSeparatedField(null=True)
    seen_at = WallClockDateTimeField(null=True)

    class Meta:
        pgnotify = Notify(fields="__all__")
