"""Which NATS servers, and how to reach them: the nats:// (or tls://) spec, the TLS context and the
credential files of [feed.nats].

Checked once, when the source is made, so that a setting that can never work is a FeedError at the start
that names what to write, not a session retried forever.
"""

from __future__ import annotations

import re
import ssl
from urllib.parse import urlsplit

from egressd.feed.lines import FeedError
from egressd.model.config import NatsFeed


def _redacted(spec: str) -> str:
    """The spec without what sits before an @: an error must not repeat a password it refuses."""
    return re.sub(r"//[^/@,]*@", "//***@", spec)


def parse_servers(spec: str) -> list[str]:
    """`nats://HOST:PORT` (or tls://), several separated by commas; FeedError says what to write."""
    urls = [u.strip() for u in spec.split(",")]
    shown = _redacted(spec)
    for url in urls:
        hint = (
            f"write nats://HOST:PORT or tls://HOST:PORT (several separated by commas), not {_redacted(url)!r}"
        )
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise FeedError(f"event source {shown!r}: {e}; {hint}") from None
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise FeedError(f"event source {shown!r}: {hint}")
        if parts.username is not None or parts.password is not None:
            raise FeedError(
                f"event source {shown!r}: credentials in the URL would show in status and logs; "
                "put them in a file and name it in [feed.nats] creds or nkey"
            )
        if port is None:
            raise FeedError(f"event source {shown!r}: no port; write nats://{parts.hostname}:4222")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise FeedError(
                f"event source {shown!r}: no path, query or fragment; the bucket is [feed.nats] bucket"
            )
    return urls


def tls_context(settings: NatsFeed, servers: list[str]) -> ssl.SSLContext | None:
    """TLS when a server is tls:// or any tls_* key is set; FeedError names the key whose file is unusable."""
    if not (settings.tls_ca or settings.tls_cert or any(s.startswith("tls://") for s in servers)):
        return None
    try:
        ctx = ssl.create_default_context(cafile=settings.tls_ca or None)
    except (OSError, ssl.SSLError) as e:
        raise FeedError(f"[feed.nats] tls_ca {settings.tls_ca!r}: {e}; give a PEM CA bundle") from None
    # Python 3.13's defaults on every release: a certificate that Debian 13 refuses is refused on 12 too,
    # so moving a host to 13 never cuts it off its feed.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    if settings.tls_cert:
        try:
            ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise FeedError(
                f"[feed.nats] tls_cert {settings.tls_cert!r} / tls_key {settings.tls_key!r}: {e}; "
                "give a PEM certificate and its key"
            ) from None
    return ctx


def check_readable(key: str, path: str) -> None:
    """FeedError when the file [feed.nats] `key` names (creds, nkey) cannot be read; "" is not set."""
    if not path:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise FeedError(f"[feed.nats] {key} {path!r}: cannot read it: {e.strerror or e}") from None
