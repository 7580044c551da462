"""Settings read the environment strictly: good values parse, a bad one stops start-up in one line."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from exalate_web import env
from exalate_web.env import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent

# Everything the settings read; the subprocess tests start from none of them.
SETTINGS_VARIABLES = (
    "ALLOWED_HOSTS",
    "DATABASE_URL",
    "DEBUG",
    "ENCRYPTION_KEY",
    "ENCRYPTION_KEY_FILE",
    "LOG_LEVEL",
    "MAX_ATTACHMENT_BYTES",
    "MAX_REQUEST_BYTES",
    "NODE_NAME",
    "NODE_URL",
    "Q_WORKERS",
    "REDIS_URL",
    "SECRET_KEY",
    "SECRET_KEY_FILE",
    "SYNC_POLL_SECONDS",
    "SYNC_RETENTION_DAYS",
    "WEBHOOK_SECRET",
)


def manage(data_dir: Path, *args: str, **variables: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARIABLES}
    environment.update(EXALATE_DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="exalate_web.settings", **variables)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def settings_in_subprocess(data_dir: Path, **variables: str) -> dict:
    code = (
        "import json; from django.conf import settings as s; print(json.dumps({"
        "'DEBUG': s.DEBUG, 'ALLOWED_HOSTS': s.ALLOWED_HOSTS, 'NODE_NAME': s.NODE_NAME, 'NODE_URL': s.NODE_URL,"
        "'DATABASE': s.DATABASES['default'], 'Q_CLUSTER': s.Q_CLUSTER, 'LOG_LEVEL': s.LOG_LEVEL,"
        "'DATA_UPLOAD_MAX_MEMORY_SIZE': s.DATA_UPLOAD_MAX_MEMORY_SIZE,"
        "'TRACKER_MAX_ATTACHMENT_BYTES': s.TRACKER_MAX_ATTACHMENT_BYTES,"
        "'SECRET_KEY': s.SECRET_KEY, 'ENCRYPTION_KEY': s.ENCRYPTION_KEY, 'DATA_DIR': str(s.DATA_DIR),"
        "'SESSION_COOKIE_SECURE': s.SESSION_COOKIE_SECURE, 'SYNC_POLL_SECONDS': s.SYNC_POLL_SECONDS,"
        "'SYNC_RETENTION_DAYS': s.SYNC_RETENTION_DAYS, 'WEBHOOK_SECRET': s.WEBHOOK_SECRET}))"
    )
    result = manage(data_dir, "shell", "-c", code, **variables)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the helpers -------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["true", "True", "1", "yes", "on"])
def test_it_reads_true(monkeypatch, raw):
    monkeypatch.setenv("FLAG", raw)
    assert env.env_bool("FLAG", False) is True


@pytest.mark.parametrize("raw", ["false", "FALSE", "0", "no", "off"])
def test_it_reads_false(monkeypatch, raw):
    monkeypatch.setenv("FLAG", raw)
    assert env.env_bool("FLAG", True) is False


def test_it_uses_the_default_for_an_unset_or_empty_bool(monkeypatch):
    monkeypatch.delenv("FLAG", raising=False)
    assert env.env_bool("FLAG", True) is True
    monkeypatch.setenv("FLAG", "")
    assert env.env_bool("FLAG", True) is True


def test_it_refuses_a_bool_that_is_neither(monkeypatch):
    monkeypatch.setenv("FLAG", "maybe")
    with pytest.raises(ConfigError, match=r"^FLAG: expected true or false, got 'maybe'$"):
        env.env_bool("FLAG")


def test_it_reads_an_int_and_checks_its_minimum(monkeypatch):
    monkeypatch.setenv("COUNT", " 42 ")
    assert env.env_int("COUNT", 1, minimum=1) == 42
    monkeypatch.setenv("COUNT", "0")
    with pytest.raises(ConfigError, match=r"^COUNT: must be at least 1, got 0$"):
        env.env_int("COUNT", 1, minimum=1)
    monkeypatch.setenv("COUNT", "many")
    with pytest.raises(ConfigError, match=r"^COUNT: expected a whole number"):
        env.env_int("COUNT", 1)
    monkeypatch.delenv("COUNT")
    assert env.env_int("COUNT", 7) == 7


def test_it_reads_a_list(monkeypatch):
    monkeypatch.setenv("HOSTS", "a.example.org, b.example.org")
    assert env.env_list("HOSTS", []) == ["a.example.org", "b.example.org"]
    monkeypatch.setenv("HOSTS", "a.example.org,,b.example.org")
    with pytest.raises(ConfigError, match=r"^HOSTS: expected a comma-separated list without empty items"):
        env.env_list("HOSTS", [])
    monkeypatch.delenv("HOSTS")
    default = ["x"]
    assert env.env_list("HOSTS", default) == ["x"]
    assert env.env_list("HOSTS", default) is not default


def test_it_reads_a_url_without_its_trailing_slash(monkeypatch):
    monkeypatch.setenv("SOME_URL", "https://blue.example.org:8443/")
    assert env.env_url("SOME_URL") == "https://blue.example.org:8443"
    monkeypatch.delenv("SOME_URL")
    assert env.env_url("SOME_URL") == ""
    assert env.env_url("SOME_URL", "http://127.0.0.1:8000") == "http://127.0.0.1:8000"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("ftp://blue.example.org", "expected a URL starting with http:// or https://"),
        ("http://", "expected a URL starting with http:// or https://"),
        ("blue.example.org", "expected a URL starting with http:// or https://"),
        ("http://blue.example.org:99999", "invalid port"),
    ],
)
def test_it_refuses_a_malformed_url(monkeypatch, raw, problem):
    monkeypatch.setenv("SOME_URL", raw)
    with pytest.raises(ConfigError, match=f"^SOME_URL: {re.escape(problem)}"):
        env.env_url("SOME_URL")


def test_it_reads_a_value_from_a_file(monkeypatch, tmp_path):
    (tmp_path / "value").write_text("from-the-file\n")
    monkeypatch.setenv("THING_FILE", str(tmp_path / "value"))
    monkeypatch.setenv("THING", "from-the-environment")
    assert env.env_str("THING") == "from-the-file"
    monkeypatch.setenv("THING_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"^THING_FILE: cannot read"):
        env.env_str("THING")


def test_it_defaults_to_sqlite_in_the_data_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    database = env.database("DATABASE_URL", tmp_path / "db.sqlite3")
    assert database["ENGINE"] == "django.db.backends.sqlite3"
    assert database["NAME"] == str(tmp_path / "db.sqlite3")


def test_it_reads_sqlite_urls(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "sqlite:///relative/db.sqlite3")
    assert env.database("DATABASE_URL", Path("unused"))["NAME"] == "relative/db.sqlite3"
    monkeypatch.setenv("DATABASE_URL", "sqlite:////srv/node/db.sqlite3")
    assert env.database("DATABASE_URL", Path("unused"))["NAME"] == "/srv/node/db.sqlite3"


def test_it_reads_a_postgres_url(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://sync:p%40ss@db.example.org:5433/exalate?sslmode=require")
    database = env.database("DATABASE_URL", Path("unused"))
    assert database["ENGINE"] == "django.db.backends.postgresql"
    assert (database["NAME"], database["USER"], database["PASSWORD"]) == ("exalate", "sync", "p@ss")
    assert (database["HOST"], database["PORT"]) == ("db.example.org", "5433")
    assert database["OPTIONS"] == {"server_side_binding": True, "prepare_threshold": 5, "sslmode": "require"}
    assert database["CONN_MAX_AGE"] > 0


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("mysql://root@localhost/exalate", "unsupported scheme 'mysql'"),
        ("sqlite://", "expected sqlite:///path/to/file.sqlite3"),
        ("postgres://localhost", "expected postgres://user:password@host:port/dbname"),
        ("postgres://localhost/exalate?colour=blue", "unknown option 'colour'"),
        ("postgres://localhost:port/exalate", "invalid port"),
    ],
)
def test_it_refuses_a_malformed_database_url(monkeypatch, raw, problem):
    monkeypatch.setenv("DATABASE_URL", raw)
    with pytest.raises(ConfigError, match=f"^DATABASE_URL: {re.escape(problem)}"):
        env.database("DATABASE_URL", Path("unused"))


def test_it_never_shows_the_database_password(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://sync:hunter2-secret@localhost/")
    with pytest.raises(ConfigError) as error:
        env.database("DATABASE_URL", Path("unused"))
    assert "hunter2-secret" not in str(error.value)


def test_it_generates_the_secret_key_once_and_keeps_it_private(monkeypatch, tmp_path):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.delenv("SECRET_KEY_FILE", raising=False)
    first = env.secret_key("SECRET_KEY", tmp_path)
    assert len(first) >= 50
    assert env.secret_key("SECRET_KEY", tmp_path) == first
    assert stat.S_IMODE((tmp_path / "secret_key").stat().st_mode) == 0o600


def test_it_prefers_the_secret_key_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SECRET_KEY", "k" * 40)
    assert env.secret_key("SECRET_KEY", tmp_path) == "k" * 40
    assert not (tmp_path / "secret_key").exists()


def test_it_reads_the_secret_key_from_a_file(monkeypatch, tmp_path):
    (tmp_path / "key").write_text("f" * 40 + "\n")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.setenv("SECRET_KEY_FILE", str(tmp_path / "key"))
    assert env.secret_key("SECRET_KEY", tmp_path) == "f" * 40


def test_it_refuses_a_short_secret_key(monkeypatch, tmp_path):
    monkeypatch.setenv("SECRET_KEY", "short")
    with pytest.raises(ConfigError, match=r"^SECRET_KEY: must be at least 32 characters long$"):
        env.secret_key("SECRET_KEY", tmp_path)


def test_it_refuses_a_damaged_kept_secret_key(monkeypatch, tmp_path):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.delenv("SECRET_KEY_FILE", raising=False)
    (tmp_path / "secret_key").write_text("")
    with pytest.raises(ConfigError, match=r"^SECRET_KEY: the kept key in .* is damaged"):
        env.secret_key("SECRET_KEY", tmp_path)


def test_it_accepts_a_unix_socket_redis_url(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "unix:///run/redis/redis.sock")
    assert env.env_url("REDIS_URL", schemes=("redis", "unix")) == "unix:///run/redis/redis.sock"


def test_it_creates_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA", str(tmp_path / "a" / "b"))
    assert env.data_dir("DATA", tmp_path / "unused") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()


def test_it_refuses_a_data_folder_it_cannot_create(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("DATA", str(tmp_path / "a-file" / "data"))
    with pytest.raises(ConfigError, match=r"^DATA: cannot create the data folder"):
        env.data_dir("DATA", tmp_path / "unused")


# --- the real start-up, in a subprocess --------------------------------------------------


def test_it_starts_on_a_fresh_machine_with_no_variables(tmp_path):
    values = settings_in_subprocess(tmp_path)
    assert values["DEBUG"] is False
    assert values["DATA_DIR"] == str(tmp_path)
    assert values["DATABASE"]["ENGINE"] == "django.db.backends.sqlite3"
    assert values["DATABASE"]["NAME"] == str(tmp_path / "db.sqlite3")
    assert values["NODE_URL"] == "http://127.0.0.1:8000"
    assert values["Q_CLUSTER"]["orm"] == "default"
    assert "redis" not in values["Q_CLUSTER"]
    assert values["SECRET_KEY"] == (tmp_path / "secret_key").read_text().strip()
    assert values["ENCRYPTION_KEY"] == (tmp_path / "encryption_key").read_text().strip()
    assert values["ENCRYPTION_KEY"] != values["SECRET_KEY"]
    assert stat.S_IMODE((tmp_path / "encryption_key").stat().st_mode) == 0o600


def test_it_reads_every_variable(tmp_path):
    values = settings_in_subprocess(
        tmp_path,
        DEBUG="true",
        ALLOWED_HOSTS="node.internal",
        NODE_NAME=" Red ",
        NODE_URL="https://red.example.org/",
        DATABASE_URL="postgres://sync@db.example.org/red",
        REDIS_URL="redis://cache.example.org:6379/2",
        SECRET_KEY="s" * 40,
        ENCRYPTION_KEY="e" * 40,
        LOG_LEVEL="warning",
        MAX_REQUEST_BYTES="4096",
        MAX_ATTACHMENT_BYTES="1000",
        Q_WORKERS="3",
        SYNC_POLL_SECONDS="5",
        SYNC_RETENTION_DAYS="30",
        WEBHOOK_SECRET=" hook ",
    )
    assert values["DEBUG"] is True
    # The node's own public host is always allowed.
    assert values["ALLOWED_HOSTS"] == ["node.internal", "red.example.org"]
    assert values["NODE_NAME"] == "Red"
    assert values["NODE_URL"] == "https://red.example.org"
    assert values["SESSION_COOKIE_SECURE"] is True
    assert values["DATABASE"]["NAME"] == "red"
    assert values["DATABASE"]["HOST"] == "db.example.org"
    assert values["Q_CLUSTER"]["redis"] == "redis://cache.example.org:6379/2"
    assert "orm" not in values["Q_CLUSTER"]
    assert values["Q_CLUSTER"]["workers"] == 3
    assert values["SECRET_KEY"] == "s" * 40
    assert values["ENCRYPTION_KEY"] == "e" * 40
    assert values["LOG_LEVEL"] == "WARNING"
    assert values["DATA_UPLOAD_MAX_MEMORY_SIZE"] == 4096
    assert values["TRACKER_MAX_ATTACHMENT_BYTES"] == 1000
    assert (values["SYNC_POLL_SECONDS"], values["SYNC_RETENTION_DAYS"]) == (5, 30)
    assert values["WEBHOOK_SECRET"] == "hook"
    assert not (tmp_path / "secret_key").exists()
    assert not (tmp_path / "encryption_key").exists()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DEBUG", "maybe"),
        ("DATABASE_URL", "mysql://x"),
        ("NODE_URL", "ftp://x"),
        ("REDIS_URL", "http://x"),
        ("ALLOWED_HOSTS", "a,,b"),
        ("SECRET_KEY", "too-short"),
        ("ENCRYPTION_KEY", "too-short"),
        ("SECRET_KEY_FILE", "/nonexistent/secret"),
        ("LOG_LEVEL", "LOUD"),
        ("MAX_REQUEST_BYTES", "lots"),
        ("Q_WORKERS", "0"),
        ("SYNC_POLL_SECONDS", "0"),
        ("SYNC_RETENTION_DAYS", "a week"),
    ],
)
def test_it_stops_start_up_with_one_line_naming_the_variable(tmp_path, name, value):
    result = manage(tmp_path, "check", **{name: value})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0]
    assert "Traceback" not in result.stderr
