#!/usr/bin/env bash
# Install tcprio as a systemd service on a node (Debian 12, as root). Idempotent: run it again
# to upgrade (the code is replaced, the virtualenv kept, the config file never overwritten).
#
#   /opt/tcprio/                    a copy of this project (without .git, .venv, tests, caches)
#   /opt/tcprio/.venv/              scripts/setup.sh runtime: Debian packages (BCC, bpftool,
#                                   kernel headers ...), tcprio installed, Debian's BCC linked in
#   /etc/systemd/system/tcprio.service
#   /etc/tcprio/tcprio.yaml         from systemd/tcprio.yaml, only when absent
#
# Then `systemctl daemon-reload` and `systemctl enable --now tcprio` (restart when it was
# running, to load the new code), only when systemd is PID 1.
#
# DESTDIR=/some/dir puts every file under that prefix instead and never calls systemctl (for
# testing the installer; Debian packages are still installed on this machine when missing).
# PYTHON=... picks the virtualenv's interpreter (default /usr/bin/python3: it must not live
# under /root or /home, which the unit's ProtectHome=yes hides).
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
destdir=${DESTDIR:-}
destdir=${destdir%/}
opt="$destdir/opt/tcprio"
unit_dir="$destdir/etc/systemd/system"
conf_dir="$destdir/etc/tcprio"
python=${PYTHON:-/usr/bin/python3}

say() { echo "tcprio install: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  say "must run as root (it installs Debian packages and a system service)"
  exit 3
fi
for f in systemd/tcprio.service scripts/setup.sh pyproject.toml; do
  [ -f "$src/$f" ] || { say "$src/$f missing: run this from a tcprio source tree"; exit 3; }
done

# 1. The project copy. Top-level entries are replaced one by one; .venv stays, so setup.sh only
#    reinstalls when pyproject.toml changed. Skipped when running from /opt/tcprio itself.
mkdir -p "$opt"
if [ "$(realpath "$src")" != "$(realpath "$opt")" ]; then
  staging=$(mktemp -d "$opt/.staging.XXXXXX")
  trap 'rm -rf "$staging"' EXIT
  tar -C "$src" \
    --exclude=./.git --exclude=./.venv --exclude=./tests --exclude=./.ci \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache \
    --exclude=.hypothesis --exclude=.mypy_cache --exclude=./.cache --exclude=./build \
    --exclude=./dist \
    -cf - . | tar -C "$staging" -xf -
  # Drop what the new tree no longer has (but never the virtualenv).
  for old in "$opt"/* "$opt"/.[!.]*; do
    [ -e "$old" ] || continue
    name=$(basename "$old")
    case "$name" in .venv | .staging.*) continue ;; esac
    [ -e "$staging/$name" ] || rm -rf "$old"
  done
  for new in "$staging"/* "$staging"/.[!.]*; do
    [ -e "$new" ] || continue
    name=$(basename "$new")
    rm -rf "${opt:?}/$name"
    mv "$new" "$opt/$name"
  done
  rmdir "$staging"
  trap - EXIT
  say "copied $src to $opt"
fi

# 2. Debian packages and the virtualenv: the project's own set-up, run in the copy.
PYTHON="$python" "$opt/scripts/setup.sh" runtime
base=$(sed -n 's/^home *= *//p' "$opt/.venv/pyvenv.cfg")
case "$base" in
  /root | /root/* | /home | /home/*)
    say "$opt/.venv runs $base, which the unit's ProtectHome=yes hides; remove $opt/.venv and" \
      "rerun with PYTHON=/usr/bin/python3"
    exit 3
    ;;
esac
# /opt is read-only for the service (ProtectSystem=strict): byte-compile now.
"$opt/.venv/bin/python" -m compileall -q "$opt/daemon" >/dev/null

# 3. The unit and the config (the config only when there is none: it is the operator's).
install -D -m 0644 "$opt/systemd/tcprio.service" "$unit_dir/tcprio.service"
say "installed $unit_dir/tcprio.service"
if [ -e "$conf_dir/tcprio.yaml" ]; then
  say "kept the existing $conf_dir/tcprio.yaml"
elif [ -f "$opt/systemd/tcprio.yaml" ]; then
  install -D -m 0644 "$opt/systemd/tcprio.yaml" "$conf_dir/tcprio.yaml"
  say "installed $conf_dir/tcprio.yaml"
else
  say "no systemd/tcprio.yaml in this tree: $conf_dir/tcprio.yaml not installed"
fi

# 4. systemd, only on a machine it runs (sd_booted(): /run/systemd/system exists).
if [ -n "$destdir" ]; then
  say "DESTDIR is set: systemctl not called"
elif [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
  if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify "$unit_dir/tcprio.service" || say "systemd-analyze verify complained"
  fi
  was=$(systemctl is-active tcprio 2>/dev/null || true)
  systemctl daemon-reload
  systemctl enable --now tcprio
  if [ "$was" = active ]; then
    systemctl restart tcprio
    say "tcprio restarted with the new code"
  fi
  say "done: systemctl status tcprio; journalctl -u tcprio"
else
  say "systemd is not PID 1 here ($(cat /proc/1/comm 2>/dev/null || echo unknown)): files" \
    "installed, service not enabled; on a systemd machine run: systemctl daemon-reload &&" \
    "systemctl enable --now tcprio"
fi
