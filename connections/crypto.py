"""Secrets at rest: a model field that stores text encrypted with the node's ENCRYPTION_KEY."""

from __future__ import annotations

import base64
import functools

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.db import models

PREFIX = "fernet:"


@functools.cache
def _fernet(key: str) -> Fernet:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"exalate secrets at rest").derive(
        key.encode()
    )
    return Fernet(base64.urlsafe_b64encode(derived))


def encrypt(plain: str) -> str:
    return PREFIX + _fernet(settings.ENCRYPTION_KEY).encrypt(plain.encode()).decode()


def decrypt(stored: str) -> str:
    if not stored.startswith(PREFIX):
        raise ValueError("value is not encrypted")
    try:
        return _fernet(settings.ENCRYPTION_KEY).decrypt(stored[len(PREFIX) :].encode()).decode()
    except InvalidToken:
        raise ValueError(
            "cannot decrypt a stored secret: ENCRYPTION_KEY differs from the one it was saved with"
        ) from None


class Secret(str):
    """A decrypted value that does not show itself in logs, reprs or tracebacks."""

    def __repr__(self) -> str:
        return "Secret('***')"


class EncryptedTextField(models.TextField):
    """Text encrypted in the database; Python code sees the plain value as a ``Secret``."""

    def from_db_value(self, value, expression, connection):
        if value is None or value == "":
            return value
        return Secret(decrypt(value))

    def to_python(self, value):
        if value is None or value == "" or isinstance(value, Secret):
            return value
        if isinstance(value, str) and value.startswith(PREFIX):
            return Secret(decrypt(value))
        return Secret(value)

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        if value is None or value == "":
            return value
        return encrypt(str(value))
