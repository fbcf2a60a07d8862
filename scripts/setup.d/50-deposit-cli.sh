#!/usr/bin/env bash
# Installs the staking deposit CLI (PyPI `ethstaker-deposit`, pinned) into the project-local
# virtualenv .tools/venv, for the staking module's deposit-data tests
# (engine/tests/deposit_cli.rs runs .tools/venv/bin/deposit).
#
# The PyPI release ships no console script, no BIP-39 word lists and no English texts (its
# intl/*.json), and it looks both data sets up relative to the working directory, so
# `python -m ethstaker_deposit` fails on import wherever it is run. This script therefore also
# installs `mnemonic` (pinned; it ships the same BIP-39 word lists) and writes the launcher
# .tools/venv/bin/deposit, which points the word-list look-up at those lists and lets a missing
# text fall back to its key. Key derivation, keystores and deposit data are the package's own.
# Idempotent: a second run only checks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEPOSIT_CLI_VERSION="${DEPOSIT_CLI_VERSION:-1.3.1}"
MNEMONIC_VERSION="${MNEMONIC_VERSION:-0.21}"
venv="$root/.tools/venv"
py="$venv/bin/python"
launcher="$venv/bin/deposit"

launcher_text() {
  cat <<EOF
#!$py
"""Runs the staking deposit CLI (PyPI ethstaker-deposit $DEPOSIT_CLI_VERSION).

Written by scripts/setup.d/50-deposit-cli.sh. The PyPI release lacks its BIP-39 word lists and
its English texts; this launcher takes the word lists from the mnemonic package and shows the
key of any missing text instead of failing. Everything else is the package's own code.
"""
import os
import sys

import mnemonic
from ethstaker_deposit.utils import file_handling

_WORD_LISTS = os.path.join("ethstaker_deposit", "key_handling", "key_derivation", "word_lists")
_MNEMONIC_LISTS = os.path.join(os.path.dirname(mnemonic.__file__), "wordlist")
_resource_path = file_handling.resource_path


def resource_path(relative_path):
    path = _resource_path(relative_path)
    if os.path.normpath(relative_path) == _WORD_LISTS and not os.path.isdir(path):
        return _MNEMONIC_LISTS
    return path


# Patched before the modules that import the name are loaded.
file_handling.resource_path = resource_path

from ethstaker_deposit.utils import intl  # noqa: E402

_load_text = intl.load_text
_DEFAULTS = {("arg_mnemonic_language", "default"): "english"}


def load_text(params, file_path="", func="", lang=""):
    caller = sys._getframe(1).f_code
    try:
        return _load_text(
            params,
            file_path=file_path or caller.co_filename,
            func=func or caller.co_name,
            lang=lang,
        )
    except KeyError:
        return _DEFAULTS.get(tuple(params), " ".join(params).replace("_", " "))


intl.load_text = load_text

from ethstaker_deposit import deposit  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = "deposit"
    deposit.run()
EOF
}

check() {
  [ -x "$py" ] && [ -x "$launcher" ] \
    && [ "$(cat "$launcher")" = "$(launcher_text)" ] \
    && "$py" -c "
from importlib.metadata import version
assert version('ethstaker-deposit') == '$DEPOSIT_CLI_VERSION', version('ethstaker-deposit')
assert version('mnemonic') == '$MNEMONIC_VERSION', version('mnemonic')
" 2>/dev/null \
    && "$launcher" --non_interactive --version 2>/dev/null | grep -q "$DEPOSIT_CLI_VERSION"
}

if check; then
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
echo "setup: installing ethstaker-deposit==$DEPOSIT_CLI_VERSION into .tools/venv" >&2
"$py" -m pip install --quiet --disable-pip-version-check \
  "ethstaker-deposit==$DEPOSIT_CLI_VERSION" "mnemonic==$MNEMONIC_VERSION" >&2
launcher_text >"$launcher.tmp"
chmod 0755 "$launcher.tmp"
mv "$launcher.tmp" "$launcher"
check || {
  echo "setup: $launcher does not run after installing ethstaker-deposit==$DEPOSIT_CLI_VERSION" >&2
  "$launcher" --non_interactive --version >&2 || true
  exit 1
}
