#!/usr/bin/env bash
# Run every test: the compression suite, then the real-vLLM serving suite.
# usage: bash scripts/test.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."

run() {  # pytest exit 5 (nothing collected) is a failure here: a suite must run
  local venv=$1; shift
  "$venv/bin/python" -m pytest "$@"
  local rc=$?
  if [[ $rc -eq 5 ]]; then echo "error: pytest collected no tests in $*" >&2; return 1; fi
  return $rc
}

rc=0
run .venv-compress tests --ignore=tests/serve --ignore=tests/gpu -q -p no:cacheprovider "$@" || rc=1
run .venv-serve tests/serve -q -p no:cacheprovider "$@" || rc=1
exit $rc
