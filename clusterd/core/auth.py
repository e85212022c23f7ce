"""Challenge-response authentication: the secret never crosses the wire.

The server's greeting carries a fresh random nonce. A peer proves it knows the secret of a role
(``client`` or ``worker``) by sending ``AUTH <role> <hex>``, where the hex is
HMAC-SHA256(secret, "clusterd-auth:<role>:<nonce>"). The role is bound into the MAC so that a
client secret can never be replayed as a worker proof, and the nonce is new on every connection
so that a recorded proof cannot be replayed either. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

__all__ = ["ROLES", "new_nonce", "proof", "verify", "load_secret", "SecretError"]

ROLES = ("client", "worker")
MIN_SECRET_BYTES = 16


class SecretError(ValueError):
    """A secret could not be read, or is too short to be worth having."""


def new_nonce() -> str:
    """A fresh random nonce for one connection's greeting, so no recorded proof can be replayed."""
    return secrets.token_hex(16)


def proof(secret: bytes, nonce: str, role: str) -> str:
    """The hex HMAC-SHA256 proof that the holder of ``secret`` claims ``role`` on the connection
    that sent ``nonce``."""
    return hmac.new(secret, f"clusterd-auth:{role}:{nonce}".encode(), hashlib.sha256).hexdigest()


def verify(secret: bytes, nonce: str, role: str, given: str) -> bool:
    """Whether ``given`` is the right proof for ``role`` and ``nonce``, compared in constant
    time."""
    return hmac.compare_digest(
        proof(secret, nonce, role), given.encode("ascii", "replace").decode()
    )


def load_secret(path: str | None = None, env: str | None = None) -> bytes | None:
    """The secret from a file (first choice) or an environment variable; None if neither is
    set. Secrets are never taken from a command-line value, which ``ps`` would show."""
    raw: bytes | None = None
    if path:
        try:
            with open(path, "rb") as fh:
                raw = fh.read().strip()
        except OSError as e:
            raise SecretError(f"cannot read secret file {path}: {e.strerror}") from None
        where = path
    elif env and os.environ.get(env):
        raw = os.environ[env].strip().encode()
        where = f"${env}"
    if raw is None:
        return None
    if len(raw) < MIN_SECRET_BYTES:
        raise SecretError(f"the secret in {where} is shorter than {MIN_SECRET_BYTES} bytes")
    return raw
