"""WSGI entry point (gunicorn exalate_web.wsgi)."""

import os
import sys

from django.core.wsgi import get_wsgi_application

from exalate_web.env import ConfigError

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "exalate_web.settings")

try:
    application = get_wsgi_application()
except ConfigError as e:
    sys.exit(f"configuration error: {e}")
