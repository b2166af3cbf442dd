"""The web configuration file (`--web.config.file`) in the Prometheus exporter-toolkit format:
TLS (with a client CA), basic auth users with bcrypt hashes, extra response headers.

    tls_server_config:
      cert_file: server.crt            # relative paths: from the web config file's folder
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: clients-ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2b$10$...           # htpasswd -nBC 10 prometheus
    http_server_config:
      headers:
        X-Frame-Options: deny

Parsed and validated whole: `load_web_config` returns a WebConfig or raises WebConfigError with
one line per problem, each naming the file, the key, the value and what is allowed. Files are
read through tcprio.kernel.files (regular files, bounded, never blocking), the certificates
checked by building the TLS context once. `Authenticator` checks basic auth credentials, with a
small cache of successful bcrypt checks (each costs 50-500 ms of CPU, as exporter-toolkit's).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import ssl
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tcprio.inputs import ConfigReadError, brief, label_of, load_yaml
from tcprio.kernel.files import read_bytes_checked

MAX_FILE_BYTES = 1 << 20

# client_auth_type -> what the TLS server asks of clients. Python's ssl verifies every client
# certificate it asks for, so the two "any certificate" policies cannot be offered.
CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
OLD_TLS_VERSIONS = ("TLS10", "TLS11")
# Go's names of the TLS 1.2 suites worth offering -> OpenSSL's (TLS 1.3 suites are not
# configurable, in Go as here).
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
}
# exporter-toolkit's allowed response headers, with the values it allows where it checks them
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
# Keys of the format tcprio does not implement: refused with a line saying so, never ignored.
UNSUPPORTED = {
    "tls_server_config.cert": "give the certificate as cert_file",
    "tls_server_config.key": "give the key as key_file",
    "tls_server_config.client_ca": "give the client CA as client_ca_file",
    "tls_server_config.client_allowed_sans": "not supported by tcprio",
    "tls_server_config.curve_preferences": "not supported by tcprio (OpenSSL picks the curves)",
}
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
            "max_version", "cipher_suites", "prefer_server_cipher_suites"}  # fmt: skip
BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


class WebConfigError(Exception):
    """The web configuration is unusable; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TlsServerConfig:
    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()  # Go's names; empty: OpenSSL's defaults
    prefer_server_cipher_suites: bool = True
    # sha256 of the files as read: a reload with renewed certificates restarts the endpoint
    fingerprint: str = ""


@dataclass(frozen=True)
class WebConfig:
    tls: TlsServerConfig | None = None
    basic_auth_users: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # bcrypt
    headers: tuple[tuple[str, str], ...] = ()
    source: str = ""


# --- TLS ---------------------------------------------------------------------------------------


