"""Settings for a sync node, read from the environment (see README's configuration table)."""

from pathlib import Path
from urllib.parse import urlsplit

from exalate_web import env

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = env.data_dir("EXALATE_DATA_DIR", BASE_DIR / "data")

SECRET_KEY = env.secret_key("SECRET_KEY", DATA_DIR)
# Encrypts connection secrets and tracker credentials at rest; separate from SECRET_KEY so
# that rotating one does not lose the other. Back it up with the database.
ENCRYPTION_KEY = env.secret_key("ENCRYPTION_KEY", DATA_DIR, filename="encryption_key")
DEBUG = env.env_bool("DEBUG", False)
ALLOWED_HOSTS = env.env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])

NODE_NAME = env.env_str("NODE_NAME", "Node").strip() or "Node"
NODE_URL = env.env_url("NODE_URL", "http://127.0.0.1:8000")
# The node must answer on its own public address, so that host is always allowed.
if urlsplit(NODE_URL).hostname not in ALLOWED_HOSTS and "*" not in ALLOWED_HOSTS:
    ALLOWED_HOSTS.append(urlsplit(NODE_URL).hostname)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "django_q",
    "django_ace",
    "trackers.apps.TrackersConfig",
    "trackers.builtin.apps.BuiltinTrackerConfig",
    "connections.apps.ConnectionsConfig",
    "syncqueue.apps.SyncqueueConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "exalate_web.api.BodySizeLimitMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "exalate_web.urls"
WSGI_APPLICATION = "exalate_web.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "exalate_web.context_processors.node",
                "syncqueue.context_processors.tracker_health",
            ],
        },
    },
]

DATABASES = {"default": env.database("DATABASE_URL", DATA_DIR / "db.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
# After this many failed logins for one username from one client within these minutes, that
# client is refused for the rest of them (exalate_web.ratelimit).
LOGIN_RATE_LIMIT = {"failures": 5, "minutes": 15}
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise warns at every start while it is missing
MEDIA_ROOT = DATA_DIR / "media"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve straight from the apps' static folders when collectstatic has not run (tests, dev).
WHITENOISE_USE_FINDERS = True

# Bodies larger than this are refused with 413 before they are parsed.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.env_int("MAX_REQUEST_BYTES", 2_621_440, minimum=1024)
TRACKER_MAX_ATTACHMENT_BYTES = env.env_int("MAX_ATTACHMENT_BYTES", 25 * 1024 * 1024, minimum=1)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "exalate_web.parsers.JSONBodyParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "exalate_web.api.Pagination",
    "EXCEPTION_HANDLER": "exalate_web.api.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
# The OpenAPI description of /api/v1/, served to staff at /api/v1/schema/; the node-to-node
# endpoints are plain Django views and are described by exalate_web.schema.
SPECTACULAR_SETTINGS = {
    "TITLE": "Exalate node API",
    "DESCRIPTION": "The REST API of a sync node, and the signed endpoints other nodes call.",
    "VERSION": "1",
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAdminUser"],
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "exalate_web.schema.describe_plain_views",
    ],
}

# Finished sync events are kept this long for the monitor, then deleted.
SYNC_RETENTION_DAYS = env.env_int("SYNC_RETENTION_DAYS", 7, minimum=0)

# Shared with a tracker that pushes change notifications to /api/v1/webhooks/changed/; unset = off.
WEBHOOK_SECRET = env.env_str("WEBHOOK_SECRET").strip()

# How often each connection polls its tracker for changes (the built-in tracker also signals at once).
SYNC_POLL_SECONDS = env.env_int("SYNC_POLL_SECONDS", 30, minimum=1)

REDIS_URL = env.env_url("REDIS_URL", schemes=("redis", "rediss", "unix"))
CACHES = {
    # Django's default, one per process (the queue's kick counts on that).
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    # Shared by every web worker, so that a limit holds whichever worker answers.
    "ratelimit": (
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL, "KEY_PREFIX": "ratelimit"}
        if REDIS_URL
        else {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": DATA_DIR / "ratelimit"}
    )
    | {"TIMEOUT": LOGIN_RATE_LIMIT["minutes"] * 60},
}
Q_CLUSTER = {
    "name": "exalate",
    "workers": env.env_int("Q_WORKERS", 2, minimum=1),
    # retry must stay above timeout, or a long task runs twice.
    "timeout": 120,
    "retry": 180,
    "max_attempts": 1,
    "catch_up": False,
    "save_limit": 0 if not REDIS_URL else -1,
    "bulk": 10,
    "ack_failures": True,
    # django-q2 replaces a worker after 500 tasks by default: at a steady 20 changes a second
    # that was a new process every half minute, whose first tasks paid for a new database
    # connection and cold caches (prepared statements, compiled rules) in the latency's tail.
    # Workers stay flat in memory; one that grows past max_rss (KB) is replaced all the same.
    "recycle": 20000,
    "max_rss": 200 * 1024,
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"

LOG_LEVEL = env.env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    raise env.ConfigError("LOG_LEVEL", f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {LOG_LEVEL!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        # django-q logs every task at INFO; the queue's own monitor tells what matters.
        "django-q": {"level": "DEBUG" if LOG_LEVEL == "DEBUG" else "WARNING"},
    },
}

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
if NODE_URL.startswith("https://"):
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    CSRF_TRUSTED_ORIGINS = [NODE_URL]
