"""What a failed fleet-feed session means to an operator: one line that says what failed and what to check."""

from __future__ import annotations

import ssl

import nats.errors
import nats.js.errors


class SessionEnded(Exception):
    """The server is reachable, but this session cannot go on (its bucket changed, its watch ended)."""


def expected(e: Exception) -> bool:
    """Failures that are the network's or the server's, not a bug of ours: no traceback for them."""
    return isinstance(e, SessionEnded | OSError | TimeoutError | ssl.SSLError | nats.errors.Error)


# What OpenSSL says when a certificate chain fails only the strict (RFC 5280) checks, and what to do then.
STRICT_FAILURES = ("key usage", "Key Identifier", "Basic Constraints", "not marked critical")
STRICT_HINT = (
    "certificates are verified strictly (RFC 5280, Python 3.13's default): the CA needs basicConstraints "
    "critical CA:TRUE and keyUsage critical keyCertSign, cRLSign; the server's certificate needs "
    "subjectAltName and authorityKeyIdentifier; reissue them (docs/fleet.md, TLS)"
)


def describe(e: Exception, bucket: str) -> str:
    """An operator's reading of a session failure, with what to do when there is something to do."""
    name = type(e).__name__
    text = str(e).strip() or name
    if isinstance(e, SessionEnded):
        return text
    if isinstance(e, nats.js.errors.BucketNotFoundError):
        return (
            f"bucket {bucket!r} does not exist; the control plane makes it: nats kv add {bucket} --history 1"
        )
    if isinstance(e, nats.errors.NoRespondersError | nats.js.errors.ServiceUnavailableError):
        return "the server has no JetStream (start nats-server with -js, or enable jetstream in its config)"
    if isinstance(e, nats.errors.AuthorizationError) or "authorization" in text.lower():
        return f"the server refused our credentials ({text}); check [feed.nats] creds or nkey"
    if isinstance(e, ssl.SSLCertVerificationError):
        why = f"the server's TLS certificate is not trusted ({e.verify_message}); check [feed.nats] tls_ca"
        if any(m in str(e.verify_message) for m in STRICT_FAILURES):
            why += f"; {STRICT_HINT}"
        return why
    if isinstance(e, ssl.SSLError) and any(
        r in str(e.reason) for r in ("BAD_CERTIFICATE", "CERTIFICATE_REQUIRED")
    ):
        return (
            f"the server refused our TLS client certificate ({e.reason}); check [feed.nats] tls_cert, tls_key"
        )
    if isinstance(e, ssl.SSLError):
        return f"TLS with the server failed ({e.reason or text}); check tls:// and [feed.nats] tls_* keys"
    if isinstance(e, nats.errors.NoServersError | OSError | TimeoutError):
        return f"cannot reach the server: {text}"
    return f"{name}: {text}"