def _memfd_copy(path: Path) -> int:
    """An anonymous in-memory copy of `path`, read under the configuration's rules: ssl opens
    the copy, so a link swapped in after the checks cannot hand it another file."""
    data = read_bytes_checked(path, MAX_FILE_BYTES)
    fd = os.memfd_create("tcprio-tls", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def tls_context(tls: TlsServerConfig) -> ssl.SSLContext:
    """The server's TLS context; ssl.SSLError or ConfigReadError when a file does not do."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.maximum_version = TLS_VERSIONS[tls.max_version]
    if tls.cipher_suites:
        context.set_ciphers(":".join(CIPHER_SUITES[name] for name in tls.cipher_suites))
    if not tls.prefer_server_cipher_suites:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    fds = [_memfd_copy(tls.cert_file), _memfd_copy(tls.key_file)]
    try:
        context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        if tls.client_ca_file is not None:
            fds.append(_memfd_copy(tls.client_ca_file))
            context.load_verify_locations(cafile=f"/proc/self/fd/{fds[-1]}")
    finally:
        for fd in fds:
            os.close(fd)
    context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    return context


# --- parsing -----------------------------------------------------------------------------------


class _Problems:
    """One line per problem, in the configuration's style (service/config.py)."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.lines: list[str] = []

    def bad(self, key: str, value: object, allowed: str) -> None:
        self.lines.append(f"{self.origin}: {key}: {brief(value)} is not {allowed}")

    def say(self, key: str, text: str) -> None:
        self.lines.append(f"{self.origin}: {key}: {text}")

    def mapping(self, data: Mapping, key: str, prefix: str = "") -> Mapping | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.bad(prefix + key, value, "a mapping")
            return None
        return value

    def unknown_keys(self, data: Mapping, allowed: set[str], prefix: str = "") -> None:
        names = ", ".join(sorted(allowed))
        for key in data:
            where = f"{prefix}{label_of(str(key), 80)}"
            if where in UNSUPPORTED:
                self.say(where, f"is not supported: {UNSUPPORTED[where]}")
            elif key not in allowed:
                self.say(where, f"unknown key (allowed: {names})")


def _file(p: _Problems, base: Path, section: Mapping, key: str) -> tuple[Path, bytes] | None:
    value = section.get(key)
    where = f"tls_server_config.{key}"
    if not isinstance(value, str) or not value or "\0" in value:
        p.bad(where, value, "a file path")
        return None
    path = base / value  # relative to the web config file's folder, as exporter-toolkit does
    try:
        return path, read_bytes_checked(path, MAX_FILE_BYTES)
    except ConfigReadError as exc:
        p.bad(where, value, f"a readable file ({str(exc).removeprefix('is ')})")
        return None


def _choice(p: _Problems, section: Mapping, key: str, default: str, allowed: list[str]) -> str:
    value = section.get(key, default)
    if value not in allowed:
        p.bad(f"tls_server_config.{key}", value, f"one of {', '.join(allowed)}")
        return default
    return value


def _client_auth(p: _Problems, section: Mapping, has_ca: bool) -> str:
    value = section.get("client_auth_type", "NoClientCert")
    where = "tls_server_config.client_auth_type"
    if value in UNVERIFIED_CLIENT_AUTH:
        p.say(where, f"{brief(value)} is not supported: tcprio verifies every client "
                     "certificate it asks for (use VerifyClientCertIfGiven or "
                     "RequireAndVerifyClientCert with client_ca_file)")  # fmt: skip
        return "NoClientCert"
    if value not in CLIENT_AUTH_TYPES:
        allowed = ", ".join([*CLIENT_AUTH_TYPES, *UNVERIFIED_CLIENT_AUTH])
        p.bad(where, value, f"one of {allowed}")
        return "NoClientCert"
    if value == "NoClientCert" and has_ca:
        p.say(where, "NoClientCert with a client_ca_file: say how clients are checked "
                     "(VerifyClientCertIfGiven or RequireAndVerifyClientCert)")  # fmt: skip
    if value != "NoClientCert" and not has_ca:
        p.say(where, f"{value} needs client_ca_file (the CA that signs the clients' certificates)")
    return value


def _versions(p: _Problems, section: Mapping) -> tuple[str, str]:
    found = []
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = section.get(key, default)
        if value in OLD_TLS_VERSIONS:
            p.say(f"tls_server_config.{key}", f"{value} is not supported: TLS12 or TLS13")
            value = default
        elif value not in TLS_VERSIONS:
            p.bad(f"tls_server_config.{key}", value, "TLS12 or TLS13")
            value = default
        found.append(value)
    if TLS_VERSIONS[found[0]] > TLS_VERSIONS[found[1]]:
        p.say("tls_server_config", f"min_version {found[0]} is above max_version {found[1]}")
    return found[0], found[1]


def _cipher_suites(p: _Problems, section: Mapping) -> tuple[str, ...]:
    value = section.get("cipher_suites", [])
    where = "tls_server_config.cipher_suites"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        p.bad(where, value, "a list of cipher suite names")
        return ()
    for name in value:
        if name not in CIPHER_SUITES:
            p.say(where, f"{brief(name)} is not supported (supported: TLS 1.2 ECDHE suites with "
                         f"AES-GCM or ChaCha20: {', '.join(sorted(CIPHER_SUITES))})")  # fmt: skip
            return ()
    return tuple(value)


def _tls(p: _Problems, data: Mapping, base: Path) -> TlsServerConfig | None:
    section = p.mapping(data, "tls_server_config")
    if section is None:
        return None
    start = len(p.lines)
    p.unknown_keys(section, TLS_KEYS, "tls_server_config.")
    cert, key = _file(p, base, section, "cert_file"), _file(p, base, section, "key_file")
    ca = _file(p, base, section, "client_ca_file") if "client_ca_file" in section else None
    client_auth = _client_auth(p, section, "client_ca_file" in section)
    min_version, max_version = _versions(p, section)
    prefer = section.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        p.bad("tls_server_config.prefer_server_cipher_suites", prefer, "true or false")
        prefer = True
    suites = _cipher_suites(p, section)
    if len(p.lines) > start or cert is None or key is None:
        return None  # the context cannot be built as asked: those lines say why
    digest = hashlib.sha256()
    for _, contents in filter(None, (cert, key, ca)):
        digest.update(hashlib.sha256(contents).digest())
    config = TlsServerConfig(
        cert[0], key[0], client_auth, ca[0] if ca else None, min_version, max_version, suites,
        prefer, digest.hexdigest(),
    )  # fmt: skip
    return config if _loads(p, config) else None


def _loads(p: _Problems, tls: TlsServerConfig) -> bool:
    """Whether the files make a TLS context (the certificate and its key, the client CA)."""
    try:
        tls_context(tls)
    except (ssl.SSLError, ConfigReadError, ValueError) as exc:
        files = f"{label_of(str(tls.cert_file))}, {label_of(str(tls.key_file))}"
        if tls.client_ca_file is not None:
            files += f", {label_of(str(tls.client_ca_file))}"
        reason = brief(getattr(exc, "reason", None) or str(exc), 120).strip("'")
        p.say("tls_server_config", f"{files}: not a PEM certificate with its private key "
                                   f"(and a PEM client CA) ({reason})")  # fmt: skip
        return False
    return True


def _users(p: _Problems, data: Mapping) -> tuple[tuple[str, str], ...]:
    section = p.mapping(data, "basic_auth_users")
    if section is None:
        return ()
    users = []
    for user, hashed in section.items():
        where = f"basic_auth_users.{label_of(str(user), 80)}"
        if not isinstance(user, str) or not user or ":" in user:
            p.bad("basic_auth_users", user, "a user name (a non-empty string without ':')")
        elif not isinstance(hashed, str) or not BCRYPT_HASH.fullmatch(hashed):
            # never quoted: a password put there by mistake must not reach the log
            shown = f"{len(hashed)} characters" if isinstance(hashed, str) else "not a string"
            p.say(where, f"the value ({shown}, not shown) is not a bcrypt hash ($2a$, $2b$ or "
                         "$2y$, cost 04..31, 60 characters: `htpasswd -nBC 10 USER`)")  # fmt: skip
        else:
            users.append((user, hashed))
    return tuple(users)


def _headers(p: _Problems, data: Mapping) -> tuple[tuple[str, str], ...]:
    section = p.mapping(data, "http_server_config")
    if section is None:
        return ()
    p.unknown_keys(section, {"headers", "http2"}, "http_server_config.")
    if not isinstance(section.get("http2", True), bool):
        p.bad("http_server_config.http2", section.get("http2"), "true or false")
    headers = p.mapping(section, "headers", "http_server_config.") or {}
    found = []
    for name, value in headers.items():
        where = f"http_server_config.headers.{label_of(str(name), 80)}"
        canonical = next((h for h in HEADERS if str(name).lower() == h.lower()), None)
        if canonical is None:
            p.bad("http_server_config.headers", name, f"one of {', '.join(HEADERS)}")
        elif not isinstance(value, str) or not value.isprintable() or not value.strip():
            p.bad(where, value, "a one-line text")
        elif HEADERS[canonical] and value.lower() not in HEADERS[canonical]:  # type: ignore[operator]
            p.bad(where, value, f"one of {', '.join(HEADERS[canonical] or ())}")
        else:
            found.append((canonical, value))
    return tuple(found)


def parse_web_config(data: Mapping, origin: str, base: Path) -> WebConfig:
    """The web configuration in `data` (read from `origin`; relative paths from `base`)."""
    p = _Problems(origin)
    p.unknown_keys(data, {"tls_server_config", "basic_auth_users", "http_server_config"})
    config = WebConfig(_tls(p, data, base), _users(p, data), _headers(p, data), origin)
    if p.lines:
        raise WebConfigError(p.lines)
    return config


def load_web_config(path: Path) -> WebConfig:
    """The web configuration file at `path`; WebConfigError with one line per problem."""
    origin = label_of(str(path))
    try:
        text = read_bytes_checked(path, MAX_FILE_BYTES).decode("utf-8")
        data, duplicates = load_yaml(text)
    except ConfigReadError as exc:
        raise WebConfigError([f"{origin}: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise WebConfigError([f"{origin}: is not valid UTF-8 (byte {exc.start})"]) from None
    if duplicates:
        raise WebConfigError([f"{origin}: {brief(key)}: set again at line {line}; each key may "
                              "appear once" for key, line in duplicates])  # fmt: skip
    if data is None:
        data = {}  # an empty file: plain HTTP, no auth (as exporter-toolkit)
    if not isinstance(data, dict):
        raise WebConfigError([f"{origin}: the top level must be a mapping"])
    return parse_web_config(data, origin, path.absolute().parent)


# --- basic auth --------------------------------------------------------------------------------

# bcrypt of a random password at cost 10: unknown users cost a check too, so the time an answer
# takes does not tell which user names exist (exporter-toolkit does the same)
_DUMMY_HASH = b"$2b$10$zdeyRsV0m/LDcV18gKt8LeQCwq4bFPWi5Z5jsNV3dMlZ46sXacRbi"
CACHE_SIZE = 100


def credentials(header: str | None) -> tuple[str, str] | None:
    """(user, password) of a `Basic` Authorization header; None when it is anything else."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":  # auth schemes are case-insensitive (RFC 9110, 11.1)
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class Authenticator:
    """Checks basic auth: against bcrypt hashes (the web config's `basic_auth_users`), or a
    plain password (the deprecated `basic_auth:` key). Successful bcrypt checks are remembered
    (at most CACHE_SIZE, keyed by a keyed hash of user, password and stored hash, never the
    password itself): a scrape every 15 s would otherwise pay one every time. Failures are
    never cached, so guessing costs a full check each."""

    def __init__(
        self, users: Mapping[str, str] | None = None, plain: tuple[str, str] | None = None
    ) -> None:
        self._users = {u: h.encode() for u, h in (users or {}).items()}
        self._plain = plain
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._good: OrderedDict[bytes, None] = OrderedDict()

    def check(self, header: str | None) -> bool:
        found = credentials(header)
        if found is None:
            return False
        user, password = found
        if self._plain is not None:
            # compare both, always, in constant time: no hint of which part was wrong
            user_ok = hmac.compare_digest(user.encode(), self._plain[0].encode())
            password_ok = hmac.compare_digest(password.encode(), self._plain[1].encode())
            return user_ok and password_ok
        return self._bcrypt(user, password)

    def _bcrypt(self, user: str, password: str) -> bool:
        import bcrypt  # only a daemon with basic_auth_users pays for the import

        hashed = self._users.get(user)
        key = hmac.new(self._key, b"\0".join([user.encode(), password.encode(), hashed or b""]),
                       hashlib.sha256).digest()  # fmt: skip
        with self._lock:
            if hashed is not None and key in self._good:
                self._good.move_to_end(key)
                return True
        try:
            ok = bcrypt.checkpw(password.encode(), hashed or _DUMMY_HASH) and hashed is not None
        except ValueError:  # a password over bcrypt's 72 bytes
            return False
        if ok:
            with self._lock:
                self._good[key] = None
                while len(self._good) > CACHE_SIZE:
                    self._good.popitem(last=False)
        return ok
