"""The per-boot cache of kernel helper names: used only when fresh and root's own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tcprio.kernel import bpf_syscalls, helper_cache
from tcprio.kernel.helper_cache import CACHE_NAME, kernel_fingerprint, read_cache, write_cache

HELPERS = {0x100: "bpf_redirect", -0x200: "htab_map_lookup_elem"}


def fake_proc(root: Path, boot_id: str, modules: str | None) -> Path:
    (root / "sys/kernel/random").mkdir(parents=True, exist_ok=True)
    (root / "sys/kernel/random/boot_id").write_text(boot_id + "\n")
    if modules is not None:
        (root / "modules").write_text(modules)
    return root


def test_fingerprint_follows_the_boot_and_the_modules_not_their_use_counts(tmp_path: Path):
    line = "veth 40960 {refs} - Live 0xffffffffc0a00000\n"
    base = kernel_fingerprint(fake_proc(tmp_path / "a", "boot-1", line.format(refs=0)))
    assert base is not None
    assert kernel_fingerprint(fake_proc(tmp_path / "b", "boot-1", line.format(refs=7))) == base
    assert kernel_fingerprint(fake_proc(tmp_path / "c", "boot-2", line.format(refs=0))) != base
    moved = "veth 40960 0 - Live 0xffffffffc0b00000\n"
    assert kernel_fingerprint(fake_proc(tmp_path / "d", "boot-1", moved)) != base
    assert kernel_fingerprint(fake_proc(tmp_path / "e", "boot-1", None)) is not None
    assert kernel_fingerprint(tmp_path / "nothing") is None


def test_written_cache_reads_back_private_to_root(tmp_path: Path):
    cache = tmp_path / "run-tcprio"
    write_cache("fp", HELPERS, cache)
    assert read_cache("fp", cache) == HELPERS
    assert (cache.stat().st_mode & 0o777) == 0o700
    assert ((cache / CACHE_NAME).stat().st_mode & 0o777) == 0o600
    assert read_cache("another boot", cache) is None
    assert [p.name for p in cache.iterdir()] == [CACHE_NAME]  # no temporary file left


@pytest.mark.parametrize(
    "spoil",
    [
        lambda path: path.chmod(0o666),  # anyone could have written it
        lambda path: os.chown(path, 65534, 65534),  # not root's
        lambda path: path.write_text("{not json"),
        lambda path: path.write_text(json.dumps({"fingerprint": "fp", "helpers": ["x"]})),
        lambda path: path.write_text(json.dumps({"fingerprint": "fp", "helpers": {"x": "y"}})),
        lambda path: path.write_text(json.dumps(["fp"])),
        lambda path: path.write_text(json.dumps({"fingerprint": "fp", "helpers": {"1": "x"}})),
        lambda path: path.unlink() or path.mkdir(),
    ],
)
def test_a_cache_that_cannot_be_trusted_is_ignored(tmp_path: Path, spoil):
    write_cache("fp", HELPERS, tmp_path)
    spoil(tmp_path / CACHE_NAME)
    assert read_cache("fp", tmp_path) is None


def test_a_cache_that_cannot_be_written_is_not_an_error(tmp_path: Path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    write_cache("fp", HELPERS, blocked)  # mkdir fails: silently no cache
    assert read_cache("fp", blocked) is None


def test_helper_symbols_with_the_cache_equal_a_fresh_read_of_kallsyms(classifier_programs):
    """With programs loaded, kallsyms lists their JIT images ("[bpf]"): they come and go with
    every load, are never a helper, and must not make a cached read differ from a fresh one."""
    jited = Path("/proc/kallsyms").read_text().count("\t[bpf]")
    assert jited > 0 or not _jit_on(), "the test programs should show in kallsyms"
    bpf_syscalls.helper_symbols.cache_clear()
    try:
        first = bpf_syscalls.helper_symbols()  # from the cache or from kallsyms (then cached)
        fingerprint = kernel_fingerprint()
        assert fingerprint is not None
        assert read_cache(fingerprint, helper_cache.CACHE_DIR) == first
        assert first == bpf_syscalls.load_helper_symbols()
        assert "bpf_redirect" in first.values()
    finally:
        bpf_syscalls.helper_symbols.cache_clear()


def _jit_on() -> bool:
    try:
        return Path("/proc/sys/net/core/bpf_jit_enable").read_text().strip() != "0"
    except OSError:
        return False
