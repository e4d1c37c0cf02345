#!/usr/bin/env bash
# Installs LocalStack (its S3 only) natively, without Docker, into a Python
# venv, once: later calls find the finished venv and return at once. Prints
# the venv's path as its last line of output.
#
#   localstack/install.sh            # venv under ~/.cache/pier/ (see below)
#
# Environment:
#   PIER_LOCALSTACK_VENV    where the venv goes
#                           (default ${XDG_CACHE_HOME:-~/.cache}/pier/localstack-VERSION-EXTRA)
#   PIER_LOCALSTACK_PYTHON  the interpreter to make it from (Python >= 3.13);
#                           default: the newest python3.13+ found on PATH or
#                           under pyenv (/root/.pyenv/versions on this image)
set -euo pipefail

# localstack-core 2026.3.0 (and 4.14.0) import `warnings.deprecated` in the
# S3 provider, which Python 3.12 lacks: S3 then answers every request with
# a 500 although the health endpoint says "available". So 3.13 or newer.
LOCALSTACK_VERSION=2026.3.0
# `base-runtime` is all the S3 provider needs. `runtime` adds the other
# services' dependencies (awscli, moto-ext[all], jpype1, opensearch-py,
# pymongo, ...): ~2.5x the install time and ~500 MB instead of ~180 MB, for
# nothing Pier uses. PIER_LOCALSTACK_EXTRA=runtime switches to it.
EXTRA=${PIER_LOCALSTACK_EXTRA:-base-runtime}
# Pins the runtime needs with today's releases of its dependencies.
PINS=('cbor2<6' 'pyopenssl<24.3' 'cryptography<44' 'service-identity')
# What the marker file records: a venv made for another SPEC is made anew.
SPEC="localstack-core[$EXTRA]==$LOCALSTACK_VERSION ${PINS[*]} +service-catalog"

venv=${PIER_LOCALSTACK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pier/localstack-$LOCALSTACK_VERSION-$EXTRA}
marker=$venv/.pier-installed

if [[ -f $marker && $(cat "$marker") == "$SPEC" && -x $venv/bin/python ]]; then
	echo "$venv"
	exit 0
fi

python_ok() { # PATH-or-file: Python >= 3.13 with the venv module
	"$1" -c 'import sys, venv; sys.exit(sys.version_info < (3, 13))' >/dev/null 2>&1
}

find_python() {
	if [[ -n ${PIER_LOCALSTACK_PYTHON:-} ]]; then
		if python_ok "$PIER_LOCALSTACK_PYTHON"; then
			echo "$PIER_LOCALSTACK_PYTHON"
			return 0
		fi
		echo "PIER_LOCALSTACK_PYTHON=$PIER_LOCALSTACK_PYTHON is not a Python >= 3.13 with venv" >&2
		return 1
	fi
	local candidates=() c
	for c in python3.14 python3.13; do
		command -v "$c" >/dev/null 2>&1 && candidates+=("$(command -v "$c")")
	done
	local roots=("${PYENV_ROOT:-$HOME/.pyenv}" /root/.pyenv) r versions
	shopt -s nullglob
	for r in "${roots[@]}"; do
		versions=("$r"/versions/3.1[3-9]*)
		((${#versions[@]})) || continue
		# Newest first: 3.14.x before 3.13.x.
		while IFS= read -r c; do
			candidates+=("$c/bin/python")
		done < <(printf '%s\n' "${versions[@]}" | sort -rV)
	done
	shopt -u nullglob
	for c in "${candidates[@]}"; do
		if python_ok "$c"; then
			echo "$c"
			return 0
		fi
	done
	return 1
}

if ! python=$(find_python); then
	cat >&2 <<EOF
localstack/install.sh: no Python >= 3.13 found (LocalStack $LOCALSTACK_VERSION needs it).
Looked for python3.13/python3.14 on PATH and under \$PYENV_ROOT/versions and
/root/.pyenv/versions. Install one (e.g. \`pyenv install 3.13\`) or point
PIER_LOCALSTACK_PYTHON at it.
EOF
	exit 1
fi

echo "installing LocalStack $LOCALSTACK_VERSION [$EXTRA] with $("$python" -V 2>&1) into $venv" >&2
started=$SECONDS
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
	"localstack-core[$EXTRA]==$LOCALSTACK_VERSION" "${PINS[@]}" >&2
# Fails here, not at the first S3 request, if the runtime cannot load.
"$venv/bin/python" -c 'import localstack.aws.components, localstack.services.s3.provider' >&2
# On its first request LocalStack indexes every AWS service's API (~10 s);
# its Docker image ships that index prebuilt in its static-libs directory.
# Build it once here; start.sh links it into each instance's directories.
mkdir -p "$venv/static-libs"
"$venv/bin/python" - "$venv/static-libs" >&2 <<'PY'
import os, sys
from localstack.aws.spec import _get_catalog_filename, build_service_index_cache
build_service_index_cache(os.path.join(sys.argv[1], _get_catalog_filename()))
PY
echo "$SPEC" >"$marker"
echo "LocalStack installed in $((SECONDS - started)) s" >&2
echo "$venv"
