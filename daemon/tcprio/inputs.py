"""Untrusted text in: one-line messages that quote it safely, YAML with line numbers and
duplicate keys, the collector of notes and errors, and a version number found in free text.

A shared leaf like `tcprio.model`: every layer may import it, and it imports nothing of tcprio.
"""

from __future__ import annotations

import contextlib
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml

# --- one-line messages ------------------------------------------------------------------------

MAX_SHOWN = 80  # characters of a bad value shown in a message

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel = 2
_BRIEF.maxdict = _BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxset = _BRIEF.maxfrozenset = 4
_BRIEF.maxstring = _BRIEF.maxother = _BRIEF.maxlong = MAX_SHOWN


def one_line(text: str) -> str:
    """`text` with every non-printable character escaped (newlines, terminal escapes, Unicode
    line separators): a message built from it stays one line and cannot forge another."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def label_of(text: str, limit: int = 300) -> str:
    """A path or name shown in a message or a source label: one line, at most `limit` chars."""
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def brief(value: object, limit: int = MAX_SHOWN) -> str:
    """A bad value as shown in a message: its repr, bounded in depth, breadth and length (a YAML
    alias bomb or a 10 MB string costs nothing), on one line."""
    try:
        text = _BRIEF.repr(value)
    except Exception:  # an int too long to print, a broken object
        text = f"<{type(value).__name__}>"
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- YAML with line numbers and duplicate keys -----------------------------------------------


class ConfigReadError(Exception):
    """A config file that exists but cannot be used; the message is one report line.
    `kind`: missing, type, pseudo, size, io, loop or text."""

    def __init__(self, message: str, kind: str = "io", **details: object) -> None:
        super().__init__(message)
        self.kind = kind
        self.details = details


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python tags), noting duplicate keys (PyYAML keeps the last)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[object, int]] = []
        self.node: yaml.Node | None = None

    def construct_object(self, node, deep=False):  # type: ignore[no-untyped-def]
        self.node = node
        return super().construct_object(node, deep)

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                    key_node, yaml.ScalarNode
                ):
                    continue
                key = self.construct_object(key_node)
                with contextlib.suppress(TypeError):
                    if key in seen:
                        self.duplicates.append((key, key_node.start_mark.line + 1))
                    seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> tuple[object, list[tuple[object, int]]]:
    """(document, [(duplicate key, line)]); ConfigReadError("malformed YAML: ...") on anything
    the loader refuses, including what PyYAML raises outside YAMLError (`!!int abc`, an integer
    of 5000 digits, nesting deeper than Python's recursion limit)."""
    try:
        loader = _Loader(text)  # the reader refuses NUL and other control characters here
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        problem = f"unacceptable character #x{exc.character:04x}"
        where = f" at line {line}, column {column}"
        raise ConfigReadError(
            f"malformed YAML: {problem}{where}", "yaml", problem=problem, where=where
        ) from None
    try:
        return loader.get_single_data(), loader.duplicates
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        problem = one_line(problem)
        raise ConfigReadError(
            f"malformed YAML: {problem}{where}", "yaml", problem=problem, where=where
        ) from None
    except RecursionError:
        problem = "nested too deeply"
        raise ConfigReadError(
            f"malformed YAML: {problem}", "yaml", problem=problem, where=""
        ) from None
    except Exception as exc:  # ValueError, AttributeError... from a tagged or huge scalar
        where = _loader_line(loader)
        problem = f"a value cannot be read ({brief(str(exc), 60)})"
        raise ConfigReadError(
            f"malformed YAML: {problem}{where}", "yaml", problem=problem, where=where
        ) from None
    finally:
        loader.dispose()


def _loader_line(loader: _Loader) -> str:
    node = loader.node
    return f" at line {node.start_mark.line + 1}" if node is not None else ""


def parse_yaml_mapping(text: str, duplicates: list[str] | None = None) -> Mapping[str, object]:
    """The YAML mapping in `text` ({} when empty). Each duplicate key adds a line to
    `duplicates` when given."""
    data, dups = load_yaml(text)
    if duplicates is not None:
        duplicates.extend(
            f"duplicate key {brief(key)} at line {line}; the last one is used" for key, line in dups
        )
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigReadError(f"YAML root is a {type(data).__name__}, not a mapping", "yaml")
    return data


# --- what was read, and what was said about it -----------------------------------------------


@dataclass(frozen=True)
class ConfigDoc:
    """One config file that was read: the label shown in reports, and its YAML mapping."""

    label: str
    data: Mapping[str, object]


@dataclass
class Log:
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# --- version numbers in free text ------------------------------------------------------------

_VERSION = re.compile(r"(\d+)((?:\.\d+)+)")


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """The first dotted number in `text`: "agent 7.50.3-1" -> (7, 50, 3), "v1.9.18" -> (1, 9, 18).
    None when there is none."""
    if not text:
        return None
    match = _VERSION.search(text)
    if match is None:
        return None
    return (int(match.group(1)), *(int(p) for p in match.group(2).split(".")[1:]))
