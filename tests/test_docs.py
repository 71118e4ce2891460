"""The code in the documentation is real: README.md and docs/*.md are read as tests.

- Every ``python`` block compiles, and every name it imports from django_pgnotify (and
  Django, psycopg) exists.
- Every model a block defines is created in an isolated app registry and its declarations
  pass django-pgnotify's checks; models whose fields an example elides with ``...`` get the
  fields their declarations name.
- Every block that connects a ``row_changed`` receiver runs, and the receiver is called with
  an insert, an update and a delete of an order like the one the examples declare.
- Every block that sets ``PGNOTIFY`` passes the settings checks, unknown keys included.
- Every ``manage.py`` command line in a ``console`` block parses with that command's own
  argument parser, so a documented flag cannot disappear unnoticed; and every option of the
  ``pgnotify_*`` commands, every ``PGNOTIFY`` key and every check id is described in
  docs/commands.md, docs/settings.md and docs/checks.md.

A block that includes a file of the repository (pymdownx.snippets: ``--8<--``, a path,
``--8<--``) is checked as that file's contents. The example project itself runs in CI
(``manage.py demo``). See "Documentation" in docs/contributing.md.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import textwrap
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from django.core import checks
from django.core.management import get_commands, load_command_class
from django.core.management.base import BaseCommand, CommandError
from django.test.utils import isolate_apps, override_settings

from django_pgnotify import RowChange, row_changed
from django_pgnotify.checks import check_settings
from django_pgnotify.conf import DEFAULTS
from django_pgnotify.declarations import raw_declarations, resolve_model

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A fenced block, possibly indented (inside a list item): its language and its text.
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S
)
# Modules whose names the examples may import; anything else (the reader's `shop` app) is theirs.
CHECKED_MODULES = ("django_pgnotify", "django", "psycopg")
# Examples define models in this app, as if they were its models module.
EXAMPLE_MODULE = "tests.testapp.docs_example"


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(*langs: str) -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match["lang"] in langs:
                line = text.count("\n", 0, match.start()) + 2
                code = SNIPPET.sub(_included, textwrap.dedent(match["body"]))
                found.append(Block(page, line, match["lang"], code))
    return found


# A file of the repository included into a page (pymdownx.snippets), checked as its contents:
# `--8<-- "path"` or the block form, one path per line between two `--8<--` lines (which
# `ruff format` leaves alone, as it is not Python).
SNIPPET = re.compile(r'^--8<-- "(?P<one>[^"]+)"$|^--8<--\n(?P<many>.*?)^--8<--$', re.M | re.S)


def _included(match: re.Match) -> str:
    paths = [match["one"]] if match["one"] else match["many"].split()
    return "\n".join((ROOT / path).read_text(encoding="utf-8") for path in paths)


PYTHON = blocks("python")
CONSOLE = blocks("console", "bash", "shell")


def by_location(items: list[Block]) -> dict:
    return {"argvalues": items, "ids": [str(b) for b in items]}


def test_the_documentation_has_python_examples():
    assert len(PYTHON) > 20, [str(b) for b in PYTHON]


@pytest.mark.parametrize("block", **by_location(PYTHON))
def test_python_example_compiles(block: Block):
    compile(block.code, str(block), "exec")


@pytest.mark.parametrize("block", **by_location(PYTHON))
def test_python_example_imports_names_that_exist(block: Block):
    for node in ast.walk(ast.parse(block.code)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(CHECKED_MODULES):
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if not node.module.startswith(CHECKED_MODULES):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or _is_submodule(node.module, alias.name), (
                    f"{block}: {node.module} has no {alias.name}"
                )


def _is_submodule(package: str, name: str) -> bool:
    try:
        importlib.import_module(f"{package}.{name}")
    except ImportError:
        return False
    return True


MODEL_BLOCKS = [b for b in PYTHON if re.search(r"^class \w+\(models\.Model\)", b.code, re.M)]


@pytest.mark.parametrize("block", **by_location(MODEL_BLOCKS))
def test_models_in_examples_pass_the_checks(block: Block):
    tree = _fill_elided_fields(ast.parse(block.code))
    namespace = {"__name__": EXAMPLE_MODULE, "__package__": "tests.testapp"}
    exec("from django.db import models\nfrom django_pgnotify import Notify", namespace)
    with isolate_apps("tests.testapp"):
        exec(compile(tree, str(block), "exec"), namespace)
        defined = [
            value
            for value in namespace.values()
            if isinstance(value, type)
            and getattr(value, "__module__", None) == EXAMPLE_MODULE
            and hasattr(value, "_meta")
            and not value._meta.abstract
        ]
        assert defined, f"{block}: defines no model"
        errors = []
        for model in defined:
            _, messages = resolve_model(model, raw_declarations(model))
            errors += [m for m in messages if m.level >= checks.ERROR]
    assert not errors, f"{block}: {errors}"


def _fill_elided_fields(tree: ast.Module) -> ast.Module:
    """Replace ``...`` in a model's body with a text field per name its declarations use."""
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        elided = [
            s
            for s in node.body
            if isinstance(s, ast.Expr)
            and isinstance(s.value, ast.Constant)
            and s.value.value is ...
        ]
        if not elided:
            continue
        defined = {
            t.id
            for s in node.body
            if isinstance(s, ast.Assign)
            for t in s.targets
            if isinstance(t, ast.Name)
        }
        named = []
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "Notify":
                for keyword in call.keywords:
                    if keyword.arg in ("fields", "when_changed") and isinstance(
                        keyword.value, (ast.List, ast.Tuple)
                    ):
                        named += [
                            e.value for e in keyword.value.elts if isinstance(e, ast.Constant)
                        ]
        fields = [
            ast.parse(f"{name} = models.TextField()").body[0]
            for name in dict.fromkeys(named)
            if name not in defined
        ]
        index = node.body.index(elided[0])
        node.body[index : index + 1] = fields or [ast.Pass()]
    return ast.fix_missing_locations(tree)


