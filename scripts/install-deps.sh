#!/usr/bin/env bash
# Install what ferry needs on a fresh Debian machine (Debian 12 or later).
#   scripts/install-deps.sh          ferry itself and the NBD client tools the demo uses
#   scripts/install-deps.sh --test   also the test peers, linters, test libraries and atheris
#
# ferry and its Python dependencies go into a virtual environment, .venv in the
# repository (FERRY_VENV to put it elsewhere): Debian's own Twisted, transitions
# and prometheus-client are older than ferry needs, and Debian's Python refuses
# pip into the system (PEP 668). Run ferry as .venv/bin/ferry, or put .venv/bin
# on your PATH (source .venv/bin/activate). Needs root, or sudo, for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FERRY_VENV:-.venv}

# python3-venv: the virtual environment; file: nbdinfo asks it what an export holds;
# nftables: libnftables, with which the connection handoff freezes a client's packets.
debian=(python3 python3-venv file libnbd-bin python3-libnbd nftables)
extras=""
if [[ "${1:-}" == "--test" ]]; then
    debian+=(qemu-utils nbdkit nbd-server prometheus fio curl etcd-server iproute2 systemd procps openssl)
    # xfsprogs: an XFS file system, loop-mounted, where writes go on the event loop (RWF_NOWAIT).
    debian+=(xfsprogs)
    extras="[test,lint,fuzz]"
    # The kernel's NBD client across a handoff, where the nbd module loads.
    debian+=(kmod nbd-client)
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

if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".${extras}"
echo "ferry is installed in $venv: run $venv/bin/ferry, or add $venv/bin to your PATH" >&2
