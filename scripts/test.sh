#!/usr/bin/env bash
# Install what the test suite needs (mosquitto, PostgreSQL, a venv with edgefleet[test]) and run it.
#
# Without arguments (CI, the README's test command): the whole suite with the hub on SQLite, then the
# tests marked `hubstore` (the hub's API, registry, fleet, rollouts, monitoring, telemetry, ingest, endpoints, tokens,
# audit, webhooks) again with the hub on PostgreSQL (EDGEFLEET_TEST_DB=postgres; tests/pg.py starts a real server).
# With arguments they go to one pytest run, e.g. `./scripts/test.sh -k protocol -x`, on the store
# EDGEFLEET_TEST_DB names (sqlite by default): `EDGEFLEET_TEST_DB=postgres ./scripts/test.sh -n 2 --dist loadfile tests/` is the whole
# suite on PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # the web console's browser tests (Playwright drives it)
# the PostgreSQL store's tests and the second pass run a real server (initdb/pg_ctl, tests/pg.py)
command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)  # the sandbox for operator code (modules/sandbox.py)
command -v faketime >/dev/null 2>&1 || missing+=(faketime)  # a frozen device clock (tests/test_fleet_trust.py)
command -v curl >/dev/null 2>&1 || missing+=(curl)  # a stranger's client (tests/test_tensors_oip.py)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing ${missing[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# two pytest-xdist workers, a test file each at a time (a file's tests share its fixtures): most tests wait on
# processes (agents, hubs, brokers) more than they compute, so two at once nearly halve the time on 2 cores
parallel=(-n 2 --dist loadfile)
status=0
echo "== the whole suite, hub on SQLite" >&2
EDGEFLEET_TEST_DB=sqlite .venv/bin/python -m pytest "${parallel[@]}" || status=$?
echo "== the hub's store tests again, hub on PostgreSQL" >&2
EDGEFLEET_TEST_DB=postgres .venv/bin/python -m pytest "${parallel[@]}" -m hubstore || status=$?
exit $status