RECEIVER_BLOCKS = [b for b in PYTHON if "@receiver(row_changed" in b.code]


def sample_events(model: type) -> list[RowChange]:
    """One change of each action of an order, as the listener would build them."""
    before = {"status": "new", "total": Decimal("19.90")}
    after = {"status": "paid", "total": Decimal("19.90")}
    return [
        RowChange(model=model, action="insert", pk=1, fields=before),
        RowChange(
            model=model,
            action="update",
            pk=1,
            fields=after,
            old=before,
            changed=frozenset({"status"}),
        ),
        RowChange(model=model, action="delete", pk=1, fields=after),
    ]


@pytest.mark.parametrize("block", **by_location(RECEIVER_BLOCKS))
def test_receiver_examples_handle_every_action(block: Block):
    """The example receivers run on an insert, an update and a delete of an order."""
    from tests.testapp.models import Order

    namespace = {"__name__": EXAMPLE_MODULE, "__package__": "tests.testapp", "Order": Order}
    exec("from django.dispatch import receiver\nfrom django_pgnotify import row_changed", namespace)
    tree = ast.parse(block.code)
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.decorator_list]
    exec(compile(tree, str(block), "exec"), namespace)
    try:
        for event in sample_events(Order):
            for name in names:
                namespace[name](sender=Order, event=event)
    finally:
        for name in names:
            row_changed.disconnect(namespace[name], sender=Order)


SETTINGS_BLOCKS = [b for b in PYTHON if re.search(r"^PGNOTIFY = ", b.code, re.M)]


@pytest.mark.parametrize("block", **by_location(SETTINGS_BLOCKS))
def test_pgnotify_settings_in_examples_pass_the_checks(block: Block):
    namespace: dict = {}
    exec(compile(block.code, str(block), "exec"), namespace)
    with override_settings(PGNOTIFY=namespace["PGNOTIFY"]):
        assert check_settings() == []


def _command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for block in CONSOLE:
        for line in block.code.splitlines():
            line = line.removeprefix("$ ").strip()
            match = re.match(r"(?:python\s+)?\S*manage\.py\s+(.*)", line)
            # Usage lines ([optional] {choices} ALIAS) describe the syntax; they are not run.
            if not match or re.search(r"[\[\]{}]|\bALIAS\b", line):
                continue
            args = shlex.split(match[1], comments=True)
            if args and args[0] in get_commands():
                found.append((f"{block}: {line}", args))
    return found


COMMAND_LINES = _command_lines()


def test_the_documentation_has_command_lines():
    assert any(args[0] == "pgnotify_install" for _, args in COMMAND_LINES)
    assert any(args[0] == "pgnotify_listen" for _, args in COMMAND_LINES)


@pytest.mark.parametrize(
    "args", [args for _, args in COMMAND_LINES], ids=[where for where, _ in COMMAND_LINES]
)
def test_documented_command_line_parses(args: list[str]):
    name, *options = args
    command = load_command_class(get_commands()[name], name)
    parser = command.create_parser("manage.py", name)
    try:
        parser.parse_args(options)
    except CommandError as exc:
        pytest.fail(f"manage.py {shlex.join(args)}: {exc}")


def _our_options() -> list[tuple[str, str]]:
    common = {
        option
        for action in BaseCommand().create_parser("manage.py", "base")._actions
        for option in action.option_strings
    }
    found = []
    for name, app in sorted(get_commands().items()):
        if app != "django_pgnotify":
            continue
        parser = load_command_class(app, name).create_parser("manage.py", name)
        for action in parser._actions:
            found += [
                (name, o) for o in action.option_strings if o.startswith("--") and o not in common
            ]
    return found


@pytest.mark.parametrize("command, option", _our_options())
def test_every_command_option_is_documented(command: str, option: str):
    text = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    assert f"`{option}" in text or f" {option}" in text, (
        f"manage.py {command} {option} is not described in docs/commands.md"
    )


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_every_setting_is_documented(key: str):
    text = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert f"| `{key}` |" in text, f'PGNOTIFY["{key}"] has no row in docs/settings.md'


def _check_ids() -> list[str]:
    found = set()
    for path in (ROOT / "django_pgnotify").rglob("*.py"):
        found |= set(re.findall(r"pgnotify\.[EW]\d{3}", path.read_text(encoding="utf-8")))
    return sorted(found)


@pytest.mark.parametrize("check_id", _check_ids())
def test_every_check_id_is_documented(check_id: str):
    text = (ROOT / "docs" / "checks.md").read_text(encoding="utf-8")
    assert f"| `{check_id}` |" in text, f"{check_id} has no row in docs/checks.md"


def test_every_page_is_in_the_site_navigation():
    # mkdocs build --strict fails on this too; the test says so without building the site.
    nav = set(re.findall(r"([\w-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {page.name for page in (ROOT / "docs").glob("*.md")}
    assert pages - nav == set(), "add these pages to nav in mkdocs.yml"
    assert nav - pages == set(), "these pages of nav in mkdocs.yml do not exist"
