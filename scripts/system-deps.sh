#!/usr/bin/env bash
# Install the Debian packages the slow QEMU tests need (tests/test_qemu_real.py):
# QEMU for x86-64, a Debian 6.1 cloud kernel to boot, busybox-static for the
# initramfs and cpio; tmux for the REPL's real-terminal test (tests/test_repl_tmux.py).
# Idempotent: when everything is present it only runs dpkg-query.
# apt keeps downloaded .deb files in /var/cache/apt/archives, so a reinstall on the
# same machine does not download them again.
set -euo pipefail

PACKAGES=(qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio tmux)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "installed" ]; then
        missing+=("$pkg")
    fi
done
if ! compgen -G '/boot/vmlinuz-6.1.*-cloud-amd64' >/dev/null; then
    missing+=(linux-image-cloud-amd64)
fi

if [ "${#missing[@]}" -eq 0 ]; then
    echo "system-deps: all present (${PACKAGES[*]})"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: missing ${missing[*]} and not root: cannot install" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
# The kernel's postinst would build an initramfs we never use (the tests bring their own).
export INITRD=No
# Keep the .deb files so the next install on this machine needs no download.
apt_opts=(-o APT::Keep-Downloaded-Packages=true -o Dpkg::Use-Pty=0)

echo "system-deps: installing ${missing[*]}"
apt-get "${apt_opts[@]}" update -qq
apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${missing[@]}"

if ! compgen -G '/boot/vmlinuz-6.1.*-cloud-amd64' >/dev/null; then
    echo "system-deps: no /boot/vmlinuz-6.1.*-cloud-amd64 after installing" >&2
    exit 1
fi
echo "system-deps: done"
