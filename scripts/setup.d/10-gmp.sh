#!/usr/bin/env bash
# Build tools for GMP, which the threshold ECDSA backend (signers feature `mpc`: cggmp21 ->
# paillier-zk -> rug -> gmp-mpfr-sys) compiles from source inside its build script:
# m4 (GMP's assembler macros), a C compiler, make and diffutils. Idempotent: when all are
# present a second run only checks.
set -euo pipefail

missing=()
command -v m4 >/dev/null 2>&1 || missing+=(m4)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v cmp >/dev/null 2>&1 || missing+=(diffutils)

if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]} (GMP build for the mpc signer)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
    apt-get update >&2
    apt-get install -y --no-install-recommends "${missing[@]}" >&2
  fi
fi

for tool in m4 cc make cmp; do
  command -v "$tool" >/dev/null 2>&1 || { echo "setup: $tool is still missing after install" >&2; exit 1; }
done
