#!/usr/bin/env bash
# Prove the README's quick start on a minimal Debian 12: debootstrap one
# (--variant=minbase bookworm), clone this repository into it, and run the two
# quick-start commands in a chroot, as a new user on a stock system would.
#
#   sudo bash scripts/debian12-chroot.sh [DIR]      (DIR: where to build it; a temporary one by default)
#
# Needs root, debootstrap, and the network to Debian's mirrors and PyPI. The
# chroot shares this machine's kernel, so the tests that need root powers
# (network namespaces, TCP_REPAIR) run as they would on the host. Everything
# mounted is unmounted, and a temporary DIR removed, however it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
[[ $(id -u) -eq 0 ]] || { echo "debian12-chroot.sh: run it as root" >&2; exit 1; }
command -v debootstrap > /dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
}

root=${1:-}
made=""
if [[ -z "$root" ]]; then
    root=$(mktemp -d /var/tmp/ferry-debian12.XXXXXX)
    made=$root
fi
mounts=()
cleanup() {
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[i]}" 2> /dev/null || true; done
    [[ -z "$made" ]] || rm -rf "$made"
}
trap cleanup EXIT

if [[ ! -x "$root/usr/bin/apt-get" ]]; then
    echo "== debootstrap --variant=minbase bookworm $root"
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian > "$root.debootstrap.log" 2>&1 ||
        { tail -20 "$root.debootstrap.log"; exit 1; }
fi
for fs in proc sys dev dev/pts run; do
    mkdir -p "$root/$fs"
    mount --rbind "/$fs" "$root/$fs"
    mount --make-rslave "$root/$fs"  # what is unmounted here stays mounted on the host
    mounts+=("$root/$fs")
done
cp /etc/resolv.conf "$root/etc/resolv.conf"

echo "== git clone into the chroot (git is the README's one prerequisite)"
chroot "$root" /bin/bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq git ca-certificates > /dev/null'
# This site's own trust anchors (a TLS-inspecting proxy in front of PyPI, say),
# as a stock system at the same site would have them.
if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates > /dev/null
fi
rm -rf "$root/root/ferry"
git clone -q "$repo" "$root/root/ferry"

# Not a plain chroot: in a mount namespace of its own, the new root becomes
# the namespace's root (pivot_root), as on a booted system.  A chrooted
# process may not create a user namespace (unshare -Ur), and `ip -n` cannot
# make "/" a slave mount when "/" is no mount at all.
enter() {
    unshare --mount --propagation slave -- /bin/bash -c '
        set -e
        root=$1; shift
        mount --rbind "$root" "$root"
        cd "$root"
        mkdir -p .oldroot
        pivot_root . .oldroot
        umount -l /.oldroot
        exec /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb "$@"
    ' enter "$root" "$@"
}

for command in "bash scripts/demo.sh" "bash scripts/test.sh"; do
    echo "== $command"
    enter /bin/bash -c "cd /root/ferry && $command"
done
echo "== both quick-start commands passed on a minimal Debian 12"
