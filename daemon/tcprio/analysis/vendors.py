"""Name the product behind a classifier, from the rules in data/vendors.yaml."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

KERNEL_NAME_CHARS = 15  # BPF_OBJ_NAME_LEN - 1: what the kernel keeps of a program's name


@dataclass(frozen=True)
class VendorRule:
    name: str
    role: str
    programs: tuple[re.Pattern[str], ...]
    filters: tuple[re.Pattern[str], ...]
    datadog_classifier: bool = False
    # Exact identity (Datadog's classifiers): whole program names, and whole filter names.
    exact_programs: frozenset[str] = frozenset()
    exact_filters: tuple[re.Pattern[str], ...] = ()
    # (program pattern, filter pattern) that identify only together.
    pairs: tuple[tuple[re.Pattern[str], re.Pattern[str]], ...] = ()
    hooks: tuple[str, ...] = ()  # where it attaches: "clsact", "tcx", "netkit", "xdp"
    returns: str = ""  # what its programs return, from its sources
    # The vendor-side fix when it hides Datadog's classifier, by hook kind ("clsact", "tcx"...).
    remedies: tuple[tuple[str, str], ...] = ()
    identified_by: str = ""  # the README table's words
    remedy_summary: str = ""

    def remedy_for(self, hook: str) -> str | None:
        """The vendor-side fix for one of its programs on `hook` (a HookKind value), if any."""
        return dict(self.remedies).get(str(hook))

    def matches(self, program_name: str | None, filter_name: str | None) -> bool:
        return self.evidence(program_name, filter_name) is not None

    def evidence(self, program_name: str | None, filter_name: str | None) -> str | None:
        """Why this classifier is this vendor's (one line), or None when it is not."""
        if self.exact_programs or self.exact_filters:
            return self._exact_evidence(program_name, filter_name)
        if program_name:
            for pattern in self.programs:
                if pattern.match(program_name):
                    return f"program name {program_name} starts like {pattern.pattern!r}"
        if filter_name:
            for pattern in self.filters:
                if pattern.match(filter_name):
                    return f"filter name {filter_name} starts like {pattern.pattern!r}"
        return self._pair_evidence(program_name, filter_name)

    def _pair_evidence(self, program_name: str | None, filter_name: str | None) -> str | None:
        """Program names too generic to claim alone, identified with their filter name."""
        if not program_name or not filter_name:
            return None
        for program, filter_ in self.pairs:
            if program.match(program_name) and filter_.match(filter_name):
                return (
                    f"program name {program_name} together with filter name {filter_name} "
                    f"({program.pattern!r} and {filter_.pattern!r})"
                )
        return None

    def _exact_evidence(self, program_name: str | None, filter_name: str | None) -> str | None:
        """Exact names only: a program named `classifier_ingress_fw` is not Datadog's.

        The full program name (from BTF) must be one of `exact_programs`. A name the kernel cut
        to 15 characters, or no program name at all, needs the filter name as well."""
        filter_ok = bool(filter_name) and any(p.fullmatch(filter_name) for p in self.exact_filters)
        if program_name in self.exact_programs:
            return f"program name {program_name}" + (
                f" and filter name {filter_name}" if filter_ok else ""
            )
        if not filter_ok:
            return None
        if program_name is None:
            return f"filter name {filter_name} (the program's name is not known)"
        cut = len(program_name) == KERNEL_NAME_CHARS and any(
            full.startswith(program_name) for full in self.exact_programs
        )
        if cut:
            return (
                f"filter name {filter_name} and program name {program_name} "
                "(cut to 15 characters by the kernel)"
            )
        return None


def _rule(entry: dict[str, Any]) -> VendorRule:
    return VendorRule(
        name=str(entry["name"]),
        role=str(entry.get("role", "")),
        programs=tuple(re.compile(p) for p in entry.get("programs", [])),
        filters=tuple(re.compile(p) for p in entry.get("filters", [])),
        datadog_classifier=bool(entry.get("datadog_classifier", False)),
        exact_programs=frozenset(str(n) for n in entry.get("exact_programs", [])),
        exact_filters=tuple(re.compile(p) for p in entry.get("exact_filters", [])),
        pairs=tuple(
            (re.compile(pair["program"]), re.compile(pair["filter"]))
            for pair in entry.get("pairs", [])
        ),
        hooks=tuple(str(h) for h in entry.get("hooks", [])),
        returns=_text(entry.get("returns")),
        remedies=tuple(
            (str(hook), _text(text)) for hook, text in (entry.get("remedies") or {}).items()
        ),
        identified_by=_text(entry.get("identified_by")),
        remedy_summary=_text(entry.get("remedy_summary")),
    )


def _text(value: object) -> str:
    return " ".join(str(value).split()) if value is not None else ""


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


def identify_with_evidence(
    program_name: str | None,
    filter_name: str | None,
    rules: tuple[VendorRule, ...] | None = None,
) -> tuple[VendorRule, str] | None:
    """The first rule matching the program or filter name, with the evidence, or None."""
    for rule in default_rules() if rules is None else rules:
        evidence = rule.evidence(program_name, filter_name)
        if evidence is not None:
            return rule, evidence
    return None


def rule_by_name(name: str, rules: tuple[VendorRule, ...] | None = None) -> VendorRule | None:
    for rule in default_rules() if rules is None else rules:
        if rule.name == name:
            return rule
    return None
