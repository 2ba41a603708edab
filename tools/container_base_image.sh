#!/usr/bin/env bash
# Make the Python base image the Dockerfile builds on (--build-arg PYTHON_IMAGE=…) without a
# public image registry: a minimal Debian bookworm with python3 made by debootstrap, saved as a
# tarball that `podman import` turns into an image. Built once per machine into a cache folder
# (like the llama wheel in .ci/run); printing the tarball's path is all this script does when the
# cache already holds it.
#
#   tools/container_base_image.sh            # prints the tarball's path (builds it if missing)
#
# Needs root (debootstrap, chroot) and Debian's debootstrap. About 40 s and 150 MB the first time.
set -euo pipefail

cache="${XDG_CACHE_HOME:-$HOME/.cache}/mf-worker/images"
tarball="$cache/debian-python-3.11-bookworm.tar"
if [ -s "$tarball" ]; then
    echo "$tarball"
    exit 0
fi

mkdir -p "$cache"
rootfs="$(mktemp -d "$cache/rootfs.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT
echo "container base image: debootstrap bookworm into $rootfs (once per machine)" >&2
# The default mirror is the one apt on this machine already uses.
debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" >&2
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
# The image's pip installs into the system Python, as the official python images allow.
rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
# The machine's own CA certificates (a TLS-inspecting proxy's, if any), so pip in the build
# trusts the package index the host trusts.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >&2
fi
tar -C "$rootfs" -cf "$tarball.tmp" .
mv "$tarball.tmp" "$tarball"
echo "$tarball"
