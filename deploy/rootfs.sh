#!/usr/bin/env bash
# Assembles the root filesystem of Pier's container image from a built
# `pier` binary, for deploy/Dockerfile:
#
#   deploy/rootfs.sh target/release/pier target/pier-image
#
# OUT/root becomes / of the image (owned by root): the binary, the shared
# libraries it links and their loader, CA certificates, and a passwd/group
# naming the unprivileged user. OUT/home becomes /var/lib/pier, owned by
# that user (uid and gid 10001): the working directory, the default data
# directory and the spool/local-cache mount point. Nothing else: no shell,
# no package manager.
set -euo pipefail

bin=${1:?usage: rootfs.sh PIER_BINARY OUT_DIR}
out=${2:?usage: rootfs.sh PIER_BINARY OUT_DIR}
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

[[ -x $bin ]] || { echo "rootfs.sh: $bin is not an executable" >&2; exit 1; }
[[ -f $ca ]] || { echo "rootfs.sh: no CA bundle at $ca (install ca-certificates)" >&2; exit 1; }

rm -rf "$out"
root=$out/root
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp" "$root/etc/pier" "$out/home/data" "$out/home/local"
chmod 1777 "$root/tmp"
install -m 0755 "$bin" "$root/usr/local/bin/pier"
cp "$ca" "$root/etc/ssl/certs/ca-certificates.crt"

# The dynamic loader and every library the binary links, at the paths the
# binary will ask for them by.
ldd "$bin" | awk '
	/=> \// { print $3; next }
	/^[[:space:]]*\// { print $1 }
' | while read -r lib; do
	mkdir -p "$root$(dirname "$lib")"
	cp -L "$lib" "$root$lib"
done
loader=$(ldd "$bin" | awk '/^[[:space:]]*\// { print $1 }')
[[ -n $loader && -f $root$loader ]] || { echo "rootfs.sh: no dynamic loader found for $bin" >&2; exit 1; }

cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
pier:x:10001:10001:pier:/var/lib/pier:/sbin/nologin
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
pier:x:10001:
GROUP

echo "rootfs.sh: $(du -sh "$out" | cut -f1) in $out ($(find "$root" -type f | wc -l) files)"
