"""What an operator runs beside the listener: its health file, pgnotify_prune."""

from __future__ import annotations

import pytest

from tests.conftest import django_env, run_manage, wait_until
from tests.test_status import LISTENER_SETTINGS, silent_port  # noqa: F401 (a fixture)


def test_a_health_file_that_cannot_be_written_is_warned_about_once_not_on_every_touch(
    listener_process, tmp_path
):
    directory = tmp_path / "not yet there"
    path = directory / "healthy"
    listener = listener_process(
        "testapp", "--settings", LISTENER_SETTINGS, "--health-file", str(path)
    )
    # The file is touched every POLL_INTERVAL (0.1 s): three statistics lines (every
    # 0.5 s) later, it was tried again many times.
    for _ in range(3):
        listener.wait_for(r"pgnotify: stats ", stream="err")

    warned = [line for _, line in listener.seen if "cannot touch health file" in line]
    assert len(warned) == 1, warned
    assert "No such file or directory" in warned[0]

    directory.mkdir()
    wait_until(path.exists, what="the health file created once its directory is there")
    listener.wait_for(r"health file .* is touched again", stream="err")

    assert listener.stop() == 0
    warnings = [line for line in listener.output("err") if "cannot touch health file" in line]
    assert warnings == warned
    assert not path.exists()


def test_prune_gives_up_on_a_server_that_never_answers_naming_the_database(silent_port):  # noqa: F811
    env = django_env(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{silent_port}/silent")
    # PROBE_TIMEOUT is 2 s in these settings; without a bound, the subprocess times out.
    result = run_manage("pgnotify_prune", "--settings", LISTENER_SETTINGS, env=env, timeout=30)

    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        f"CommandError: Database 'default' (postgres@127.0.0.1:{silent_port}/silent): did not "
        'answer within 2s (PGNOTIFY["PROBE_TIMEOUT"]): connection timeout expired'
    ) in result.stderr
    assert "Traceback" not in result.stderr


def test_prune_of_a_database_without_the_event_table_says_so_and_what_to_run(
    empty_database_url,
):
    env = django_env(DATABASE_URL=empty_database_url)

    result = run_manage("pgnotify_prune", "--skip-checks", env=env)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "CommandError: Database 'default' (" in result.stderr
    assert 'relation "pgnotify_event" does not exist' in result.stderr
    assert "run manage.py migrate django_pgnotify --database default" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "age",
    [
        "99999999999d",  # more days than a timedelta holds
        "3000000d",  # a timedelta, but before 4713 BC: PostgreSQL's "timestamp out of range"
    ],
)
def test_prune_refuses_an_age_too_long_ago_to_be_a_date_without_a_traceback(transactional_db, age):
    result = run_manage("pgnotify_prune", "--older-than", age)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"--older-than {age!r} is too long ago to be a date." in result.stderr
    assert "out of range" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--older-than", "30x"], "--older-than '30x': give a number and a unit"),
        (["--batch-size", "0"], "--batch-size must be at least 1."),
    ],
)
def test_prune_exits_2_on_wrong_usage_as_on_an_unknown_flag(options, message):
    result = run_manage("pgnotify_prune", *options)

    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
