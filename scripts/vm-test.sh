#!/usr/bin/env bash
# The kernel matrix: boots Debian's 6.1 (no tcx) and 6.12 (tcx) kernels in virtme-ng guests and
# runs the kernel-dependent tests inside each, as root, against that kernel.
#
#   scripts/vm-test.sh [--no-install] [--jobs N] [--kernel RELEASE]... [pytest args or test files]
#
# Installs what it needs first (idempotent; apt-get only when something is missing): qemu, the
# newest Debian 6.1 and 6.12 kernels with their headers, initramfs-tools and busybox-static
# (the kernel packages want them), and virtme-ng (PyPI) in the dev virtualenv. Results go to
# $TCPRIO_VM_OUT (default build/vm): junit-RELEASE.xml, pytest-RELEASE.log and vng-RELEASE.log
# per kernel, and one summary line per kernel on stdout and in summary.txt.
# The guests run side by side, --jobs at a time (default: as many as there are CPUs, at most one
# per kernel), sharing the CPUs: a TCG guest runs pytest on one vCPU anyway.
# Exit status: 0 when every kernel booted and its tests passed; 1 when tests failed; 3 when a
# guest could not boot or never reported (the summary line says which).
#
# /dev/kvm is used only with TCPRIO_VM_KVM=1: nested KVM (kvm_pvm here) does not run stock
# kernels, so the guests run under TCG by default (20-40x slower than the host: a guest boots
# in about 30 s, BCC compiles a program in about 40 s; see the README for measured times).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${TCPRIO_VM_OUT:-$root/build/vm}
venv=$root/.venv
install=1
max_jobs=0
kernels=()
pytest_args=()

# The kernel-dependent part of the suite (what differs between kernels): the scan scene and its
# differential checks against tc and bpftool, verdicts against BPF_PROG_TEST_RUN, run counters,
# tcx and its absence, the live probe, the self-test, the daemon end to end, the tests that
# only a guest kernel runs (fexit/freplace, netkit), and what else differs between kernels
# (helper names, xlated code, run statistics, tc modules: tests/test_kernel_differences.py).
KERNEL_TESTS=(
    tests/test_bpf_syscalls.py
    tests/test_scan_kernel.py
    tests/test_verdicts_kernel.py
    tests/test_run_counters.py
    tests/test_live_probe.py
    tests/test_selftest.py
    tests/test_daemon.py
    tests/test_freplace.py
    tests/test_netkit_kernel.py
    tests/test_kernel_differences.py
)
# Drivers of qemu's q35 devices that the tests never use: udev loading them costs ~15 s a boot.
BLACKLIST=ahci,libahci,libata,ata_piix,ata_generic,sr_mod,cdrom,psmouse,evdev,serio_raw,pcspkr
BLACKLIST+=,joydev,i2c_i801,lpc_ich,iTCO_wdt,kvm,kvm_intel,kvm_amd,aesni_intel
BLACKLIST+=,ghash_clmulni_intel,sha512_ssse3,sha256_ssse3,crc32_pclmul,crct10dif_pclmul
BLACKLIST+=,intel_rapl_msr,intel_rapl_common,floppy,parport_pc,bochs

while (($#)); do
    case "$1" in
        --no-install) install=0 ;;
        --jobs) max_jobs=$2; shift ;;
        --kernel) kernels+=("$2"); shift ;;
        *) pytest_args+=("$1") ;;
    esac
    shift
