#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets/) for SECONDS (default 20) on nightly,
# from the checked-in corpus (fuzz/corpus/<target>, read only) plus what earlier runs found
# (fuzz/target/corpus/<target>, where new inputs go). A crash stops the run and leaves its
# input in fuzz/artifacts/<target>/; each one becomes a regression test.
#   ./scripts/fuzz.sh          the short run of ./x test (3 targets x 20 s)
#   ./scripts/fuzz.sh 3600     the long run (an hour per target)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds="${1:-20}"
tools="$PWD/.tools/cargo-fuzz"
if ! [ -x "$tools/bin/cargo-fuzz" ]; then
  echo "fuzz: installing cargo-fuzz 0.13.1 into .tools/cargo-fuzz"
  cargo install --quiet --locked --root "$tools" cargo-fuzz --version 0.13.1
fi
export PATH="$tools/bin:$PATH"
cd fuzz
for t in desk_frame deposit_data policy_file; do
  mkdir -p "target/corpus/$t"
  echo "fuzz: $t for ${seconds} s"
  cargo +nightly fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -max_len=16384 -print_final_stats=1 2>&1 | tail -n 12
done
