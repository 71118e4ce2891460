#!/usr/bin/env python
"""Run the example project: ``python example_project/manage.py <command>`` from the repo root.

The repository root and this folder are put on ``sys.path`` first, so the example uses the
django_pgnotify package next to it and needs nothing installed beyond ``pip install -e ".[dev]"``.
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent


def main() -> None:
    for path in (str(HERE), str(REPO_ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
