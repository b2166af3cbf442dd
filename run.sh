#!/usr/bin/env bash
# The two entry points of the README. Each does all the set-up it needs first (idempotent).
#   ./run.sh scan [tcprio options]   scan this node: every TC classifier, its verdicts, the conflicts
#   ./run.sh test [pytest options]   run the whole test suite against the real kernel
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cmd=${1:-}
shift || true
case "$cmd" in
  scan)
    "$root/scripts/setup.sh" scan  # no BCC nor kernel headers: a scan does not compile
    exec "$root/.venv/bin/tcprio" scan "$@"
    ;;
  test)
    "$root/scripts/setup.sh" dev
    cd "$root"
    "$root/.venv/bin/ruff" check .
    exec "$root/.venv/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh scan [tcprio options] | ./run.sh test [pytest options]" >&2
    exit 64
    ;;
esac
