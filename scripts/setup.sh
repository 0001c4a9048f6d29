#!/usr/bin/env bash
# Installs what mvm and its tests need on Debian/Ubuntu: the host tools (apt) and the
# Python package into ./.venv. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils   # the hypervisor (KVM or TCG) and qemu-img
  qemu-system-arm              # aarch64 guests (qemu-system-aarch64 -M virt)
  qemu-user-static binfmt-support arch-test   # building a guest of the other architecture (arm64 packages run under qemu-user)
  mmdebstrap                   # builds Debian root filesystems for mvm.toml guests
  e2fsprogs                    # mkfs.ext4 -d, resize2fs, e2fsck, debugfs
  busybox-static               # the initrd's userland
  kmod lz4 zstd                # depmod, and unpacking the Debian kernel
  dpkg apt                     # apt-get download of the kernel package
  nix-bin                      # the Nix front end (mkGuest flakes), offline
  patchelf git                 # the Nix tests' nixpkgs stand-in wraps host programs; flakes are git trees
  qemu-system-common           # virtiofsd: mvmctl dev shares the project with its dev VM
  skopeo umoci                 # the KubeVirt export's tests read its OCI layout with standard tools
  curl ca-certificates python3-venv
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# Guests of the other architecture take their kernel and busybox from apt: let it fetch them.
case "$(uname -m)" in
  x86_64) FOREIGN_DEB=arm64; FOREIGN_QEMU=qemu-aarch64 ;;
  aarch64|arm64) FOREIGN_DEB=amd64; FOREIGN_QEMU=qemu-x86_64 ;;
  *) FOREIGN_DEB=""; FOREIGN_QEMU="" ;;
esac
if [ -n "$FOREIGN_DEB" ] && ! dpkg --print-foreign-architectures | grep -qx "$FOREIGN_DEB"; then
  echo "setup: dpkg --add-architecture $FOREIGN_DEB"
  $SUDO dpkg --add-architecture "$FOREIGN_DEB"
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# apt-get download (the guest kernel) needs fresh package lists even when nothing is missing.
$SUDO apt-get update -q >/dev/null
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# The kernel runs the other architecture's programs through qemu-user once this handler is
# registered. Nothing registers it without systemd, and a reboot drops it: done on every run.
if [ -n "$FOREIGN_QEMU" ] && ! head -n1 "/proc/sys/fs/binfmt_misc/$FOREIGN_QEMU" 2>/dev/null | grep -qx enabled; then
  if [ -e "/proc/sys/fs/binfmt_misc/$FOREIGN_QEMU" ]; then  # registered, but disabled
    echo "setup: enabling $FOREIGN_QEMU"
    $SUDO sh -c "echo 1 > /proc/sys/fs/binfmt_misc/$FOREIGN_QEMU" || true
  elif [ -f "/usr/lib/binfmt.d/$FOREIGN_QEMU.conf" ]; then  # Debian 13: the register line, for systemd-binfmt
    echo "setup: registering /usr/lib/binfmt.d/$FOREIGN_QEMU.conf"
    $SUDO sh -c "grep -v '^[#;]' /usr/lib/binfmt.d/$FOREIGN_QEMU.conf > /proc/sys/fs/binfmt_misc/register" || true
  else
    echo "setup: update-binfmts --enable $FOREIGN_QEMU"
    $SUDO update-binfmts --enable "$FOREIGN_QEMU" || true
  fi
  head -n1 "/proc/sys/fs/binfmt_misc/$FOREIGN_QEMU" 2>/dev/null | grep -qx enabled ||
    echo "setup: could not register $FOREIGN_QEMU (guests of the other architecture will not build; see mvmctl doctor)"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# An editable install leaves mvm's own modules uncompiled; where PYTHONDONTWRITEBYTECODE is set
# (as on our CI machines) every mvmctl would compile ~50 of them again (~40 ms a command).
.venv/bin/python -m compileall -q src/mvm >/dev/null
# The oldest Typer (and its click) that pyproject.toml allows, beside the newest in .venv:
# tests/e2e/test_cli_usage.py runs the CLI's usage errors under both.
if [ ! -d .venv/compat/typer-oldest/typer ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target .venv/compat/typer-oldest \
    'typer==0.12.5' 'click==8.1.7'
fi
echo "setup: ready ($(.venv/bin/mvmctl --version 2>/dev/null || echo mvmctl installed))"