done
((${#pytest_args[@]})) || pytest_args=("${KERNEL_TESTS[@]}")

if [ "$(id -u)" != 0 ]; then
    echo "vm-test: needs root (the guests run the tests as root)" >&2
    exit 2
fi

newest_package() {  # newest package name matching an extended regex, from apt's local lists
    apt-cache pkgnames "$1" 2>/dev/null | grep -E "^$2\$" | sort -V | tail -n 1
}

missing_packages() {
    local package
    for package in "$@"; do
        dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q "ok installed" ||
            echo "$package"
    done
}

install_dependencies() {
    local releases=("$@") packages=(qemu-system-x86 initramfs-tools busybox-static)
    local release
    for release in "${releases[@]}"; do
        packages+=("linux-image-$release" "linux-headers-$release")
    done
    mapfile -t missing < <(missing_packages "${packages[@]}")
    if ((${#missing[@]})); then
        echo "vm-test: installing ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            "${missing[@]}" >/dev/null || return 1
    fi
    if [ ! -x "$venv/bin/vng" ]; then
        "$root/scripts/setup.sh" dev >/dev/null || return 1
        "$venv/bin/python" -m pip install -q "virtme-ng==1.42" || return 1
    fi
}

default_kernels() {  # the newest 6.1 and 6.12 Debian kernels: installed, else in apt's lists
    local pattern release
    for pattern in 'linux-image-6\.1\.0-[0-9]+-amd64' 'linux-image-6\.12\.[0-9]+\+deb12-amd64'; do
        release=$(find /boot -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' |
            sed 's/^vmlinuz-/linux-image-/' | grep -E "^$pattern\$" | sort -V | tail -n 1)
        [ -n "$release" ] || release=$(newest_package "${pattern%%\\*}" "$pattern")
        [ -n "$release" ] && echo "${release#linux-image-}"
    done
}

# One line per kernel: "KERNEL: passed=N failed=N errors=N skipped=N in Ss (tcx: ..., live
# probe: ...)" from its junit file, or why there is none.
summarize() {
    local release=$1 status=$2 seconds=$3 junit="$out/junit-$1.xml"
    if [ ! -s "$junit" ]; then
        echo "$release: NO RESULTS ($status) after ${seconds}s: see $out/vng-$release.log"
        return
    fi
    "$venv/bin/python" - "$junit" "$release" "$seconds" "$out/pytest-$release.log" <<'PY'
import re, sys
import xml.etree.ElementTree as ET
junit, release, seconds, log = sys.argv[1:]
totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for suite in ET.parse(junit).getroot().iter("testsuite"):
    for key in totals:
        totals[key] += int(suite.get(key, 0))
passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
text = open(log, errors="replace").read()
tcx = "no" if "TCPRIO_TCX=no" in text else "yes" if "TCPRIO_TCX=yes" in text else "unknown"
modes = sorted(set(re.findall(r"TCPRIO_LIVE_PROBE_MODE=(\S+)", text)))
print(f"{release}: passed={passed} failed={totals['failures']} errors={totals['errors']} "
      f"skipped={totals['skipped']} in {seconds}s (tcx: {tcx}; "
      f"live probe: {','.join(modes) or 'unknown'})")
PY
}

run_guest() {
    local release=$1 image=/boot/vmlinuz-$1 kvm=(--disable-kvm) slowdown=20 started status
    [ "${TCPRIO_VM_KVM:-0}" = 1 ] && kvm=() slowdown=2
    rm -f "$out/junit-$release.xml" "$out/rc-$release" "$out/pytest-$release.log"
    started=$(date +%s)
    PATH="$venv/bin:$PATH" timeout "${TCPRIO_VM_TIMEOUT:-3600}" "$venv/bin/vng" "${kvm[@]}" \
        -m "${TCPRIO_VM_MEMORY:-2G}" -p "$cpus" -r "$image" --rwdir "$out" --cwd "$root" \
        --append "modprobe.blacklist=$BLACKLIST" \
        --exec "TCPRIO_TEST_SLOWDOWN=$slowdown tests/vm/guest.sh $out ${pytest_args[*]}" \
        >"$out/vng-$release.log" 2>&1
    status=$?
    [ -s "$out/rc-$release" ] || status="guest did not boot or never reported, vng status $status"
    summarize "$release" "$status" "$(($(date +%s) - started))" >"$out/summary-$release.txt"
}

mkdir -p "$out"
: >"$out/summary.txt"
((${#kernels[@]})) || mapfile -t kernels < <(default_kernels)
if ((${#kernels[@]} == 0)); then
    echo "vm-test: no Debian 6.1 or 6.12 kernel found (apt-get update?)" | tee "$out/summary.txt"
    exit 3
fi
if ((install)) && ! install_dependencies "${kernels[@]}"; then
    echo "vm-test: could not install the guests' dependencies" | tee "$out/summary.txt"
    exit 3
fi
((max_jobs > 0)) || max_jobs=$(($(nproc) < ${#kernels[@]} ? $(nproc) : ${#kernels[@]}))
cpus=$(($(nproc) / max_jobs > 0 ? $(nproc) / max_jobs : 1))
running=0
for release in "${kernels[@]}"; do
    if ((running >= max_jobs)); then
        wait -n
        running=$((running - 1))
    fi
    rm -f "$out/summary-$release.txt"
    run_guest "$release" &
    running=$((running + 1))
done
wait
for release in "${kernels[@]}"; do
    cat "$out/summary-$release.txt" 2>/dev/null ||
        echo "$release: NO RESULTS (the run was cut short)"
done | tee "$out/summary.txt"
if grep -q "NO RESULTS" "$out/summary.txt"; then
    exit 3
fi
if grep -Eq "failed=[1-9]|errors=[1-9]" "$out/summary.txt"; then
    exit 1
fi
exit 0
