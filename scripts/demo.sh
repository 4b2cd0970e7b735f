#!/usr/bin/env bash
# The seed article's Bridge-mode lab with two QEMU guests, and the exporter serving its metrics.
#   scripts/demo.sh         bring the lab up and serve http://127.0.0.1:9848/metrics until Ctrl-C, then tear down
#   scripts/demo.sh down    tear the lab down (if a previous demo was killed)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$here/scripts/bootstrap.sh"
lab="$here/examples/seed-lab.yaml"
if [ "${1:-}" = down ]; then exec kvmnet-setup down -c "$lab"; fi
kvmnet-setup up -c "$lab"
trap 'echo; kvmnet-setup down -c "$lab"' EXIT
kvmnet-setup status -c "$lab"
echo "demo: try 'ip netns exec seed-lan ping 192.168.98.11' and 'curl -s 127.0.0.1:9848/metrics | grep kvmnet_'"
kvmnet-exporter --netns seed-host --lab "$lab" --web.listen-address 127.0.0.1:9848
