#!/bin/bash
# Runs inside a virtme-ng guest started by scripts/vm-test.sh: readies the kernel the way a
# node has it (tc classifier and qdisc modules loaded, bpffs mounted), then runs pytest on the
# given test files with a junit file for this kernel.
#   usage: tests/vm/guest.sh OUTDIR PYTEST-ARGS...
# Writes OUTDIR/junit-$(uname -r).xml, OUTDIR/pytest-$(uname -r).log and OUTDIR/rc-$(uname -r)
# ("<pytest exit status> <seconds>"). The guest sees the checkout read-only.
set -u
out=$1
shift
cd "$(dirname "$0")/../.." || exit 2
kver=$(uname -r)
export PYTHONDONTWRITEBYTECODE=1
modules_failed=""
for module in cls_bpf sch_ingress veth; do
    modprobe "$module" || modules_failed="$modules_failed $module"
done
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
start=$(date +%s)
{
    echo "kernel $kver; modprobe failed for:${modules_failed:- none}"
    .venv/bin/python -c 'from tcprio.service.live_probe import probe_support as p
s = p()
print(f"TCPRIO_LIVE_PROBE_MODE={s.mode} ({s.reason})")'
    .venv/bin/python -c 'from tcprio.kernel import bpf_syscalls as b
from tcprio.model import Direction
try:
    b.tcx_query(1, Direction.INGRESS)
    print("TCPRIO_TCX=yes")
except b.TcxUnsupported as exc:
    print(f"TCPRIO_TCX=no ({exc})")'
    timeout "${TCPRIO_VM_PYTEST_TIMEOUT:-3000}" .venv/bin/python -m pytest -p no:cacheprovider \
        -q -rs -o junit_suite_name="tcprio-$kver" --junitxml="$out/junit-$kver.xml" "$@"
} > "$out/pytest-$kver.log" 2>&1
rc=$?
echo "$rc $(($(date +%s) - start))" > "$out/rc-$kver"
exit "$rc"
