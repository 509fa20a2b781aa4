"""The network token: one shared secret that makes a set of machines one network.

A token is created once (``localp2p token`` / :meth:`NetworkToken.generate`) and
handed to the server and every worker. Everything a node needs to find and trust
its peers is derived from it:

* :meth:`NetworkToken.auth_key` - the HMAC key of the token proof in
  :mod:`localp2p.p2p.auth` (peers that cannot prove the token get nothing);
* :meth:`NetworkToken.rendezvous_keys` - DHT rendezvous keys that rotate every
  ``dht_rotation_s`` seconds (like LocalAI's OTP-rotated DHT key), so an observer
  of the DHT cannot link a network's advertisements across epochs;
* :attr:`NetworkToken.mdns_service` - the zeroconf service type advertised on the LAN;
* :attr:`NetworkToken.network_id` - a short public name for logs and the status page.

Text format (version 1)::

    lp2p1.<base64url, no padding, of a compact JSON object>

    JSON keys (all required; unknown keys are ignored for forward compatibility):
      "s": base64url (no padding) of the 32-byte secret
      "n": network id        e.g. "3f2a9c0d11b4e7a2"   (default: first 16 hex of
                                                      sha256("localp2p/network-id" + secret))
      "m": mDNS service type e.g. "_lp2p-1a2b3c4d._tcp.local."
      "r": DHT key rotation period in seconds (int, >= 60), default 3600
      "d": DHT namespace (str), default "localp2p"

The digit after ``lp2p`` is the format version; a parser refuses versions it does
not know. Leading/trailing whitespace (a pasted newline) is ignored. Parse errors
raise :class:`TokenError` with a single line that says what is wrong and never
echoes the token text back (it may be a real secret with a typo).

Key derivation is HKDF-SHA256 (RFC 5869, stdlib ``hmac``) with the secret as
input key material, a fixed salt and a purpose label as ``info``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SECRET_SIZE",
    "TOKEN_PREFIX",
    "TOKEN_VERSION",
    "NetworkToken",
    "TokenError",
]

#: Current text format version (the digit in the ``lp2p1.`` prefix).
TOKEN_VERSION = 1
#: Prefix of every version-1 token; tells a pasted token apart from other base64.
TOKEN_PREFIX = f"lp2p{TOKEN_VERSION}."
#: Secret size in bytes: 256 bits, the HMAC-SHA256 key size.
SECRET_SIZE = 32
#: Default rendezvous rotation (s): long enough that both ends of a clock skew
#: of minutes still share the current or previous epoch key.
DEFAULT_DHT_ROTATION_S = 3600
#: Shortest rotation we accept: shorter epochs make skewed clocks miss each other.
MIN_DHT_ROTATION_S = 60
#: Default DHT namespace (mixed into rendezvous keys).
DEFAULT_DHT_NAMESPACE = "localp2p"
#: Upper bound on a token's text length; a token is ~150 characters.
MAX_TOKEN_TEXT = 4096
#: HKDF salt; fixed so the same secret always derives the same keys.
_HKDF_SALT = b"localp2p/hkdf/v1"

_PREFIX_RE = re.compile(r"^lp2p(\d+)\.(.*)$", re.DOTALL)
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*$")
_NETWORK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# zeroconf service type: "_" + label of 1..15 letters/digits/hyphens + "._tcp.local."
_MDNS_RE = re.compile(r"^_([a-z0-9](?:[a-z0-9-]{0,13}[a-z0-9])?)\._tcp\.local\.$")


class TokenError(ValueError):
    """A token could not be parsed or is invalid; the message is one line."""


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str, what: str) -> bytes:
    """Decode unpadded base64url; raises TokenError naming ``what``."""
    if not _B64URL_RE.match(text):
        raise TokenError(f"token {what} is not base64url text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenError(f"token {what} is not valid base64url ({exc})") from None


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` for purpose ``info``."""
    prk = hmac.new(_HKDF_SALT, secret, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def default_network_id(secret: bytes) -> str:
    """The default public network id: first 16 hex of sha256("localp2p/network-id" + secret)."""
    return hashlib.sha256(b"localp2p/network-id" + secret).hexdigest()[:16]


def default_mdns_service(secret: bytes) -> str:
    """The default zeroconf service type, ``_lp2p-<8 hex>._tcp.local.`` (label <= 15 chars)."""
    tag = hashlib.sha256(b"localp2p/mdns-service" + secret).hexdigest()[:8]
    return f"_lp2p-{tag}._tcp.local."


@dataclass(frozen=True, repr=False)
class NetworkToken:
    """A parsed network token. ``repr``/``str`` never show the secret.

    Construct with :meth:`generate` or :meth:`parse`; passing only ``secret``
    derives ``network_id`` and ``mdns_service``. Invalid values raise
    :class:`TokenError`.
    """

    secret: bytes
    version: int = TOKEN_VERSION
    network_id: str = ""
    mdns_service: str = ""
    dht_rotation_s: int = DEFAULT_DHT_ROTATION_S
    dht_namespace: str = DEFAULT_DHT_NAMESPACE

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != SECRET_SIZE:
            size = len(self.secret) if isinstance(self.secret, (bytes, bytearray)) else "?"
            raise TokenError(f"token secret must be {SECRET_SIZE} bytes, got {size}")
        if self.version != TOKEN_VERSION:
            raise TokenError(f"unsupported token version {self.version} (this build understands {TOKEN_VERSION})")
        if not self.network_id:
            object.__setattr__(self, "network_id", default_network_id(self.secret))
        if not self.mdns_service:
            object.__setattr__(self, "mdns_service", default_mdns_service(self.secret))
        if not isinstance(self.network_id, str) or not _NETWORK_ID_RE.match(self.network_id):
            raise TokenError("token network id must be 1-64 letters, digits, '-' or '_'")
        if not isinstance(self.mdns_service, str) or not _MDNS_RE.match(self.mdns_service):
            raise TokenError("token mDNS service must look like _name._tcp.local. (name: 1-15 of a-z 0-9 -)")
        if (
            isinstance(self.dht_rotation_s, bool)
            or not isinstance(self.dht_rotation_s, int)
            or self.dht_rotation_s < MIN_DHT_ROTATION_S
        ):
            raise TokenError(f"token DHT rotation must be an integer >= {MIN_DHT_ROTATION_S} seconds")
        if not isinstance(self.dht_namespace, str) or not 0 < len(self.dht_namespace) <= 64:
            raise TokenError("token DHT namespace must be a string of 1-64 characters")

    # -- creation / text form -------------------------------------------------

    @classmethod
    def generate(cls) -> NetworkToken:
        """A new token with a fresh random secret and default settings."""
        return cls(secret=secrets.token_bytes(SECRET_SIZE))

    def encode(self) -> str:
        """The text form (see the module docstring); ``parse(t.encode()) == t``."""
        body = {
            "s": _b64e(self.secret),
            "n": self.network_id,
            "m": self.mdns_service,
            "r": self.dht_rotation_s,
            "d": self.dht_namespace,
        }
        raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        return f"lp2p{self.version}.{_b64e(raw)}"

    @classmethod
    def parse(cls, text: str) -> NetworkToken:
        """Parse a token's text form.

        :raises TokenError: (one line, never containing the token) when the text is
            empty, has the wrong prefix or an unknown version, is not base64url,
            is not a JSON object, lacks a field, or holds an invalid value.
        """
        if not isinstance(text, str):
            raise TokenError("token must be text")
        text = text.strip()
        if not text:
            raise TokenError("token is empty")
        if len(text) > MAX_TOKEN_TEXT:
            raise TokenError(f"token is too long ({len(text)} characters)")
        match = _PREFIX_RE.match(text)
        if not match:
            raise TokenError(f"not a localp2p token (expected it to start with {TOKEN_PREFIX!r})")
        version = int(match.group(1))
        if version != TOKEN_VERSION:
            raise TokenError(f"unsupported token version {version} (this build understands {TOKEN_VERSION})")
        raw = _b64d(match.group(2), "body")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise TokenError("token body is not valid JSON (was it truncated?)") from None
        if not isinstance(body, dict):
            raise TokenError("token body is not a JSON object")
        missing = [k for k in ("s", "n", "m", "r", "d") if k not in body]
        if missing:
            raise TokenError(f"token is missing field(s): {', '.join(missing)}")
        if not isinstance(body["s"], str):
            raise TokenError("token secret field is not a string")
        secret = _b64d(body["s"], "secret")
        if len(secret) != SECRET_SIZE:
            raise TokenError(f"token secret must be {SECRET_SIZE} bytes, got {len(secret)}")
        fields: dict[str, Any] = {
            "network_id": body["n"],
            "mdns_service": body["m"],
            "dht_rotation_s": body["r"],
            "dht_namespace": body["d"],
        }
        if not fields["network_id"] or not fields["mdns_service"]:
            raise TokenError("token network id and mDNS service must not be empty")
        return cls(secret=secret, version=version, **fields)

    # -- derived keys -----------------------------------------------------------

    def auth_key(self) -> bytes:
        """32-byte HMAC key for the token proof (:mod:`localp2p.p2p.auth`)."""
        return _hkdf(self.secret, b"localp2p auth v1")

    def rendezvous_key(self, epoch: int) -> bytes:
        """32-byte DHT rendezvous key for rotation ``epoch`` (``floor(unix time / dht_rotation_s)``)."""
        info = b"localp2p rendezvous v1|" + self.dht_namespace.encode() + b"|" + struct.pack(">q", epoch)
        return _hkdf(self.secret, info)

    def epoch(self, now: float | None = None) -> int:
        """The rotation epoch containing unix time ``now`` (default: the current time)."""
        return math.floor((time.time() if now is None else now) / self.dht_rotation_s)

    def rendezvous_keys(self, now: float | None = None) -> list[bytes]:
        """``[current epoch key, previous epoch key]``: advertise under the first, search both.

        Searching the previous epoch too lets peers whose clocks straddle an epoch
        boundary still meet.
        """
        epoch = self.epoch(now)
        return [self.rendezvous_key(epoch), self.rendezvous_key(epoch - 1)]

    # -- never leak the secret ------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"NetworkToken(version={self.version}, network_id={self.network_id!r}, "
            f"mdns_service={self.mdns_service!r}, dht_rotation_s={self.dht_rotation_s}, "
            f"dht_namespace={self.dht_namespace!r}, secret=<redacted>)"
        )

    __str__ = __repr__
