#!/usr/bin/env bash
# Stops a LocalStack started with `localstack/start.sh --background`, by the
# PID in DATA_DIR/localstack.pid: SIGTERM (it shuts down cleanly in about a
# second), SIGKILL after 15 s. Does nothing when it is not running.
#
#   localstack/stop.sh [DATA_DIR]    # default ${TMPDIR:-/tmp}/pier-localstack
set -euo pipefail

data=${1:-${TMPDIR:-/tmp}/pier-localstack}
pidfile=$data/localstack.pid
[[ -f $pidfile ]] || exit 0
pid=$(cat "$pidfile")
# Only our LocalStack: a stale file may name a PID that was reused since.
if [[ $pid =~ ^[0-9]+$ ]] && grep -qa "launch.py" "/proc/$pid/cmdline" 2>/dev/null; then
	kill "$pid" 2>/dev/null || true
	for _ in $(seq 1 150); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		echo "localstack/stop.sh: PID $pid ignored SIGTERM; killing it" >&2
		kill -9 "$pid" 2>/dev/null || true
	fi
fi
rm -f "$pidfile"
