"""The support bundle's redaction: every way a secret is written, and what must stay readable."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tcprio.bundle.redact import (
    MASK,
    is_sensitive_key,
    redact_bytes,
    redact_json_text,
    redact_json_value,
    redact_text,
)

M = MASK


@pytest.mark.parametrize(
    ("key", "sensitive"),
    [
        ("api_key", True),
        ("app_key", True),
        ("API_KEY", True),
        ("DD_API_KEY", True),
        ("apiKey", True),
        ("x-api-key", True),
        ("auth_token", True),
        ("token", True),
        ("password", True),
        ("db_passwd", True),
        ("client_secret", True),
        ("credentials", True),
        ("Authorization", True),
        ("cookie", True),
        ("auth", True),
        ("basic_auth", True),  # as a scalar; its block is not masked wholesale
        ("proxy.pass", True),
        ("runtime_security_config.network.classifier_priority", False),
        ("classifier_handle", False),
        ("password_file", False),
        ("tls.key_file", False),
        ("keyFile", False),
        ("token_path", False),
        ("secret_name", False),
        ("username", False),
        ("author", False),
        ("site", False),
        ("passthrough", False),
        ("monitoring", False),
    ],
)
def test_sensitive_key_names(key: str, sensitive: bool):
    assert is_sensitive_key(key) is sensitive


def test_only_strong_names_mask_a_whole_block():
    assert is_sensitive_key("password", block=True)
    assert is_sensitive_key("credentials", block=True)
    assert not is_sensitive_key("basic_auth", block=True)
    assert not is_sensitive_key("auth", block=True)


CASES = [
    # YAML scalars, quoted or not; the key name stays
    ("api_key: abcdef123", f"api_key: {M}"),
    ('app_key: "abc def"', f'app_key: "{M}"'),
    ("password: 'it''s'", f"password: '{M}'"),
    ("  token: nested-token", f"  token: {M}"),
    ("- password: in-a-list", f"- password: {M}"),
    ("password: abc # set by ops", f"password: {M} # set by ops"),
    ('"api_key": abc', f'"api_key": {M}'),
    ("# api_key: commented-out", f"# api_key: {M}"),
    ("password: 123456", f"password: {M}"),
    # env / ini styles
    ("DD_API_KEY=abc123", f"DD_API_KEY={M}"),
    ('export DD_APP_KEY="abc123"', f'export DD_APP_KEY="{M}"'),
    ("- DD_API_KEY=abc123", f"- DD_API_KEY={M}"),
    ("password = a b c", f"password = {M}"),
    # JSON on one line, and a pretty JSON line with its comma
    ('{"api_key": "abc", "site": "eu"}', f'{{"api_key": "{M}", "site": "eu"}}'),
    ('  "token": "abc",', f'  "token": "{M}",'),
    ('{"secret": ["a", "b"], "n": 1}', f'{{"secret": [{M}], "n": 1}}'),
    # inside log lines, command lines and URLs
    ("level=info password=pw1 user=bob", f"level=info password={M} user=bob"),
    ('msg="login token=tok1 done"', f'msg="login token={M} done"'),
    ("run --password=pw2 --verbose", f"run --password={M} --verbose"),
    ("url: https://h/?api_key=k1&x=1", f"url: https://h/?api_key={M}&x=1"),
    ("x-api-key: k2", f"x-api-key: {M}"),
    ("Authorization: Bearer abc.def.ghi", f"Authorization: Bearer {M}"),
    ("curl -H 'Authorization: Basic dXNlcjpwYXNz'", f"curl -H 'Authorization: Basic {M}'"),
    ("proxy: http://user:pw3@proxy:3128", f"proxy: http://user:{M}@proxy:3128"),
    ("redis://:pw4@host:6379/0", f"redis://:{M}@host:6379/0"),
    ("http://u:p@ss@host/x", f"http://u:{M}@host/x"),
    # bare key-looking values under innocuous names
    ("site_id: 0123456789abcdef0123456789abcdef", f"site_id: {M}"),
    ("sha1 0123456789abcdef0123456789abcdef01234567 x", f"sha1 {M} x"),
    ("DD_KEY_0123456789ABCDEF0123456789ABCDEF", f"DD_KEY_{M}"),
    ("bearer eyJhbGciOi.x.y", f"bearer {M}"),
    # kept: flags, empty values, paths, priorities, prose
    ("api_key:", "api_key:"),
    ('api_key: ""', 'api_key: ""'),
    ("secret_token: false", "secret_token: false"),
    ("password: null", "password: null"),
    ("password_file: /etc/tcprio/metrics-password", None),
    ("key_file: /etc/tcprio/tls.key", None),
    ("classifier_priority: 5", None),
    ("classifier_handle: 0", None),
    ("site: datadoghq.eu", None),
    ("# Serve the endpoint over TLS, and/or ask for basic auth:", None),
    ("use basic authentication here", None),
    ("listen_address: 0.0.0.0:9842", None),
    ("https://example.com:8443/path", None),
    # not Datadog keys: BPF tags (16), container ids / sha256 (64), pod UIDs
    ("prog 12 tag 1a2b3c4d5e6f7a8b jited", None),
    ("container " + "ab" * 32, None),
    ("sha256:" + "0f" * 32, None),
    ("pod 8c3e2a1f-1234-4abc-9def-0123456789ab", None),
    ("filter protocol all pref 5 bpf chain 0 handle 0x1 term_ok direct-action", None),
    ("key ht 800 bkt 0 flowid ???", None),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_one_line(text: str, expected: str | None):
    assert redact_text(text) == (text if expected is None else expected)


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_redaction_is_idempotent(text: str, expected: str | None):
    once = redact_text(text)
    assert redact_text(once) == once


def test_a_password_block_list_is_masked_item_by_item():
    text = "database:\n  password:\n    - first-pw\n    - second-pw\n  host: db\nafter: 1\n"
    assert redact_text(text) == (
        f"database:\n  password:\n    - {M}\n    - {M}\n  host: db\nafter: 1\n"
    )


def test_a_list_at_the_same_indentation_belongs_to_the_key():
    text = "password:\n- first-pw\n- second-pw\nnext: 1\n"
    assert redact_text(text) == f"password:\n- {M}\n- {M}\nnext: 1\n"


def test_a_block_scalar_is_masked_line_by_line():
    text = "secret: |\n  line one\n\n  line two\nkept: yes\n"
    assert redact_text(text) == f"secret: |\n  {M}\n\n  {M}\nkept: yes\n"


def test_a_nested_mapping_keeps_its_key_names():
    text = "credentials:\n  user: bob\n  nested:\n    deep: deep-pw\n    list:\n      - x\ntop: 1"
    assert redact_text(text) == (
        f"credentials:\n  user: {M}\n  nested:\n    deep: {M}\n    list:\n      - {M}\ntop: 1"
    )


def test_a_list_item_password_block_ends_at_the_next_item():
    text = "- password:\n    - pw-a\n  user: bob\n- password: pw-b\n- name: x\n"
    assert redact_text(text) == f"- password:\n    - {M}\n  user: bob\n- password: {M}\n- name: x\n"


def test_basic_auth_block_keeps_the_user_and_the_password_file_path():
    text = (
        "basic_auth:\n  username: prometheus\n  password_file: /etc/tcprio/pw\n"
        "  password: inline-pw\n"
    )
    assert redact_text(text) == (
        f"basic_auth:\n  username: prometheus\n  password_file: /etc/tcprio/pw\n  password: {M}\n"
    )


def test_kubernetes_env_name_value_pairs():
    text = (
        "env:\n  - name: DD_API_KEY\n    value: k8s-key\n"
        "  - name: DD_SITE\n    value: datadoghq.com\n"
        "  - name: DD_APP_KEY\n    valueFrom:\n      secretKeyRef:\n        name: dd\n"
    )
    assert redact_text(text) == (
        f"env:\n  - name: DD_API_KEY\n    value: {M}\n"
        "  - name: DD_SITE\n    value: datadoghq.com\n"
        "  - name: DD_APP_KEY\n    valueFrom:\n      secretKeyRef:\n        name: dd\n"
    )


def test_pretty_json_object_under_a_secret_key_in_text():
    text = '"secret": {\n  "a": "b",\n  "c": 1\n},\n"ok": 1'
    assert redact_text(text) == f'"secret": {{\n  "a": "{M}",\n  "c": {M}\n}},\n"ok": 1'


def test_pem_private_key_block():
    text = "tls:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAAAA\n-----END RSA PRIVATE KEY-----\nx"
    out = redact_text(text)
    assert "MIIEow" not in out and "AAAA" not in out
    assert "-----BEGIN RSA PRIVATE KEY-----" in out and out.endswith("-----\nx")


def test_json_document_stays_valid_json_and_keeps_the_rest():
    document = {
        "api_key": "k1",
        "nested": {"token": 1234, "enabled": True, "name": "x"},
        "list": [{"password": "p1"}, "password=p2"],
        "basic_auth": {"username": "u", "password": "p3"},
        "credentials": {"user": "u2"},
        "classifier_priority": 5,
        "empty_token": "",
        "secret_flag": None,
    }
    text = json.dumps(document, indent=2)
    out = json.loads(redact_json_text(text))
    assert out == {
        "api_key": M,
        "nested": {"token": M, "enabled": True, "name": "x"},
        "list": [{"password": M}, f"password={M}"],
        "basic_auth": {"username": "u", "password": M},
        "credentials": {"user": M},
        "classifier_priority": 5,
        "empty_token": "",
        "secret_flag": None,
    }
    assert redact_json_value(document) == out


def test_json_without_secrets_is_returned_byte_for_byte():
    text = '[{"id":12,"tag":"1a2b3c4d5e6f7a8b","name":"term_ok"}]\n'
    assert redact_json_text(text) is text


def test_compact_json_stays_compact():
    assert redact_json_text('{"token":"x","a":1}\n') == f'{{"token":"{M}","a":1}}\n'


def test_text_that_is_not_json_is_redacted_as_text():
    assert redact_json_text('{"token": "x", broken') == f'{{"token": "{M}", broken'


def test_bytes_that_are_not_utf8_survive():
    data = b"\xff\xfe binary\napi_key: k\n\x80"
    assert redact_bytes(data) == b"\xff\xfe binary\napi_key: " + M.encode() + b"\n\x80"


SECRETS = st.text(
    alphabet=st.characters(whitelist_categories=("L", "N"), whitelist_characters="-_.+/@!%~"),
    min_size=8,
    max_size=40,
).filter(lambda s: s.lower() not in ("true", "false", "null"))
TEMPLATES = [
    "api_key: {s}\n",
    "  app_key: '{s}'\nsite: x\n",
    "DD_API_KEY={s}\n",
    'export DD_APP_KEY="{s}"\n',
    "ts=1 level=info token={s} user=bob\n",
    "proxy: http://user:{s}@host:1\n",
    "password:\n  - {s}\n  - other\n",
    "- name: DD_API_KEY\n  value: {s}\n",
    "Authorization: Bearer {s}\n",
]


@settings(max_examples=300, deadline=None)
@given(secret=SECRETS, template=st.sampled_from(TEMPLATES))
def test_no_planted_secret_survives(secret: str, template: str):
    assume(secret.lower() not in template.lower())  # e.g. the secret "password" is a key name
    if "://" in template:
        assume("/" not in secret)  # not valid unencoded in a URL's user info: ends the host
    text = template.format(s=secret)
    assert secret not in redact_text(text)


@settings(max_examples=200, deadline=None)
@given(secret=SECRETS, key=st.sampled_from(["api_key", "token", "password", "app_key"]))
def test_no_secret_survives_in_json(secret: str, key: str):
    text = json.dumps({"outer": [{key: secret, "other": 1}]})
    out = redact_json_text(text)
    assert secret not in out
    assert json.loads(out)["outer"][0] == {key: M, "other": 1}
