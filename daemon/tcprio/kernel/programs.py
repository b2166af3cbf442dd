"""Fetch every BPF program a scan needs: the attached ones, whatever their tail calls reach, and
the EXT programs that freplace links run instead of their functions.

Program and map ids are global to the node, so this runs outside any namespace. A program or
map that vanishes while we read it is recorded as an error, never fatal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from tcprio.kernel import bpf_syscalls
from tcprio.model import MapInfo, ProgramInfo

BPF_MAP_TYPE_PROG_ARRAY = 3


@dataclass
class ProgramCatalogue:
    programs: dict[int, ProgramInfo] = field(default_factory=dict)
    maps: dict[int, MapInfo] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # prog id -> why it could not be read
    map_errors: dict[int, str] = field(default_factory=dict)
    link_errors: list[str] = field(default_factory=list)  # freplace links that could not be read


def _fetch_program(catalogue: ProgramCatalogue, prog_id: int) -> ProgramInfo | None:
    try:
        info = bpf_syscalls.prog_info(prog_id)
    except OSError as exc:
        catalogue.errors[prog_id] = f"program {prog_id} could not be read: {exc}"
        return None
    catalogue.programs[prog_id] = info
    return info


def _fetch_map(catalogue: ProgramCatalogue, map_id: int) -> MapInfo | None:
    try:
        info = bpf_syscalls.map_info(map_id)
    except OSError as exc:
        catalogue.map_errors[map_id] = f"map {map_id} could not be read: {exc}"
        return None
    catalogue.maps[map_id] = info
    return info


# A replaced function that cannot be placed, by an EXT program that cannot be named: what a
# program with BTF (the only kind an EXT program can aim at) gets when the links were not read.
UNREAD_LINKS = ((-1, 0),)


def _freplace_links(catalogue: ProgramCatalogue) -> bpf_syscalls.FreplaceLinks:
    try:
        found = bpf_syscalls.freplace_links()
    except OSError as exc:
        found = bpf_syscalls.FreplaceLinks((), (f"links could not be listed: {exc}",))
    catalogue.link_errors.extend(found.errors)
    return found


def _as_running(
    catalogue: ProgramCatalogue, info: ProgramInfo, links: bpf_syscalls.FreplaceLinks
) -> ProgramInfo:
    """The program with the freplace links aimed at it now (links come and go, a program does
    not change): its `replaced_functions`, kept in the catalogue."""
    replaced = bpf_syscalls.replaced_functions(info.id, links.links)
    if links.errors and info.btf_id:
        replaced = tuple(sorted({*replaced, *UNREAD_LINKS}))
    if replaced != info.replaced_functions:
        info = replace(info, replaced_functions=replaced)
    catalogue.programs[info.id] = info
    return info


def collect_programs(
    root_ids: Iterable[int], known: Mapping[int, ProgramInfo] | None = None
) -> ProgramCatalogue:
    """The programs in `root_ids`, and, transitively, those in the prog arrays they use and the
    EXT programs replacing their functions.

    Programs in `known` are taken from there (a loaded program never changes); maps are always
    read afresh, since prog arrays change.
    """
    catalogue = ProgramCatalogue()
    known = known or {}
    pending = list(dict.fromkeys(root_ids))
    seen_maps: set[int] = set()
    links = _freplace_links(catalogue)
    while pending:
        prog_id = pending.pop()
        if prog_id in catalogue.programs or prog_id in catalogue.errors:
            continue
        info = known.get(prog_id)
        if info is not None:
            catalogue.programs[prog_id] = info
        else:
            info = _fetch_program(catalogue, prog_id)
        if info is None:
            continue
        info = _as_running(catalogue, info, links)
        pending.extend(ext for _off, ext in info.replaced_functions if ext)
        for map_id in info.map_ids:
            if map_id in seen_maps:
                continue
            seen_maps.add(map_id)
            map_info = _fetch_map(catalogue, map_id)
            if map_info is not None and map_info.prog_array:
                pending.extend(map_info.prog_array.values())
    return catalogue
