"""Secrets at rest: encrypted in the database, readable only with the key they were saved with."""

from __future__ import annotations

import pytest
from django.db import connection as db

from connections import crypto
from connections.models import Connection


@pytest.fixture
def fresh_fernet():
    crypto._fernet.cache_clear()
    yield
    crypto._fernet.cache_clear()


def raw_secret(connection: Connection) -> str:
    with db.cursor() as cursor:
        cursor.execute(f"SELECT secret FROM {Connection._meta.db_table} WHERE id = %s", [connection.pk])  # noqa: S608
        return cursor.fetchone()[0]


def test_it_decrypts_what_it_encrypted():
    stored = crypto.encrypt("correct horse battery staple")
    assert stored.startswith(crypto.PREFIX)
    assert "correct horse" not in stored
    assert crypto.decrypt(stored) == "correct horse battery staple"


def test_it_encrypts_the_same_value_differently_each_time():
    assert crypto.encrypt("same") != crypto.encrypt("same")


def test_it_refuses_to_decrypt_a_value_that_is_not_encrypted():
    with pytest.raises(ValueError, match="not encrypted"):
        crypto.decrypt("plain text")


def test_it_says_plainly_when_the_encryption_key_changed(settings, fresh_fernet):
    stored = crypto.encrypt("s3cret")
    settings.ENCRYPTION_KEY = "another key altogether"
    crypto._fernet.cache_clear()
    with pytest.raises(ValueError, match="ENCRYPTION_KEY differs from the one it was saved with"):
        crypto.decrypt(stored)


def test_it_stores_a_connection_secret_encrypted(db):
    connection = Connection.objects.create(name="Red", secret="f" * 64)
    stored = raw_secret(connection)
    assert stored.startswith(crypto.PREFIX)
    assert "f" * 64 not in stored
    loaded = Connection.objects.get(pk=connection.pk)
    assert loaded.secret == "f" * 64
    assert isinstance(loaded.secret, crypto.Secret)


def test_it_keeps_an_empty_secret_empty(db):
    connection = Connection.objects.create(name="Red")
    assert raw_secret(connection) == ""
    assert Connection.objects.get(pk=connection.pk).secret == ""


def test_it_refuses_to_load_a_secret_saved_under_another_key(db, settings, fresh_fernet):
    connection = Connection.objects.create(name="Red", secret="f" * 64)
    settings.ENCRYPTION_KEY = "another key altogether"
    crypto._fernet.cache_clear()
    with pytest.raises(ValueError, match="ENCRYPTION_KEY differs"):
        Connection.objects.get(pk=connection.pk)


def test_it_hides_a_secret_in_its_repr():
    secret = crypto.Secret("hunter2")
    assert secret == "hunter2"
    assert repr(secret) == "Secret('***')"
    assert "hunter2" not in repr({"secret": secret})
    assert "hunter2" not in repr([secret])
