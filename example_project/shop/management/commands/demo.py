"""``manage.py demo``: a stream of realistic order changes, and the events they announce.

It migrates, installs the triggers, serves the live orders dashboard with Uvicorn in a
background thread (the listener runs inside that server, forwarding to the channel layer),
and then changes orders a few times a second the way a shop does (new orders, payments,
shipping, discounts, refunds, bulk updates, deletes, a write from a client that is not
Django, and note edits that announce nothing), printing every event as it arrives.
``--no-serve`` runs only a listener, in a thread of its own.
"""

from __future__ import annotations

import logging
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import psycopg
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection
from django.utils import timezone
from psycopg import sql

from django_pgnotify import RowChange, row_changed
from django_pgnotify.connection import connection_params, describe
from django_pgnotify.declarations import get_declarations
from django_pgnotify.listener import Listener
from shop.models import Order

CUSTOMERS = ["Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Frances"]
NOTES = [
    "Leave at the back door.",
    "Gift wrap, please.",
    "Customer called about delivery time.",
    "Fragile.",
    "Deliver after 5 pm.",
]
#: How long to wait, after the last change, for its events to arrive.
GRACE_SECONDS = 5.0


class EventCount:
    """Events received so far, counted in the listener thread and awaited in the main one."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = threading.Condition()

    def add(self) -> None:
        with self._changed:
            self.value += 1
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> int:
        with self._changed:
            self._changed.wait_for(lambda: self.value >= count, timeout)
            return self.value


class Shop:
    """Makes one realistic change to the orders at a time.

    Each step returns how many row_changed events it should produce: the Notify
    declaration of ``Order`` announces inserts, deletes, and updates of status or total.
    """

    def __init__(self, say: Callable[[str], None], seed: int | None = None) -> None:
        self.say = say
        self.random = random.Random(seed)
        self.raw_pid: int | None = None
        self._raw: psycopg.Connection | None = None
        self.silent = 0
        # The first steps tell the whole story once; then the shop goes on at random.
        self.opening = [
            self.new_order,
            self.new_order,
            self.new_order,
            self.pay,
            self.pay,
            self.edit_note,
            self.insert_with_raw_sql,
            self.pay,
            self.discount,
            self.ship_paid_in_bulk,
            self.refund,
            self.delete_old_order,
        ]
        self.weighted: list[tuple[Callable[[], int | None], float]] = [
            (self.new_order, 4),
            (self.pay, 3),
            (self.ship, 2),
            (self.discount, 1),
            (self.refund, 0.7),
            (self.edit_note, 1.5),
            (self.ship_paid_in_bulk, 0.5),
            (self.delete_old_order, 0.4),
            (self.insert_with_raw_sql, 0.7),
        ]

    def step(self) -> int:
        if self.opening:
            action = self.opening.pop(0)
        else:
            actions, weights = zip(*self.weighted, strict=True)
            action = self.random.choices(actions, weights)[0]
        made = action()
        # Nothing to act on yet (no paid order to ship...): a new order always works.
        return made if made is not None else self.new_order()

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()

    def pick(self, *statuses: str) -> Order | None:
        return Order.objects.filter(status__in=statuses).order_by("?").first()

    def price(self) -> Decimal:
        return Decimal(self.random.randrange(500, 12000)) / 100

    def new_order(self) -> int:
        Order.objects.create(
            customer=self.random.choice(CUSTOMERS), status="new", total=self.price()
        )
        return 1

    def move(self, order: Order | None, status: str) -> int | None:
        if order is None:
            return None
        order.status = status
        order.save()
        return 1

    def pay(self) -> int | None:
        return self.move(self.pick("new"), "paid")

    def ship(self) -> int | None:
        return self.move(self.pick("paid"), "shipped")

    def refund(self) -> int | None:
        return self.move(self.pick("paid", "shipped"), "refunded")

    def discount(self) -> int | None:
        order = self.pick("new")
        if order is None:
            return None
        order.total = (order.total * Decimal("0.9")).quantize(Decimal("0.01"))
        order.save()
        return 1

    def edit_note(self) -> int | None:
        order = self.pick("new", "paid", "shipped")
        if order is None:
            return None
        order.note = self.random.choice(NOTES)
        order.save()  # a full save, but only the note differs: when_changed keeps it quiet
        self.silent += 1
        self.say(f"order #{order.pk}: note edited (not announced: note is not in when_changed)")
        return 0

    def ship_paid_in_bulk(self) -> int | None:
        ids = list(Order.objects.filter(status="paid").values_list("pk", flat=True)[:4])
        if len(ids) < 2:
            return None
        shipped = Order.objects.filter(pk__in=ids, status="paid").update(status="shipped")
        self.say(f"bulk update: {shipped} paid orders -> shipped (QuerySet.update, no save())")
        return shipped

    def delete_old_order(self) -> int | None:
        order = Order.objects.filter(status__in=["shipped", "refunded"]).order_by("pk").first()
        if order is None:
            return None
        order.delete()
        return 1

    def insert_with_raw_sql(self) -> int:
        """An order typed in at the till: plain SQL on a connection Django knows nothing of."""
        if self._raw is None:
            self._raw = psycopg.connect(
                **connection_params("default"), autocommit=True, application_name="shop-till"
            )
            self.raw_pid = self._raw.info.backend_pid
        self._raw.execute(
            sql.SQL(
                "INSERT INTO {} (customer, status, total, note) VALUES (%s, 'new', %s, '')"
            ).format(sql.Identifier(Order._meta.db_table)),
            [self.random.choice(CUSTOMERS), self.price()],
        )
        return 1


class Command(BaseCommand):
    help = (
        "Make a stream of order changes and print the row_changed events they announce, "
        "until Ctrl-C or --seconds have passed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--seconds",
            type=float,
            default=None,
            help="Stop after this many seconds (default: run until Ctrl-C).",
        )
        parser.add_argument(
            "--rate",
            type=float,
            default=3.0,
            help="Changes per second, roughly (default: 3).",
        )
        parser.add_argument("--seed", type=int, default=None, help="Seed for repeatable runs.")
        parser.add_argument(
            "--port",
            type=int,
            default=8000,
            help="Serve the dashboard on this port (default: 8000; 0 or taken: a free one).",
        )
        parser.add_argument(
            "--no-serve",
            action="store_false",
            dest="serve",
            help="Do not serve the dashboard; only print the events.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        seconds, rate = options["seconds"], options["rate"]
        if rate <= 0 or (seconds is not None and seconds <= 0):
            raise CommandError("--rate and --seconds must be positive numbers.")
        self.print_lock = threading.Lock()

        call_command("migrate", verbosity=0, interactive=False)
        call_command("pgnotify_install", verbosity=0)
        self.write(self.style.MIGRATE_HEADING(self.database_banner()))

        failure: list[BaseException] = []
        if options["serve"]:
            self.create_demo_user()
            listener, thread, stop_listening = self.serve(options["port"], failure)
        else:
            listener, thread, stop_listening = self.listen(failure)

        if options["verbosity"] < 2:
            # The listener's and the shop receiver's log lines would repeat what we print.
            # (Here: importing the ASGI application configures logging again.)
            for name in ("django_pgnotify", "shop"):
                logging.getLogger(name).setLevel(logging.WARNING)

        received = EventCount()
        self.shop = Shop(self.remark, options["seed"])

        def show(sender: type[Order], event: RowChange, **kwargs: Any) -> None:
            self.write(self.describe(event))
            received.add()

        row_changed.connect(show, sender=Order, weak=False, dispatch_uid="shop-demo")
        thread.start()
        stopping = threading.Event()
        previous = {
            sig: signal.signal(sig, lambda *_: stopping.set())
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        made = 0
        started = time.monotonic()
        try:
            if not self.wait_until_ready(listener, thread, failure):
                raise CommandError(f"The listener did not start: {failure[0] if failure else ''}")
            listener = listener if isinstance(listener, Listener) else listener.listener
            if options["serve"]:
                layer = "in-memory" if settings.IN_PROCESS_LISTENER else "channels_redis"
                self.write(
                    self.style.SUCCESS(f"Live dashboard: {self.url} (log in as demo / demo)")
                    + f"; {layer} channel layer, listener inside the server."
                )
            channels = ", ".join(listener.channels)
            until = f"for {seconds:g} s" if seconds else "until Ctrl-C"
            self.write(f"Listening on {channels}; about {rate:g} changes a second {until}.")

            deadline = started + seconds if seconds else None
            while not stopping.is_set() and not failure:
                made += self.shop.step()
                pause = self.shop.random.uniform(0.5, 1.5) / rate
                if deadline is not None:
                    pause = min(pause, deadline - time.monotonic())
                    if pause <= 0:
                        break
                stopping.wait(pause)
            elapsed = time.monotonic() - started
            count = received.wait_for(made, GRACE_SECONDS if not failure else 0)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            stop_listening()
            thread.join(10)
            row_changed.disconnect(sender=Order, dispatch_uid="shop-demo")
            self.shop.close()

        if failure:
            raise CommandError(f"The listener stopped: {failure[0]}")
        silent = self.shop.silent
        summary = (
            f"\nMade {made} changes that notify (and {silent} note "
            f"{'edit that does' if silent == 1 else 'edits that do'} not) in {elapsed:.1f} s; "
            f"received {count} events."
        )
        if count < made:
            raise CommandError(f"{summary.strip()} {made - count} did not arrive.")
        self.write(self.style.SUCCESS(summary))

    def listen(self, failure: list[BaseException]) -> tuple[Any, threading.Thread, Any]:
        """A listener in a thread of its own (``--no-serve``)."""
        listener = Listener(get_declarations())

        def run() -> None:
            try:
                listener.run()
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)
                listener.ready.set()

        thread = threading.Thread(target=run, name="pgnotify-listener", daemon=True)
        return listener, thread, listener.stop

    def serve(self, port: int, failure: list[BaseException]) -> tuple[Any, threading.Thread, Any]:
        """Uvicorn in a thread, serving the dashboard, with the listener in its event loop."""
        import uvicorn
        from example_site.asgi import routes

        from django_pgnotify.asgi import with_listener

        application = with_listener(routes)
        port = port if port and port_is_free(port) else free_port()
        self.url = f"http://127.0.0.1:{port}/"
        config = uvicorn.Config(
            application, host="127.0.0.1", port=port, lifespan="on", log_level="warning"
        )
        self.server = uvicorn.Server(config)

        def run() -> None:
            try:
                self.server.run()
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)

        def stop() -> None:
            self.server.should_exit = True

        thread = threading.Thread(target=run, name="uvicorn", daemon=True)
        return application, thread, stop

    def wait_until_ready(self, listener: Any, thread: threading.Thread, failure: list) -> bool:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not failure and thread.is_alive():
            inner = listener if isinstance(listener, Listener) else listener.listener
            if inner is not None and inner.ready.is_set():
                return not failure
            time.sleep(0.05)
        return False

    def create_demo_user(self) -> None:
        """The dashboard's user: ``demo`` / ``demo``, allowed to view orders."""
        user, created = User.objects.get_or_create(username="demo")
        if created:
            user.set_password("demo")
            user.save()
        user.user_permissions.add(Permission.objects.get(codename="view_order"))

    def write(self, line: str) -> None:
        # Events are printed by the listener thread, remarks by the main one.
        with self.print_lock:
            self.stdout.write(line)
            self.stdout.flush()

    def remark(self, text: str) -> None:
        self.write(f"{timezone.localtime():%H:%M:%S}  -- {text}")

    def describe(self, event: RowChange) -> str:
        """One line per event: ``14:02:11  order #12  update  status new -> paid  total 19.90``."""
        when = timezone.localtime(event.timestamp) if event.timestamp else timezone.localtime()
        line = f"{when:%H:%M:%S}  {f'order #{event.pk}':<11} {event.action:<7}"
        if event.truncated:
            line += " (too large to send: pk only)"
        else:
            old = event.old or {}
            for name in ("status", "total"):
                value = event.fields.get(name)
                if name in event.changed:
                    line += f" {name} {old.get(name)} -> {value} "
                else:
                    line += f" {name} {value} "
        if event.pid == self.shop.raw_pid:
            line += " [raw SQL from another connection]"
        return line.rstrip()

    def database_banner(self) -> str:
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            (version,) = cursor.fetchone()
        if getattr(settings, "EMBEDDED_POSTGRES", False):
            return f"PostgreSQL {version}, embedded: started for this run, removed on exit."
        return f"PostgreSQL {version} at {describe(connection_params('default'))}."


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
