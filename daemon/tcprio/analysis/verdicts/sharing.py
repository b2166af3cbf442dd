"""One analysis for programs that differ only in constants (a CNI's per-endpoint copies).

A CNI compiles the same datapath for every pod with the pod's own constants (its id, address,
security identity, interface) and gives each copy its own prog array. Analysing 50 copies of a
tail-call graph of 20 programs is 50 times the same work. Instead:

- `graph_shape` numbers the programs and maps a root reaches (breadth first, through the prog
  arrays' slots in order) and keys the graph by everything but the immediates and the ids;
- `SharedVerdicts` keeps, per key, a representative's concrete result. A new copy whose code is
  the representative's but for immediates of ALU, jump and store instructions and 64-bit
  constants is analysed once more *generically*: the representative with those immediates
  replaced by "unknown". Unknown covers every copy's value, so that result holds for each of
  them; it is used only when it equals the representative's concrete result (so no precision
  was lost), and is then reused, with the ids renamed, for every copy that differs only there.
  Otherwise each copy gets its own analysis.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from tcprio.analysis.verdicts.opcodes import (
    ALU,
    ALU64,
    J_CALL,
    J_EXIT,
    J_JA,
    JMP,
    JMP32,
    LD_IMM64,
    MODE_MEM,
    OP_END,
    OP_NEG,
    SRC_X,
    ST,
)
from tcprio.model import (
    ExitPath,
    Instruction,
    MapInfo,
    ProgramInfo,
    ProgramVerdicts,
    RawInstructions,
)

Masks = Mapping[int, frozenset[int]]  # program id -> pcs whose immediate is unknown
# (root, masks, programs, maps) -> the analysis of root with those immediates unknown
Analyse = Callable[[int, Masks, Mapping[int, ProgramInfo], Mapping[int, MapInfo]], ProgramVerdicts]

MAX_GRAPH_PROGRAMS = 64  # larger graphs are analysed one by one
MAX_SHAPES_PER_KEY = 4  # representatives kept for one key (copies that differ elsewhere)
MAX_KEYS = 64  # graph shapes remembered, the least recently used forgotten first
MAX_REMEMBERED = 65_536  # program digests and pairwise diffs kept (then forgotten at once)
_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE = 1, 2
_IDS = re.compile(r"\b(prog|program|map) (\d+)\b")


def raw_bytes(insns: Sequence[Instruction]) -> bytes:
    if isinstance(insns, RawInstructions):
        return insns.raw
    return b"".join(
        bytes((i.code & 0xFF, (i.dst & 0xF) | (i.src & 0xF) << 4))
        + (i.off & 0xFFFF).to_bytes(2, "little")
        + (i.imm & 0xFFFFFFFF).to_bytes(4, "little")
        for i in insns
    )


def _without_immediates(raw: bytes) -> bytes:
    """A digest of the code with every immediate zeroed: equal for copies of one program."""
    masked = bytearray(raw)
    zeros = bytes(len(raw) // 8)
    for byte in range(4, 8):
        masked[byte::8] = zeros
    return hashlib.blake2b(masked, digest_size=16).digest()


@dataclass(frozen=True)
class GraphShape:
    """The programs and maps a root reaches, numbered in a copy-independent order."""

    root: int
    programs: tuple[int, ...]  # local number -> program id (0 is the root)
    maps: tuple[int, ...]  # local number -> map id
    raws: tuple[bytes, ...]  # each program's instructions
    key: tuple

    def local_map(self) -> dict[int, int]:
        return {map_id: n for n, map_id in enumerate(self.maps)}


def graph_shape(
    root: int,
    programs: Mapping[int, ProgramInfo],
    maps: Mapping[int, MapInfo],
    digests: dict[int, bytes] | None = None,
) -> GraphShape | None:
    """None when the graph cannot be shared: something missing or cut short, or too large.
    `digests` keeps each program's digest between calls (a program never changes)."""
    digests = {} if digests is None else digests
    order, number = [root], {root: 0}
    map_order: list[int] = []
    map_number: dict[int, int] = {}
    program_keys, map_keys, raws = [], [], []
    for prog_id in order:  # grows while it is walked: breadth first
        info = programs.get(prog_id)
        if info is None or info.insns is None or not info.insns:
            return None
        if info.replaced_functions:
            return None  # runs code from elsewhere: analysed on its own
        raw = raw_bytes(info.insns)
        raws.append(raw)
        for map_id in info.map_ids:
            if map_id in map_number:
                continue
            found = maps.get(map_id)
            if found is None or found.prog_array_read is not None:
                return None
            map_number[map_id] = len(map_order)
            map_order.append(map_id)
            slots = ()
            if found.prog_array is not None:
                for target in (t for _, t in sorted(found.prog_array.items())):
                    if target not in number:
                        number[target] = len(order)
                        order.append(target)
                slots = tuple((s, number[t]) for s, t in sorted(found.prog_array.items()))
            shape = (found.type, found.key_size, found.value_size, found.max_entries)
            map_keys.append((*shape, found.prog_array is not None, slots))
        if len(order) > MAX_GRAPH_PROGRAMS:
            return None
        local_maps = tuple(map_number[m] for m in info.map_ids)
        digest = digests.get(prog_id)
        if digest is None:
            digest = digests[prog_id] = _without_immediates(raw)
        program_keys.append((info.type, len(raw), digest, local_maps))
    return GraphShape(
        root, tuple(order), tuple(map_order), tuple(raws), (tuple(program_keys), tuple(map_keys))
    )


