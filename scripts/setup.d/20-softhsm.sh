#!/usr/bin/env bash
# Installs SoftHSM2 (Debian `softhsm2`), the PKCS#11 token the HSM signer's tests and
# benches run against (signers feature `hsm`). Everything else - token initialisation, PINs,
# key generation - is done through PKCS#11 (the `cryptoki` crate) by the tests themselves,
# in a temporary token directory, so no global token state is created here.
# Idempotent: when the module is present a second run only checks.
set -euo pipefail

module=/usr/lib/softhsm/libsofthsm2.so

if [ ! -f "$module" ]; then
  echo "setup: installing softhsm2 (apt) for the HSM signer" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends softhsm2 >&2; then
    apt-get update >&2
    apt-get install -y --no-install-recommends softhsm2 >&2
  fi
fi

[ -f "$module" ] || {
  echo "setup: $module is still missing after installing softhsm2 (dpkg -L softhsm2)" >&2
  exit 1
}
