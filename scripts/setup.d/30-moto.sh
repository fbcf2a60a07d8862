#!/usr/bin/env bash
# Installs moto's KMS server (PyPI `moto[server]`, pinned) into the project-local
# virtualenv .tools/venv, for the KMS signer's tests and benches
# (scripts/moto_kms_server.py runs it). Idempotent: a second run only checks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MOTO_VERSION="${MOTO_VERSION:-5.2.5}"
venv="$root/.tools/venv"
py="$venv/bin/python"

if [ -x "$py" ] && "$py" -c "import moto, werkzeug, flask; assert moto.__version__ == '$MOTO_VERSION'" 2>/dev/null; then
  exit 0
fi

command -v python3 >/dev/null || {
  echo "setup: installing python3 (apt)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >&2
}
if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
  echo "setup: installing python3-venv (apt)" >&2
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
  fi
fi

mkdir -p "$root/.tools"
if [ -e "$venv" ] && ! "$py" -c "import sys" 2>/dev/null; then
  # A venv whose interpreter is gone (python3 moved or upgraded): make it again.
  echo "setup: .tools/venv is broken, recreating it" >&2
  rm -rf "$venv"
fi
if [ ! -x "$py" ]; then
  echo "setup: creating .tools/venv" >&2
  python3 -m venv "$venv"
fi
echo "setup: installing moto[server]==$MOTO_VERSION into .tools/venv" >&2
"$py" -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2
"$py" -c "import moto, werkzeug, flask; assert moto.__version__ == '$MOTO_VERSION', moto.__version__"
