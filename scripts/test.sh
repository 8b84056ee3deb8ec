#!/usr/bin/env bash
# Install what the test suite needs (mosquitto, a venv with edgefleet[test]) and run it.
# Extra arguments go to pytest, e.g. `./scripts/test.sh -k protocol -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # the web console's browser tests (Playwright drives it)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)  # the sandbox for operator code (modules/sandbox.py)
command -v faketime >/dev/null 2>&1 || missing+=(faketime)  # a frozen device clock (tests/test_fleet_trust.py)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing ${missing[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest "$@"
