#!/usr/bin/env bash
# PostgreSQL for the control plane's tests: the server on 127.0.0.1:5432 (trust auth for
# user postgres, as on this project's machines and CI). Start an installed cluster that is
# down; install one when none is (root + apt-get), giving 127.0.0.1 trust auth on the
# cluster it just made only; otherwise say loudly that the PostgreSQL tests will be skipped
# (under CI they fail instead: see tests/integration/control_plane/conftest.py).
set -uo pipefail
ready() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; }
start_clusters() {
  for dir in /etc/postgresql/*/main; do
    [ -d "$dir" ] || continue
    version=$(basename "$(dirname "$dir")")
    echo "PostgreSQL $version is down: starting it"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
  for _ in $(seq 1 30); do ready && return 0; sleep 0.5; done
  return 1
}
ready && exit 0
root_apt=false
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && root_apt=true
if $root_apt && command -v pg_ctlcluster >/dev/null 2>&1 && start_clusters; then
  exit 0
fi
if $root_apt && ! ls -d /etc/postgresql/*/main >/dev/null 2>&1; then
  echo "PostgreSQL missing: apt-get install postgresql"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; then
    for dir in /etc/postgresql/*/main; do  # the cluster the package just made
      sed -i '1i host all postgres 127.0.0.1/32 trust' "$dir/pg_hba.conf"
      version=$(basename "$(dirname "$dir")")
      # the package may have started it (before the line above): restart, else start
      pg_ctlcluster --skip-systemctl-redirect "$version" main restart 2>/dev/null || true
    done
    ready || start_clusters
    for _ in $(seq 1 30); do ready && exit 0; sleep 0.5; done
  else
    echo "!!! apt-get install postgresql FAILED" >&2
  fi
fi
if ! command -v pg_isready >/dev/null 2>&1; then
  # no client tools: let the tests' own probe decide
  exit 0
fi
{
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  echo "!!! WARNING: no PostgreSQL answers on 127.0.0.1:5432 and none could be started."
  echo "!!! The control plane's PostgreSQL tests will be SKIPPED (they fail under CI)."
  echo "!!! Install it (apt-get install postgresql) with trust auth for 127.0.0.1."
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
} >&2
exit 0