# --- where two copies differ -------------------------------------------------------------------


_NONZERO = re.compile(rb"[^\x00]")


def _differing_words(a: bytes, b: bytes) -> list[int]:
    """Indices of the 8-byte words where a and b (equal lengths) differ: the bytes XORed as
    big integers and the non-zero bytes found by a regular expression, all in C."""
    xor = (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")
    return sorted({m.start() // 8 for m in _NONZERO.finditer(xor)})


def _maskable(code: int) -> bool:
    """Instructions whose immediate is a value (not a width, a helper, an offset or a map)."""
    cls, op = code & 7, code & 0xF0
    if cls in (ALU, ALU64):
        return not code & SRC_X and op not in (OP_END, OP_NEG)
    if cls in (JMP, JMP32):
        return not code & SRC_X and op not in (J_CALL, J_EXIT, J_JA)
    return cls == ST and code & 0xE0 == MODE_MEM


def _word(raw: bytes, pc: int) -> tuple[int, int, int]:
    """(code, src, imm) of the instruction at pc."""
    return raw[pc * 8], raw[pc * 8 + 1] >> 4, int.from_bytes(raw[pc * 8 + 4 : pc * 8 + 8], "little")


ProgramDiff = tuple[frozenset[int], frozenset[tuple[int, int]]] | None


def _program_diff(a: bytes, b: bytes) -> ProgramDiff:
    """The pcs where b's immediates are another value than a's and the (a's, b's) map ids
    their map references pair; None when b is other code."""
    masked: set[int] = set()
    map_pairs: set[tuple[int, int]] = set()
    for pc in _differing_words(a, b):
        code, src, imm_a = _word(a, pc)
        imm_b = _word(b, pc)[2]
        if a[pc * 8 : pc * 8 + 4] != b[pc * 8 : pc * 8 + 4]:
            return None
        if code == LD_IMM64:
            if src in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
                map_pairs.add((imm_a, imm_b))
                continue
            if src != 0:
                return None
            masked.add(pc)
        elif code == 0 and pc > 0 and a[(pc - 1) * 8] == LD_IMM64:
            if _word(a, pc - 1)[1] != 0:  # the offset into a map value: other code
                return None
            masked.add(pc - 1)  # the upper half of a 64-bit constant
        elif _maskable(code):
            masked.add(pc)
        else:
            return None
    return frozenset(masked), frozenset(map_pairs)


def shape_diff(
    rep: GraphShape,
    copy: GraphShape,
    memo: dict[tuple[int, int], ProgramDiff] | None = None,
) -> dict[int, frozenset[int]] | None:
    """Local program number -> pcs whose immediates differ; None when not a copy. `memo`
    keeps each pair of programs' diff between calls (entry points share their stages)."""
    if rep.key != copy.key:
        return None
    memo = {} if memo is None else memo
    maps_rep, maps_copy = rep.local_map(), copy.local_map()
    diff: dict[int, frozenset[int]] = {}
    for n, (a, b) in enumerate(zip(rep.raws, copy.raws, strict=True)):
        if a == b:
            continue
        pair = (rep.programs[n], copy.programs[n])
        if pair not in memo:
            memo[pair] = _program_diff(a, b)
        found = memo[pair]
        if found is None:
            return None
        pcs, map_pairs = found
        if any(maps_rep.get(x, -1) != maps_copy.get(y, -2) for x, y in map_pairs):
            return None  # the map references pair maps in other places of the graphs
        if pcs:
            diff[n] = pcs
    return diff


# --- renaming a result -------------------------------------------------------------------------


def rename(verdicts: ProgramVerdicts, source: GraphShape, target: GraphShape) -> ProgramVerdicts:
    """`verdicts` of source's root, told with target's program and map ids."""
    progs = dict(zip(source.programs, target.programs, strict=True))
    maps = dict(zip(source.maps, target.maps, strict=True))

    def text(line: str) -> str:
        def one(match: re.Match) -> str:
            table = maps if match.group(1) == "map" else progs
            number = int(match.group(2))
            return f"{match.group(1)} {table.get(number, number)}"

        return _IDS.sub(one, line)

    exits = tuple(
        replace(e, prog_id=progs.get(e.prog_id, e.prog_id), note=text(e.note))
        for e in verdicts.exits
    )
    reasons = tuple(text(r) for r in verdicts.unknown_reasons)
    return ProgramVerdicts(target.root, verdicts.values, exits, reasons)


def _same(a: ProgramVerdicts, b: ProgramVerdicts) -> bool:
    def exits(v: ProgramVerdicts) -> set[ExitPath]:
        return set(v.exits)

    return (
        a.values == b.values
        and exits(a) == exits(b)
        and set(a.unknown_reasons) == set(b.unknown_reasons)
    )


# --- the shared analyses -----------------------------------------------------------------------


def _covers(mask: Mapping[int, frozenset[int]], diff: Mapping[int, frozenset[int]]) -> bool:
    return all(pcs <= mask.get(n, frozenset()) for n, pcs in diff.items())


def _union(a: Mapping[int, frozenset[int]], b: Mapping[int, frozenset[int]]) -> dict:
    return {n: a.get(n, frozenset()) | b.get(n, frozenset()) for n in {*a, *b}}


@dataclass
class _Representative:
    shape: GraphShape
    programs: dict[int, ProgramInfo]  # what the generic analysis needs, kept with it
    maps: dict[int, MapInfo]
    concrete: ProgramVerdicts
    mask: dict[int, frozenset[int]] = field(default_factory=dict)  # local number -> pcs
    generic: ProgramVerdicts | None = None  # holds for every copy differing only in `mask`
    refused: dict[int, frozenset[int]] | None = None  # a mask whose generic result lost precision

    def masks(self, local: Mapping[int, frozenset[int]]) -> dict[int, frozenset[int]]:
        return {self.shape.programs[n]: pcs for n, pcs in local.items()}


@dataclass
class SharingStats:
    """How each root's verdict was obtained (for the bench and the tests)."""

    analysed: int = 0  # concrete analyses of a root
    generic: int = 0  # generic analyses of a representative
    shared: int = 0  # verdicts reused for a copy


class SharedVerdicts:
    """Verdicts of roots whose graphs are copies of one another, analysed once."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # off: every root analysed on its own (the bench's baseline)
        self._by_key: dict[tuple, list[_Representative]] = {}  # least recently used first
        self._digests: dict[int, bytes] = {}  # program id -> digest without immediates
        self._diffs: dict[tuple[int, int], ProgramDiff] = {}  # (program, copy) -> diff
        self.stats = SharingStats()

    def verdicts(
        self,
        root: int,
        programs: Mapping[int, ProgramInfo],
        maps: Mapping[int, MapInfo],
        analyse: Analyse,
    ) -> ProgramVerdicts:
        if len(self._diffs) > MAX_REMEMBERED or len(self._digests) > MAX_REMEMBERED:
            self._diffs, self._digests = {}, {}
        shape = graph_shape(root, programs, maps, self._digests) if self.enabled else None
        if shape is None:
            self.stats.analysed += 1
            return analyse(root, {}, programs, maps)
        representatives = self._by_key.pop(shape.key, [])
        self._by_key[shape.key] = representatives  # now the most recently used
        while len(self._by_key) > MAX_KEYS:
            del self._by_key[next(iter(self._by_key))]
        for rep in representatives:
            diff = shape_diff(rep.shape, shape, self._diffs)
            if diff is not None:
                return self._from_representative(rep, shape, diff, programs, maps, analyse)
        concrete = analyse(root, {}, programs, maps)
        self.stats.analysed += 1
        if len(representatives) < MAX_SHAPES_PER_KEY:
            kept_programs = {p: programs[p] for p in shape.programs}
            kept_maps = {m: maps[m] for m in shape.maps}
            representatives.append(_Representative(shape, kept_programs, kept_maps, concrete))
        return concrete

    def _from_representative(
        self,
        rep: _Representative,
        shape: GraphShape,
        diff: dict[int, frozenset[int]],
        programs: Mapping[int, ProgramInfo],
        maps: Mapping[int, MapInfo],
        analyse: Analyse,
    ) -> ProgramVerdicts:
        if not diff:
            self.stats.shared += 1
            return rename(rep.concrete, rep.shape, shape)
        if rep.generic is not None and _covers(rep.mask, diff):
            self.stats.shared += 1
            return rename(rep.generic, rep.shape, shape)
        wanted = _union(rep.mask, diff)
        if rep.refused is None or not _covers(rep.refused, wanted):
            generic = analyse(rep.shape.root, rep.masks(wanted), rep.programs, rep.maps)
            self.stats.generic += 1
            if _same(generic, rep.concrete):
                rep.mask, rep.generic = wanted, generic
                self.stats.shared += 1
                return rename(generic, rep.shape, shape)
            rep.refused = wanted
        self.stats.analysed += 1
        return analyse(shape.root, {}, programs, maps)
