"""Mask secrets in the text that goes into a support bundle, keeping its structure readable.

Pure functions, no I/O. What is masked (the value becomes `********`, the key name stays):
- the value of any key whose name (case-insensitive) contains key, token, password, passwd,
  secret, credential, authorization or cookie, or is the word auth or pass (`api_key`,
  `DD_API_KEY`, `apiKey`, `auth_token` ...), in YAML / ini / env (`key: v`, `key = v`,
  `export KEY=v`, `- KEY=v`), JSON (`"key": "v"`) and `key=v` inside log lines or URLs. A name
  ending in file, path, dir, name or ref (`password_file`, `tls.key_file`, `secretKeyRef`)
  holds a path or a reference, not the secret: it is kept. Booleans, null and empty values are
  kept (they say whether it is set);
- a YAML block under such a key (`password:` followed by an indented mapping, list or block
  scalar): every value in it;
- Kubernetes-style `name: DD_API_KEY` followed by `value: ...`;
- anywhere: words of exactly 32 or 40 hex digits (Datadog API and application keys), the token
  after `Bearer` and base64 after `Basic`, the password in `scheme://user:password@host`, and
  PEM private key blocks.
BPF tags (16 hex digits), container ids and sha256 sums (64) are not masked.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

MASK = "********"

_SENSITIVE_PARTS = (
    "key",
    "token",
    "password",
    "passwd",
    "secret",
    "credential",
    "authorization",
    "cookie",
)
_SENSITIVE_WORDS = frozenset({"auth", "pass"})
_PATH_LIKE_SUFFIXES = ("file", "files", "path", "paths", "dir", "dirs", "name", "ref")
_KEPT_VALUES = frozenset({"", "true", "false", "null", "~", '""', "''", "[]", "{}"})
_AUTH_SCHEMES = ("bearer", "basic", "digest", "token", "negotiate")
_BLOCK_INDICATOR = re.compile(r"^(?:&\S+)?[ \t]*(?:[|>][+-]?[0-9]?)?$")

# A key/value at the start of a line: YAML (`key: v`, `- key: v`, `"key": v`), ini / env
# (`key = v`, `export KEY=v`, `- KEY=v`), also commented out (`# api_key: v`).
_LINE_KV = re.compile(
    r"^(?P<lead>[ \t]*(?P<comment>#+[ \t]*)?(?:-[ \t]+)*(?:export[ \t]+)?)"
    r"(?P<q>[\"']?)(?P<key>[A-Za-z_@$][\w.\-/@$]*)(?P=q)"
    r"(?P<sep>[ \t]*(?::(?=[ \t]|$)|=)[ \t]*)"
    r"(?P<value>.*)$"
)
# A key/value anywhere in a line (log lines, query strings, flow mappings, one-line JSON).
_INLINE_KV = re.compile(
    r"(?<![\w.])(?P<q>[\"']?)(?P<key>[A-Za-z_][\w.\-]*)(?P=q)"
    r"(?P<sep>[ \t]*[:=][ \t]*)"
    r"(?P<value>\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\n]|'')*'|\[[^\]\n]*\]|\{[^{}\n]*\}"
    r"|[^\s,;&\"'{}\[\]<>]+)"
)
_AUTH_CREDENTIAL = re.compile(r"([ \t]+)[^\s,;\"']+")
_QUOTED = re.compile(r"^(\"(?:[^\"\\]|\\.)*\"|'(?:[^']|'')*')(.*)$")
_HEX_KEY = re.compile(r"(?<![0-9A-Za-z])(?:[0-9a-fA-F]{40}|[0-9a-fA-F]{32})(?![0-9A-Za-z])")
_URL_CREDENTIALS = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@\"']*:)(?P<password>[^\s/\"']+)@"
)
_BEARER = re.compile(r"(?i)(\bbearer[ \t]+)(?!\*{8})([^\s\"',;]{6,})")
_BASIC = re.compile(r"(?i)(\bbasic[ \t]+)(?=[A-Za-z0-9+/]*[0-9+/=])([A-Za-z0-9+/]{6,}={0,2})")
_PEM_BLOCK = re.compile(
    r"(-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----)(.*?)(-----END [A-Z0-9 ]*PRIVATE KEY-----)",
    re.DOTALL,
)
# Nothing can be masked in a text without one of these.
_MAYBE_SECRET = re.compile(r"[:=@]|[0-9a-fA-F]{32}|(?i:bearer|basic|private key)")
_NAME_LINE = re.compile(r"^(?P<lead>[ \t]*(?:-[ \t]+)?)name[ \t]*:[ \t]*[\"']?(?P<name>[\w.\-]+)")
_VALUE_LINE = re.compile(r"^(?P<lead>[ \t]*)value(?P<sep>[ \t]*:[ \t]*)(?P<value>.*)$")


@functools.lru_cache(maxsize=4096)
def is_sensitive_key(key: str, block: bool = False) -> bool:
    """Whether a setting of this name holds a secret (its value is masked). With `block`:
    whether everything under it is secret (`password:`, `credentials:`; not `basic_auth:`,
    whose block holds a user name and a file path)."""
    norm = key.lower().replace("-", "_")
    last = re.split(r"[./]", norm)[-1]
    if last.endswith(_PATH_LIKE_SUFFIXES):
        return False
    if any(part in last for part in _SENSITIVE_PARTS):
        return True
    if block:
        return False
    return any(word in _SENSITIVE_WORDS for word in re.split(r"[^a-z0-9]+", last))


def _is_kept(value: str) -> bool:
    return value.strip().lower() in _KEPT_VALUES


def _is_authorization(key: str) -> bool:
    return "authorization" in key.lower()


def _mask_scalar(value: str, key: str = "") -> str:
    """`value` (the text after `key: `) masked, keeping its quotes, a trailing JSON comma or
    YAML comment, and for an Authorization header its scheme (`Bearer ********`)."""
    if _is_kept(value):
        return value
    quoted = _QUOTED.match(value)
    if quoted:
        text, rest = quoted.groups()
        if text in ('""', "''"):
            return value
        return f"{text[0]}{MASK}{text[0]}{rest}"
    scheme, body = "", value
    first, _, after = value.partition(" ")
    if _is_authorization(key) and first.lower() in _AUTH_SCHEMES and after.strip():
        scheme, body = first + " ", after.lstrip()
    comment = ""
    if " #" in body:
        body, _, tail = body.partition(" #")
        comment = " #" + tail
    trailing = "," if body.rstrip().endswith(",") else ""
    return f"{scheme}{MASK}{trailing}{comment}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _mask_block_line(line: str) -> str:
    """A line inside a secret's YAML block: keep indentation, list dashes and key names."""
    match = re.match(r"^(?P<lead>[ \t]*(?:-[ \t]+)*)(?P<rest>.*)$", line)
    assert match is not None
    lead, rest = match.group("lead"), match.group("rest")
    if not rest:
        return line
    kv = re.match(r"^(?P<key>[\"']?[\w.\-]+[\"']?[ \t]*:)(?P<gap>[ \t]*)(?P<value>.*)$", rest)
    if kv and kv.group("key"):
        value = kv.group("value")
        if not value or _BLOCK_INDICATOR.match(value):
            return line  # a nested mapping's header: its lines follow, masked
        return f"{lead}{kv.group('key')}{kv.group('gap') or ' '}{_mask_scalar(value)}"
    return f"{lead}{MASK}"


