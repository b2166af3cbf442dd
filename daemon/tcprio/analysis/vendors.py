"""Name the product behind a classifier, from the rules in data/vendors.yaml."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class VendorRule:
    name: str
    role: str
    programs: tuple[re.Pattern[str], ...]
    filters: tuple[re.Pattern[str], ...]
    datadog_classifier: bool = False
    remedy: str = ""

    def matches(self, program_name: str | None, filter_name: str | None) -> bool:
        if program_name and any(p.match(program_name) for p in self.programs):
            return True
        return bool(filter_name and any(p.match(filter_name) for p in self.filters))


def _rule(entry: dict[str, Any]) -> VendorRule:
    return VendorRule(
        name=str(entry["name"]),
        role=str(entry.get("role", "")),
        programs=tuple(re.compile(p) for p in entry.get("programs", [])),
        filters=tuple(re.compile(p) for p in entry.get("filters", [])),
        datadog_classifier=bool(entry.get("datadog_classifier", False)),
        remedy=str(entry.get("remedy", "")).strip(),
    )


def parse_rules(text: str) -> tuple[VendorRule, ...]:
    # The C loader when PyYAML has it: 10x faster on this file, same result.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    document = yaml.load(text, Loader=loader) or {}
    return tuple(_rule(entry) for entry in document.get("vendors", []))


@lru_cache(maxsize=1)
def default_rules() -> tuple[VendorRule, ...]:
    text = (Path(__file__).resolve().parents[1] / "data" / "vendors.yaml").read_text()
    return parse_rules(text)


def identify(
    program_name: str | None,
    filter_name: str | None,
    rules: tuple[VendorRule, ...] | None = None,
) -> VendorRule | None:
    """The first rule matching the program or filter name, or None."""
    for rule in default_rules() if rules is None else rules:
        if rule.matches(program_name, filter_name):
            return rule
    return None


def rule_by_name(name: str, rules: tuple[VendorRule, ...] | None = None) -> VendorRule | None:
    for rule in default_rules() if rules is None else rules:
        if rule.name == name:
            return rule
    return None
