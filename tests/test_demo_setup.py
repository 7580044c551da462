"""manage.py demo_setup: the demo project and the admin login, created once and kept."""

from __future__ import annotations

import stat
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from trackers.builtin.management.commands.demo_setup import project_key
from trackers.builtin.models import Project


@pytest.fixture
def node(settings, tmp_path, monkeypatch):
    settings.DATA_DIR = tmp_path
    settings.NODE_NAME = "Blue"
    monkeypatch.delenv("ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("ADMIN_PASSWORD_FILE", raising=False)
    return tmp_path


def demo_setup(*args: str) -> str:
    out = StringIO()
    call_command("demo_setup", *args, stdout=out)
    return out.getvalue()


def admin():
    return get_user_model().objects.get(username="admin")


@pytest.mark.parametrize(
    ("node_name", "key"),
    [
        ("Blue", "BLUE"),
        ("red node 2", "REDNODE2"),
        ("Ünïcode-Länd", "UNICODELAN"),
        ("42 Green", "GREEN"),
        ("x", "DEMO"),
        ("42", "DEMO"),
        ("--", "DEMO"),
    ],
)
def test_it_derives_the_project_key_from_the_node_name(node_name, key):
    assert project_key(node_name) == key


@pytest.mark.django_db
def test_it_creates_the_project_and_the_admin(node):
    output = demo_setup()
    assert Project.objects.get(key="BLUE").name == "Blue project"
    password_file = node / "admin-password"
    password = password_file.read_text().strip()
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert f"Login: admin / {password}\n" in output
    assert admin().is_superuser
    assert admin().is_staff
    assert admin().check_password(password)


@pytest.mark.django_db
def test_it_changes_nothing_when_run_again(node):
    first = demo_setup()
    password_hash = admin().password
    second = demo_setup()
    assert Project.objects.count() == 1
    assert get_user_model().objects.count() == 1
    assert admin().password == password_hash
    assert first.splitlines()[-1] == second.splitlines()[-1]
    assert "Project BLUE: exists" in second


@pytest.mark.django_db
def test_it_keeps_a_password_changed_after_setup(node):
    demo_setup()
    user = admin()
    user.set_password("changed-by-the-admin")
    user.save()
    output = demo_setup()
    assert admin().check_password("changed-by-the-admin")
    assert "--reset-password" in output
    assert (node / "admin-password").read_text().strip() not in output


@pytest.mark.django_db
def test_it_resets_the_password_when_asked(node):
    demo_setup()
    kept = (node / "admin-password").read_text().strip()
    user = admin()
    user.set_password("changed-by-the-admin")
    user.save()
    output = demo_setup("--reset-password")
    assert admin().check_password(kept)
    assert f"Login: admin / {kept}" in output


@pytest.mark.django_db
def test_it_takes_the_password_from_the_environment(node, monkeypatch):
    monkeypatch.setenv("ADMIN_PASSWORD", "from-the-environment")
    output = demo_setup()
    assert admin().check_password("from-the-environment")
    assert "Login: admin / from-the-environment" in output
    assert not (node / "admin-password").exists()


@pytest.mark.django_db
def test_it_applies_a_new_environment_password_only_on_reset(node, monkeypatch):
    demo_setup()
    monkeypatch.setenv("ADMIN_PASSWORD", "new-one")
    demo_setup()
    assert not admin().check_password("new-one")
    demo_setup("--reset-password")
    assert admin().check_password("new-one")


@pytest.mark.django_db
def test_it_prints_nothing_when_quiet(node):
    assert demo_setup("--quiet") == ""
    assert Project.objects.filter(key="BLUE").exists()
    assert admin().check_password((node / "admin-password").read_text().strip())


@pytest.mark.django_db
def test_it_falls_back_to_the_demo_key(node, settings):
    settings.NODE_NAME = "7"
    demo_setup("--quiet")
    assert Project.objects.filter(key="DEMO").exists()
