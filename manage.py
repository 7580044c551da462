#!/usr/bin/env python
"""Django's command-line utility for this sync node."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "exalate_web.settings")
    from django.conf import settings

    from exalate_web.env import ConfigError

    try:
        settings.INSTALLED_APPS  # noqa: B018 - loads the settings, which validate the environment
    except ConfigError as e:
        sys.exit(f"configuration error: {e}")

    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
