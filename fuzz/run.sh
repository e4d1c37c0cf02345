#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS seconds each (default 60), one
# after the other, and prints each target's final libFuzzer stats line.
#
#   fuzz/run.sh [SECONDS] [extra cargo-fuzz flags, e.g. -s none]
#
# Installs cargo-fuzz if it is missing. The toolchain is stable:
# RUSTC_BOOTSTRAP=1 lets it accept the nightly flags cargo-fuzz passes.
# Corpora and crash artifacts stay in fuzz/corpus and fuzz/artifacts
# (git-ignored).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

seconds=${1:-60}
shift || true
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
	cargo install cargo-fuzz --locked
fi

cargo fuzz build "$@"
mkdir -p logs
for target in $(cargo fuzz list); do
	echo "== $target: ${seconds}s"
	start=$(date +%s)
	cargo fuzz run "$@" "$target" -- -max_total_time="$seconds" -print_final_stats=1 \
		>"logs/$target.log" 2>&1 || {
		echo "$target FAILED after $(($(date +%s) - start))s; see fuzz/logs/$target.log"
		tail -n 30 "logs/$target.log"
		exit 1
	}
	echo "   ran $(($(date +%s) - start))s wall; $(grep -E '^stat::number_of_executed_units' "logs/$target.log" | tail -n 1)"
done
