"""``manage.py demo_setup``: the node's demo project and admin login, created once.

The project key derives from NODE_NAME ("Blue" -> BLUE). The admin's password comes
from ADMIN_PASSWORD, else it is generated once and kept in the data folder
(``admin-password``, readable by the owner only). Running it again changes nothing;
an existing password is replaced only with ``--reset-password``.
"""

from __future__ import annotations

import os
import re
import secrets
import unicodedata
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from exalate_web import env
from trackers.builtin.models import Project

ADMIN_USERNAME = "admin"
PASSWORD_FILE_NAME = "admin-password"  # noqa: S105 - a file name, not a password
FALLBACK_PROJECT_KEY = "DEMO"


def project_key(node_name: str) -> str:
    """2 to 10 capital letters or digits, starting with a letter; DEMO when the name has too few."""
    ascii_name = unicodedata.normalize("NFKD", node_name).encode("ascii", "ignore").decode()
    key = re.sub(r"[^A-Z0-9]", "", ascii_name.upper()).lstrip("0123456789")[:10]
    return key if len(key) >= 2 else FALLBACK_PROJECT_KEY


def kept_password(path: Path) -> str:
    """The password kept in ``path``, generated and written (mode 0600) the first time."""
    if path.exists():
        password = path.read_text().strip()
        if password:
            return password
        path.unlink()
    password = secrets.token_urlsafe(16)
    # O_EXCL: if another process wrote the file first, its password is the one kept.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


class Command(BaseCommand):
    help = "Create the demo project and the admin user if they are missing, and print the login."

    def add_arguments(self, parser):
        parser.add_argument("--quiet", action="store_true", help="Print nothing.")
        parser.add_argument(
            "--reset-password",
            action="store_true",
            help="Set the admin's password back to ADMIN_PASSWORD, or to the one kept in the data folder.",
        )

    @transaction.atomic
    def handle(self, *args, quiet: bool = False, reset_password: bool = False, **options):
        key = project_key(settings.NODE_NAME)
        _, project_created = Project.objects.get_or_create(key=key, defaults={"name": f"{settings.NODE_NAME} project"})

        password = env.env_str("ADMIN_PASSWORD").strip() or kept_password(settings.DATA_DIR / PASSWORD_FILE_NAME)
        users = get_user_model().objects
        admin = users.filter(username=ADMIN_USERNAME).first()
        if admin is None:
            admin = users.create_superuser(ADMIN_USERNAME, "", password)
        elif reset_password:
            admin.set_password(password)
            admin.save(update_fields=["password"])

        if quiet:
            return
        self.stdout.write(f"Project {key}: {'created' if project_created else 'exists'}")
        if admin.check_password(password):
            self.stdout.write(f"Login: {ADMIN_USERNAME} / {password}")
        else:
            self.stdout.write(
                f"Login: {ADMIN_USERNAME} (its password was changed after setup; "
                "manage.py demo_setup --reset-password sets it back)"
            )
