#!/usr/bin/env bash
# Install what kvmnet needs on a fresh Debian machine, idempotently: Debian packages, then a venv with the project.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run on its own.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Debian packages: QEMU and the tiny guest's parts, iproute2 (the witness), the peers we benchmark against,
# Prometheus/promtool for rules and dashboards, and systemd-analyze for the unit files. libvirt (libvirtd, virsh,
# dnsmasq and iptables for its NAT networks) for the tests that run a real libvirtd inside a namespace: the
# policy-rc.d below keeps apt from starting it (or its default network) on the host.
pkgs=(qemu-system-x86 qemu-utils busybox-static iproute2 iputils-ping cpio kmod xz-utils zstd nftables ethtool
      procps fping prometheus prometheus-node-exporter prometheus-smokeping-prober systemd openssl curl
      libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients dnsmasq-base iptables)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d: Debian's prometheus and libvirt packages would otherwise try to start their services.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.kvmnet-installed"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  echo "bootstrap: installing kvmnet into $venv"
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  "$venv/bin/pip" install -q -e "$here[test]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
