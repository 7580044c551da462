"""Read settings from the environment through small, strict helpers.

A malformed value raises ``ConfigError`` whose message is one line naming the
variable; ``manage.py`` and ``wsgi.py`` print it and stop instead of showing a
stack trace.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured


class ConfigError(ImproperlyConfigured):
    def __init__(self, name: str, problem: str):
        self.name = name
        super().__init__(f"{name}: {problem}")


def env_str(name: str, default: str = "") -> str:
    """The variable's value, or the contents of the file named by ``NAME_FILE``."""
    file_name = os.environ.get(f"{name}_FILE")
    if file_name:
        try:
            return Path(file_name).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{name}_FILE", f"cannot read {file_name!r} ({e.strerror})") from None
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ConfigError(name, f"expected true or false, got {raw!r}")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"expected a whole number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return list(default)
    items = [item.strip() for item in raw.split(",")]
    if any(not item for item in items):
        raise ConfigError(name, f"expected a comma-separated list without empty items, got {raw!r}")
    return items


def env_url(name: str, default: str = "", *, schemes: tuple[str, ...] = ("http", "https")) -> str:
    raw = env_str(name, default).strip()
    if not raw:
        return ""
    parts = urlsplit(raw)
    located = parts.path if parts.scheme == "unix" else parts.hostname
    if parts.scheme not in schemes or not located:
        raise ConfigError(name, f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}, got {raw!r}")
    try:
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError:
        raise ConfigError(name, f"invalid port in {raw!r}") from None
    return raw.rstrip("/")


def data_dir(name: str, default: Path) -> Path:
    path = Path(os.environ.get(name) or default).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(name, f"cannot create the data folder {str(path)!r} ({e.strerror})") from None
    return path


def secret_key(name: str, data: Path, filename: str = "secret_key") -> str:
    """The secret from the environment, else one generated once and kept in ``data/filename``."""
    value = env_str(name).strip()
    if value:
        if len(value) < 32:
            raise ConfigError(name, "must be at least 32 characters long")
        return value
    key_file = data / filename
    if key_file.exists():
        value = key_file.read_text().strip()
        if len(value) < 32:
            raise ConfigError(name, f"the kept key in {str(key_file)!r} is damaged; delete it or set {name}")
        return value
    value = secrets.token_urlsafe(50)
    # Create it readable by the owner only; O_EXCL makes a concurrent start keep one key.
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return key_file.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


_PG_OPTIONS = {"sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "application_name", "options"}


def database(name: str, default_sqlite: Path) -> dict:
    """Django's DATABASES['default'] from a URL: sqlite:///relative, sqlite:////absolute, postgres://..."""
    raw = env_str(name).strip()
    if not raw:
        return _sqlite(default_sqlite)
    parts = urlsplit(raw)
    if parts.scheme == "sqlite":
        # sqlite:///relative/path or sqlite:////absolute/path, as in SQLAlchemy.
        path = unquote(parts.path)[1:] if parts.path.startswith("/") else ""
        if parts.netloc or not path:
            raise ConfigError(name, f"expected sqlite:///path/to/file.sqlite3, got {raw!r}")
        return _sqlite(Path(path))
    if parts.scheme in ("postgres", "postgresql", "pgsql"):
        db_name = unquote(parts.path.lstrip("/"))
        if not db_name or "/" in db_name:
            raise ConfigError(name, f"expected postgres://user:password@host:port/dbname, got {_redact(raw)!r}")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(name, f"invalid port in {_redact(raw)!r}") from None
        options = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in _PG_OPTIONS:
                raise ConfigError(name, f"unknown option {key!r} (known: {', '.join(sorted(_PG_OPTIONS))})")
            options[key] = value
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": db_name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(port or ""),
            # Server-side binding with a prepare threshold (Django turns preparing off unless
            # asked) lets psycopg prepare a statement a connection has run 5 times: the sync
            # runs the same few queries all day, and parsing and planning them cost PostgreSQL
            # more CPU than running them. (Not behind a transaction-pooling PgBouncer.)
            "OPTIONS": {"server_side_binding": True, "prepare_threshold": 5, **options},
            # Persistent connections: opening one per request costs several times the throughput.
            "CONN_MAX_AGE": 600,
            "CONN_HEALTH_CHECKS": True,
        }
    raise ConfigError(name, f"unsupported scheme {parts.scheme!r}; use sqlite:/// or postgres://")


def _sqlite(path: Path) -> dict:
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(path),
        "OPTIONS": {
            # WAL lets readers work while the web server and the workers write; IMMEDIATE
            # takes the write lock at BEGIN, so concurrent writers queue instead of failing.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        },
    }


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url
