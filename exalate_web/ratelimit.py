"""Failed logins are counted, and a client that keeps failing is refused for a while.

Two counters, each living ``LOGIN_RATE_LIMIT["minutes"]`` from its first failure, in
the cache named ``ratelimit`` (shared by the web workers: a file cache on one machine,
Redis across machines):

- per client and username: after ``failures`` failed logins that pair is refused, so
  guessing one account's password from one address stops;
- per client: after four times as many, that address is refused whatever username it
  tries, so guessing across many accounts stops too.

A refused attempt does not check the password at all, so the right password does not
get through either; a successful login forgets the pair's failures.
"""

from __future__ import annotations

import hashlib
import math
import time

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import caches
from django.core.exceptions import NON_FIELD_ERRORS
from django.http import HttpRequest

CODE = "rate_limited"


def _cache():
    return caches["ratelimit"]


def _limits() -> tuple[int, int]:
    """(failures allowed per client and username, seconds they are remembered)."""
    return settings.LOGIN_RATE_LIMIT["failures"], settings.LOGIN_RATE_LIMIT["minutes"] * 60


def client_of(request: HttpRequest) -> str:
    return request.META.get("REMOTE_ADDR") or "unknown"


def _keys(request: HttpRequest, username: str) -> dict[str, int]:
    """Counter key -> how many failures it allows."""
    failures, _ = _limits()
    client = client_of(request)
    pair = hashlib.sha256(f"{client}\n{username.casefold()}".encode()).hexdigest()
    return {f"login:pair:{pair}": failures, f"login:client:{hashlib.sha256(client.encode()).hexdigest()}": 4 * failures}


def refused_for(request: HttpRequest, username: str) -> int:
    """Seconds until this client may try this username again; 0 when it may now."""
    now = time.time()
    until = max((_cache().get(key + ":until") or 0) for key in _keys(request, username))
    return max(0, math.ceil(until - now))


def record_failure(request: HttpRequest, username: str) -> None:
    _, window = _limits()
    cache = _cache()
    for key, allowed in _keys(request, username).items():
        cache.add(key, 0, timeout=window)
        try:
            count = cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.add(key, 1, timeout=window)
            count = 1
        if count >= allowed:
            cache.set(key + ":until", time.time() + window, timeout=window)


def forget_failures(request: HttpRequest, username: str) -> None:
    pair = next(iter(_keys(request, username)))
    _cache().delete_many([pair, pair + ":until"])


def wait_message(seconds: int) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    return f"Too many failed logins. Try again in {minutes} minute{'s' if minutes != 1 else ''}."


class RateLimitedLogin:
    """Mixed into an authentication form: refuse while limited, count each wrong password."""

    def clean(self):
        username = str(self.data.get("username", ""))[:150]
        wait = refused_for(self.request, username)
        if wait:
            raise forms.ValidationError(wait_message(wait), code=CODE)
        try:
            cleaned = super().clean()
        except forms.ValidationError:
            record_failure(self.request, username)
            raise
        if self.get_user() is not None:
            forget_failures(self.request, username)
        return cleaned


class LoginForm(RateLimitedLogin, AuthenticationForm):
    pass


class AdminLoginForm(RateLimitedLogin, AdminAuthenticationForm):
    pass


def is_refusal(form) -> bool:
    return form is not None and form.is_bound and form.has_error(NON_FIELD_ERRORS, code=CODE)
