#!/usr/bin/env bash
# Install the SLURM + munge Debian packages the SLURM tests need (tests/slurm_local.py starts the daemons
# itself, by hand, in a scratch directory; nothing here starts a service).
#
#   bash .ci/install_slurm.sh          # idempotent; a no-op when everything is already installed
#
# Packages (SLURM_LOCAL.md Part 1.a): slurmctld slurmd slurm-client munge (+ their dependencies
# slurm-wlm-basic-plugins libmunge2 libhwloc15 liblua5.1-0), Slurm 22.05 / munge 0.5.15 on Debian 12.
# This script never fails the CI: if the packages cannot be installed (no root, no apt, no network),
# it says so and exits 0, and tests/test_slurm.py skips with a clear reason.
set -uo pipefail

PKGS=(slurmctld slurmd slurm-client munge)
BINS=(slurmctld slurmd sbatch srun scontrol squeue munged)
export PATH="$PATH:/usr/sbin:/sbin"

have_all() {
  local b
  for b in "${BINS[@]}"; do command -v "$b" >/dev/null 2>&1 || return 1; done
}

if have_all; then
  echo "install_slurm: SLURM and munge already installed ($(slurmctld -V 2>/dev/null || echo slurmctld))"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: apt-get not found; SLURM tests will be skipped" >&2
  exit 0
fi
SUDO=()
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install_slurm: not root and no passwordless sudo; SLURM tests will be skipped" >&2
    exit 0
  fi
fi

# Package postinst scripts must not try to start services (there is no systemd in CI containers):
# install a policy-rc.d that says "no" for the duration of the install, unless one already exists.
POLICY=/usr/sbin/policy-rc.d
OWN_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null && "${SUDO[@]}" chmod 755 "$POLICY" && OWN_POLICY=1
fi
cleanup() { if [ "$OWN_POLICY" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap cleanup EXIT

APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 -y -q
     --no-install-recommends)
install() { "${APT[@]}" install "${PKGS[@]}"; }
# first try without an update (fast when the lists are fresh), then once more after `apt-get update`
if ! install >/tmp/install_slurm.$$.log 2>&1; then
  "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=120 -q update >>/tmp/install_slurm.$$.log 2>&1 || true
  install >>/tmp/install_slurm.$$.log 2>&1 || true
fi

if have_all; then
  echo "install_slurm: installed $(slurmctld -V 2>/dev/null)"
  rm -f /tmp/install_slurm.$$.log
else
  echo "install_slurm: could not install ${PKGS[*]}; SLURM tests will be skipped. apt output:" >&2
  tail -n 30 /tmp/install_slurm.$$.log >&2
  rm -f /tmp/install_slurm.$$.log
fi
exit 0
