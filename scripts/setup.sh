#!/usr/bin/env bash
# Idempotent set-up for a Debian 12 machine, as root: Debian packages, then a virtualenv in
# .venv with tcprio installed and Debian's BCC (python3-bpfcc) importable.
# Usage: scripts/setup.sh [scan|runtime|dev]
#   scan     what `tcprio scan` needs (./run.sh scan): iproute2, a virtualenv
#   runtime  everything tcprio's commands use: BCC and kernel headers (about 230 MB: the
#            self-test and the daemon's live probe compile with them), bpftool (the bundle)
#   dev      runtime and the test tools (./run.sh test)
# Each also installs the shell completion (bash, zsh) and the man page tcprio(8).
set -euo pipefail

profile=${1:-runtime}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"

if [ "$(id -u)" != 0 ]; then
  echo "tcprio setup: must run as root (it installs Debian packages and reads the kernel's BPF state)" >&2
  exit 3
fi

case "$profile" in
  scan|runtime|dev) ;;
  *) echo "tcprio setup: unknown profile '$profile' (scan, runtime or dev)" >&2; exit 64 ;;
esac
debian_packages=(iproute2 python3-venv procps util-linux)
[ "$profile" != scan ] && debian_packages+=(bpftool python3-bpfcc linux-headers-amd64)
# The tests also run a real Prometheus (and promtool) on loopback, systemd-analyze, strace (the
# read-only check of a scan).
[ "$profile" = dev ] && debian_packages+=(prometheus systemd openssl strace)
# The container image test (opt-in: TCPRIO_IMAGE_TEST=1, tests/test_container_image.py): podman
# with runc (crun refuses hosts whose cgroups are in hybrid mode), debootstrap for its base.
[ "$profile" = dev ] && [ "${TCPRIO_IMAGE_TEST:-}" = 1 ] && debian_packages+=(podman runc debootstrap)
missing=()
for pkg in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "tcprio setup: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi

# Reinstall only when the project metadata or the profile changed.
extras=""
[ "$profile" = dev ] && extras="[dev]"
stamp="$venv/.tcprio-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root$extras"
  echo "$want" > "$stamp"
fi

# Byte-compile the package, as a packaged install would: with PYTHONDONTWRITEBYTECODE set,
# every run would otherwise compile tcprio from source (about 50 ms of each scan). Quick when
# nothing changed.
"$venv/bin/python" -m compileall -q "$root/daemon/tcprio" >/dev/null

# Debian's BCC lives in /usr/lib/python3/dist-packages; expose that one package only.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -e "$site/bcc" ] && [ -d /usr/lib/python3/dist-packages/bcc ]; then
  ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi

# Shell completion and man page, generated from the parser (idempotent; DESTDIR-aware).
"$venv/bin/python" "$root/scripts/shell_docs.py" --install --prefix "${DESTDIR:-}/usr/local"
