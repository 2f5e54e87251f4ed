"""The Flower monitoring command line, and the rule for its credentials.

`sluice flower` calls `check_auth(settings.flower_basic_auth, embedded=settings.is_embedded)`
and then runs `flower_command(...)` with the environment of the workers, so Flower reads the
same broker (and key prefix) from the same settings. Flower only sees task events sent after it
connected. Outside the embedded mode basic auth is required: Flower's API can revoke tasks and
shut workers down. Without `--basic-auth`, Flower answers 401 on every `/api/*` route.
"""

from __future__ import annotations

import sys

MIN_PASSWORD_LENGTH = 8


def check_auth(basic_auth: str | None, *, embedded: bool) -> None:
    """Raise `ValueError` unless `basic_auth` is a usable `user:password` (required outside
    the embedded mode, checked whenever given)."""
    if basic_auth is None or basic_auth == "":
        if embedded:
            return
        raise ValueError(
            "Flower needs basic auth outside the embedded mode: set SLUICE_FLOWER_BASIC_AUTH "
            "to user:password")
    user, colon, password = basic_auth.partition(":")
    if not colon or not user:
        raise ValueError("Flower basic auth must be of the form user:password")
    if "," in basic_auth:
        # Flower splits its --basic-auth value on commas into several credentials.
        raise ValueError("Flower basic auth must not contain a comma")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(
            f"Flower basic auth password must be at least {MIN_PASSWORD_LENGTH} characters")


def flower_command(
    *, port: int, address: str = "127.0.0.1", basic_auth: str | None,
    url_prefix: str | None = None,
) -> list[str]:
    """`celery flower` on `address:port` for the Sluice app, with basic auth when given."""
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "flower",
            f"--port={port}", f"--address={address}"]
    if basic_auth:
        argv.append(f"--basic-auth={basic_auth}")
    if url_prefix:
        argv.append(f"--url-prefix={url_prefix.strip('/')}")
    return argv