def _masked_inline_value(value: str) -> str:
    if value[0] in "\"'[{":
        closing = {"[": "]", "{": "}"}.get(value[0], value[0])
        return f"{value[0]}{MASK}{closing}"
    return MASK


def _redact_inline(line: str) -> str:
    """Mask `key=value` / `key: value` pairs anywhere in the line. A pair whose key is not
    sensitive is skipped up to its value only, so `url: https://h/?token=x` is looked into."""
    out: list[str] = []
    pos = 0
    while True:
        match = _INLINE_KV.search(line, pos)
        if match is None:
            out.append(line[pos:])
            return "".join(out)
        value = match.group("value")
        if not is_sensitive_key(match.group("key")) or _is_kept(value) or value == MASK:
            out.append(line[pos : match.start("value")])
            pos = match.start("value")
            continue
        out.append(line[pos : match.start("value")])
        pos = match.end("value")
        credential = _AUTH_CREDENTIAL.match(line, pos)
        if _is_authorization(match.group("key")) and value.lower() in _AUTH_SCHEMES and credential:
            out.append(value + credential.group(1) + MASK)  # `Authorization: Bearer ********`
            pos = credential.end()
        else:
            out.append(_masked_inline_value(value))


class _LineRedactor:
    """Walks the lines once, remembering an open secret block and a pending `name: SECRET`."""

    def __init__(self) -> None:
        self.block_column: int | None = None
        self.secret_name_column: int | None = None

    def _in_block(self, line: str) -> bool:
        if self.block_column is None:
            return False
        if not line.strip():
            return True
        column = _indent(line)
        if column > self.block_column or (
            column == self.block_column and line.lstrip().startswith("-")
        ):
            return True
        self.block_column = None
        return False

    def line(self, line: str) -> str:
        if self._in_block(line):
            return _mask_block_line(line)
        value_line = _VALUE_LINE.match(line)
        if value_line and _indent(line) == self.secret_name_column:
            self.secret_name_column = None
            lead, sep, value = value_line.group("lead", "sep", "value")
            return f"{lead}value{sep}{_mask_scalar(value)}"
        name_line = _NAME_LINE.match(line)
        if name_line:
            self.secret_name_column = (
                len(name_line.group("lead")) if is_sensitive_key(name_line.group("name")) else None
            )
        match = _LINE_KV.match(line)
        if match and is_sensitive_key(match.group("key")):
            value = match.group("value")
            head = line[: match.start("value")]
            if _opens_block(value):
                if not match.group("comment") and is_sensitive_key(match.group("key"), True):
                    self.block_column = _key_column(match)
                return line
            return head + _mask_scalar(value, match.group("key"))
        return _redact_inline(line)


