#!/usr/bin/env bash
# Install a one-node SLURM test cluster's packages (Debian/Ubuntu, run as root).
#
# Idempotent: packages already installed are left alone, and nothing touches the network when
# every package is present. Next step: slurm/local/start.sh
set -euo pipefail

PACKAGES=(munge slurmctld slurmd slurm-client)

say() { printf '[slurm/local/install] %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    say "must run as root (it installs packages with apt-get)." >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "apt-get not found: this script supports Debian/Ubuntu only; install ${PACKAGES[*]} by hand." >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        say "$pkg: already installed ($(dpkg-query -W -f='${Version}' "$pkg"))"
    else
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    say "nothing to install."
    exit 0
fi

say "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "${missing[@]}"
say "done; now run slurm/local/start.sh"
