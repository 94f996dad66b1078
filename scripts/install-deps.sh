#!/usr/bin/env bash
# Install what ferry needs on a fresh Debian machine.
#   scripts/install-deps.sh          ferry itself and the NBD client tools the demo uses
#   scripts/install-deps.sh --test   also the test peers, linters and test libraries
set -euo pipefail
cd "$(dirname "$0")/.."

debian=(libnbd-bin python3-libnbd)
extras=""
if [[ "${1:-}" == "--test" ]]; then
    debian+=(qemu-utils nbdkit nbd-server prometheus fio curl etcd-server openssl)
    extras="[test,lint]"
fi

missing=()
for pkg in "${debian[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q --disable-pip-version-check -e ".${extras}"
