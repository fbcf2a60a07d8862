#!/usr/bin/env bash
# Installs the tools the engine and its tests start by themselves, into the
# project-local folder .tools/ (nothing global): Foundry's anvil and cast from
# the npm registry at a pinned version. Idempotent: a second run does nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FOUNDRY_VERSION="${FOUNDRY_VERSION:-1.7.1}"
tools="$root/.tools"
anvil="$tools/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
cast="$tools/node_modules/@foundry-rs/cast-linux-amd64/bin/cast"

need_foundry=0
if [ ! -x "$anvil" ] || [ ! -x "$cast" ]; then
  need_foundry=1
elif ! "$anvil" --version 2>/dev/null | grep -q "$FOUNDRY_VERSION"; then
  need_foundry=1
fi

if [ "$need_foundry" = 1 ]; then
  command -v npm >/dev/null || { echo "setup: npm is required to install anvil" >&2; exit 1; }
  mkdir -p "$tools"
  [ -f "$tools/package.json" ] || echo '{ "name": "engine-tools", "private": true }' > "$tools/package.json"
  echo "setup: installing anvil and cast $FOUNDRY_VERSION into .tools/" >&2
  npm install --prefix "$tools" --no-audit --no-fund --loglevel=error \
    "@foundry-rs/anvil-linux-amd64@$FOUNDRY_VERSION" "@foundry-rs/cast-linux-amd64@$FOUNDRY_VERSION" >&2
fi
"$anvil" --version >/dev/null

# Further components (SoftHSM2, moto, GMP's m4, …): each has its own idempotent script.
for part in "$root"/scripts/setup.d/*.sh; do
  [ -e "$part" ] || continue
  bash "$part"
done
