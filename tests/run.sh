#!/usr/bin/env bash
# Pier's test command: installs the servers and clients the tests use, builds
# the upstream fixtures, and runs the whole suite. Extra arguments go to
# `cargo nextest run` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash tests/setup.sh
export PIER_TEST_STRICT=1
export PIER_FIXTURES=${PIER_FIXTURES:-$PWD/target/pier-fixtures}
bash tests/fixtures/build.sh "$PIER_FIXTURES"

# Shared backends (Redis, an S3 server) and LocalStack's S3 on loopback,
# stopped on exit.
backends=$(mktemp -d /tmp/pier-backends.XXXXXX)
trap 'bash tests/localstack.sh stop "$backends"; bash tests/backends.sh stop "$backends"; rm -rf "$backends"' EXIT
backends_env=$(bash tests/backends.sh start "$backends")
eval "$backends_env"
localstack_env=$(bash tests/localstack.sh start "$backends")
eval "$localstack_env"

if cargo nextest --version >/dev/null 2>&1; then
	cargo nextest run --no-fail-fast "$@"
else
	cargo test --no-fail-fast "$@"
fi
