#!/usr/bin/env bash
# System packages mvlm and its tests need (Debian/Ubuntu). Idempotent: installs only what is missing.
#   cmake, ninja, patch, g++  build the llama.cpp runtime       ccache           speeds up rebuilds
#   openssh-server/-client    the ssh transport (tests run a real sshd on 127.0.0.1)
#   adb                       the adb transport               qemu-user-static runs arm64 builds here
#   gcc/g++-aarch64-linux-gnu cross-compile the arm64 runtime without an NDK
#   postgresql                the tests' private PostgreSQL cluster (shared history; initdb + pg_ctl, no service used)
set -euo pipefail
declare -A need=(
  [cmake]=cmake [ninja]=ninja-build [patch]=patch [g++]=g++ [ccache]=ccache [readelf]=binutils
  [/usr/sbin/sshd]=openssh-server [ssh]=openssh-client [ssh-keygen]=openssh-client [adb]=adb
  [qemu-aarch64-static]=qemu-user-static
  [aarch64-linux-gnu-gcc]=gcc-aarch64-linux-gnu [aarch64-linux-gnu-g++]=g++-aarch64-linux-gnu
)
missing=()
for cmd in "${!need[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "$cmd" ]; then missing+=("${need[$cmd]}"); fi
done
# Debian keeps initdb off PATH, in /usr/lib/postgresql/<major>/bin
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  missing+=(postgresql)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
echo "installing system packages: $pkgs"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "error: missing system packages ($pkgs) and not root: install them with apt-get" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
