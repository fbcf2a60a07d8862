#!/usr/bin/env bash
# Installs Debian's `chromium` (headless browser) and, when the machine has no font, DejaVu,
# for the live dashboard's test (benches/tests/dashboard.rs opens GET /dashboard in
# /usr/bin/chromium over the DevTools protocol and takes a screenshot). Idempotent: when
# both are present a second run only checks.
set -euo pipefail

browser=/usr/bin/chromium
font=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf

missing=()
[ -x "$browser" ] || missing+=(chromium)
[ -f "$font" ] || missing+=(fonts-dejavu-core)

if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]} (apt) for the dashboard test" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
    apt-get update >&2
    apt-get install -y --no-install-recommends "${missing[@]}" >&2
  fi
fi

[ -x "$browser" ] || {
  echo "setup: $browser is still missing after installing chromium (dpkg -L chromium)" >&2
  exit 1
}
"$browser" --version >/dev/null 2>&1 || {
  echo "setup: $browser does not start ($browser --version)" >&2
  exit 1
}
