#!/bin/sh
# Installs (or removes) tailgate as a systemd service: the binary, the unit, the sysusers and
# tmpfiles entries, the documentation and, unless one exists, the configuration. Idempotent: a
# rerun changes nothing that is already in place, and an existing configuration is never
# overwritten (the shipped one is written next to it as tailgate.yaml.dist).
#
#   systemd/install.sh [--binary PATH] [--prefix /usr] [--destdir DIR] [--dry-run]
#   systemd/install.sh --uninstall [--purge] [--prefix /usr] [--destdir DIR] [--dry-run]
#
# --binary   the tailgate binary to install (default: target/dist/tailgate, the size-optimised
#            build: `cargo build --profile dist`, run if it is missing)
# --prefix   where the binary, unit and system snippets go (default /usr; /etc and /var stay)
# --destdir  stage into this root instead of / (packaging, tests): nothing is started or reloaded
# --dry-run  print what would be done, change nothing
# --uninstall  remove the binary, unit and snippets (the configuration and the queue stay;
#              --purge removes /etc/tailgate and /var/lib/tailgate too)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
binary=""
prefix=/usr
destdir=""
dry_run=0
uninstall=0
purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --destdir) destdir=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

bindir="$destdir$prefix/bin"
unitdir="$destdir$prefix/lib/systemd/system"
sysusersdir="$destdir$prefix/lib/sysusers.d"
tmpfilesdir="$destdir$prefix/lib/tmpfiles.d"
docdir="$destdir$prefix/share/doc/tailgate"
confdir="$destdir/etc/tailgate"
statedir="$destdir/var/lib/tailgate"

run() {
  if [ "$dry_run" = 1 ]; then echo "would: $*"; else "$@"; fi
}

# Installs $1 as $3 with mode $2 unless an identical file is there already.
put() {
  if [ -f "$3" ] && cmp -s "$1" "$3" && [ "$(stat -c %a "$3")" = "$2" ]; then
    echo "unchanged: $3"
    return
  fi
  run install -D -m "$2" "$1" "$3"
  echo "installed: $3"
}

live=0
[ -z "$destdir" ] && [ -d /run/systemd/system ] && live=1

if [ "$uninstall" = 1 ]; then
  [ "$live" = 1 ] && run systemctl disable --now tailgate.service || true
  for f in "$bindir/tailgate" "$unitdir/tailgate.service" "$sysusersdir/tailgate.conf" \
           "$tmpfilesdir/tailgate.conf" "$docdir/README.md" "$docdir/tailgate.example.yaml"; do
    if [ -e "$f" ]; then run rm -f "$f"; echo "removed: $f"; fi
  done
  [ -d "$docdir" ] && run rmdir "$docdir" 2>/dev/null || true
  if [ "$purge" = 1 ]; then
    for d in "$confdir" "$statedir"; do
      if [ -e "$d" ]; then run rm -rf "$d"; echo "purged: $d"; fi
    done
  else
    echo "kept: $confdir and $statedir (--purge removes them)"
  fi
  [ "$live" = 1 ] && run systemctl daemon-reload || true
  exit 0
fi

if [ -z "$binary" ]; then
  binary="$repo/target/dist/tailgate"
  if [ ! -x "$binary" ]; then
    run cargo build --profile dist --manifest-path "$repo/Cargo.toml" --bin tailgate
  fi
fi
if [ "$dry_run" = 0 ] && [ ! -x "$binary" ]; then
  echo "install.sh: no tailgate binary at $binary" >&2
  exit 1
fi

put "$binary" 755 "$bindir/tailgate"
# The unit names /usr/bin/tailgate; another prefix gets its own path written in.
unit_tmp=$(mktemp)
trap 'rm -f "$unit_tmp" "${conf_tmp:-}"' EXIT
sed "s|/usr/bin/tailgate|$prefix/bin/tailgate|g; s|/usr/share/doc/tailgate|$prefix/share/doc/tailgate|g" \
  "$here/tailgate.service" > "$unit_tmp"
put "$unit_tmp" 644 "$unitdir/tailgate.service"
put "$here/tailgate.sysusers" 644 "$sysusersdir/tailgate.conf"
put "$here/tailgate.tmpfiles" 644 "$tmpfilesdir/tailgate.conf"
put "$here/README.md" 644 "$docdir/README.md"
put "$repo/config/tailgate.example.yaml" 644 "$docdir/tailgate.example.yaml"

# The configuration: the shipped example with the service's data directory; never overwritten.
conf_tmp=$(mktemp)
sed 's|^data_dir: .*|data_dir: /var/lib/tailgate|' "$repo/config/tailgate.example.yaml" > "$conf_tmp"
if [ -e "$confdir/tailgate.yaml" ]; then
  if cmp -s "$conf_tmp" "$confdir/tailgate.yaml"; then
    echo "unchanged: $confdir/tailgate.yaml"
  else
    echo "kept: $confdir/tailgate.yaml (yours); the shipped one is $confdir/tailgate.yaml.dist"
    put "$conf_tmp" 640 "$confdir/tailgate.yaml.dist"
  fi
else
  put "$conf_tmp" 640 "$confdir/tailgate.yaml"
fi

if [ "$live" = 1 ]; then
  run systemd-sysusers "$sysusersdir/tailgate.conf"
  run systemd-tmpfiles --create "$tmpfilesdir/tailgate.conf"
  run chgrp tailgate "$confdir/tailgate.yaml"
  run systemctl daemon-reload
  echo "next: edit $confdir/tailgate.yaml, then: systemctl enable --now tailgate"
else
  echo "staged under ${destdir:-/} (no systemd running there: users, directories and the unit are set up at first boot or by the package's scripts)"
fi