def _opens_block(value: str) -> bool:
    """`key:` with nothing after it (or a block scalar, an anchor, a JSON `{` / `[`)."""
    value = value.strip()
    return not value or value in ("{", "[") or bool(_BLOCK_INDICATOR.match(value))


def _key_column(match: re.Match[str]) -> int:
    """The column of the key, `- ` list markers included (`- password:` opens a block whose
    items sit under the key)."""
    return match.start("q")


def _redact_lines(text: str) -> str:
    redactor = _LineRedactor()
    lines = text.split("\n")
    return "\n".join(redactor.line(line) for line in lines)


def _redact_patterns(text: str) -> str:
    text = _URL_CREDENTIALS.sub(lambda m: f"{m.group('head')}{MASK}@", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)}{MASK}", text)
    text = _BASIC.sub(lambda m: f"{m.group(1)}{MASK}", text)
    return _HEX_KEY.sub(MASK, text)


def redact_text(text: str) -> str:
    """`text` with every secret masked (see the module's docstring)."""
    if not _MAYBE_SECRET.search(text):  # most strings of a bundle: names, numbers, flags
        return text
    text = _PEM_BLOCK.sub(lambda m: f"{m.group(1)}\n{MASK}\n{m.group(3)}", text)
    return _redact_patterns(_redact_lines(text))


def _json_sensitive(key: str, value: Any) -> bool:
    return is_sensitive_key(key, block=isinstance(value, dict | list))


def redact_json_value(value: Any, sensitive: bool = False) -> Any:
    """A parsed JSON document with the values of sensitive keys masked and every string
    redacted as text."""
    if isinstance(value, dict):
        return {
            k: redact_json_value(v, sensitive or _json_sensitive(str(k), v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_json_value(v, sensitive) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        if sensitive and value:
            return MASK
        return redact_text(value)
    if isinstance(value, int | float):
        return MASK if sensitive else value
    return value


def redact_json_text(text: str) -> str:
    """A JSON document redacted structurally (it stays valid JSON); unchanged when it holds no
    secret. Text that does not parse as JSON is redacted as text."""
    try:
        document = json.loads(text)
    except ValueError:
        return redact_text(text)
    redacted = redact_json_value(document)
    if redacted == document:
        return text
    if "\n" in text.strip():
        return json.dumps(redacted, indent=2) + ("\n" if text.endswith("\n") else "")
    return json.dumps(redacted, separators=(",", ":")) + ("\n" if text.endswith("\n") else "")


def redact_bytes(data: bytes, is_json: bool = False) -> bytes:
    """`data` (any bytes; not UTF-8 is kept byte for byte) redacted."""
    text = data.decode("utf-8", "surrogateescape")
    redacted = redact_json_text(text) if is_json else redact_text(text)
    return redacted.encode("utf-8", "surrogateescape")
