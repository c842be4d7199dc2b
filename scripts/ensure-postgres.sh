#!/usr/bin/env bash
# PostgreSQL for the control plane's tests: the server on 127.0.0.1:5432 (trust auth for
# user postgres, as on this project's machines and CI). Start an installed cluster that is
# down when we can; otherwise say loudly that the PostgreSQL tests will be skipped (under CI
# they fail instead: see tests/integration/control_plane/conftest.py).
set -uo pipefail
ready() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; }
ready && exit 0
if [ "$(id -u)" = 0 ] && command -v pg_ctlcluster >/dev/null 2>&1; then
  for dir in /etc/postgresql/*/main; do
    [ -d "$dir" ] || continue
    version=$(basename "$(dirname "$dir")")
    echo "PostgreSQL $version is down: starting it"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
  for _ in $(seq 1 30); do ready && exit 0; sleep 0.5; done
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
