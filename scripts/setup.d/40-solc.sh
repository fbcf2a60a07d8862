#!/usr/bin/env bash
# Installs the Solidity compiler (npm `solc`, the JavaScript build, pinned) into the
# project-local .tools/node_modules, for scripts/compile-contracts.js and the test that
# checks contracts/build/ against a fresh compile. Idempotent: a second run only checks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SOLC_VERSION="${SOLC_VERSION:-0.8.28}"
tools="$root/.tools"
pkg="$tools/node_modules/solc/package.json"

if [ -f "$pkg" ] && grep -q "\"version\": \"$SOLC_VERSION\"" "$pkg"; then
  exit 0
fi
command -v npm >/dev/null || { echo "setup: npm is required to install solc" >&2; exit 1; }
mkdir -p "$tools"
[ -f "$tools/package.json" ] || echo '{ "name": "engine-tools", "private": true }' > "$tools/package.json"
echo "setup: installing solc $SOLC_VERSION into .tools/" >&2
npm install --prefix "$tools" --no-audit --no-fund --loglevel=error "solc@$SOLC_VERSION" >&2
grep -q "\"version\": \"$SOLC_VERSION\"" "$pkg"
