#!/usr/bin/env bash
# make package-check: the built .deb installs, runs, verifies, is lintian-clean
# and purges without a trace. Needs root (it installs the package on this
# machine); run after `make deb`.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=$(/usr/bin/python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
DEB=./build/offloadctl_${VERSION}_$(dpkg --print-architecture).deb
UNITS=(/lib/systemd/system/offloadctl.service /lib/systemd/system/offloadctl@.service)
LEFT=(/opt/offloadctl /usr/bin/offloadctl /etc/offloadctl /var/lib/offloadctl "${UNITS[@]}"
      /usr/share/man/man8/offloadctl.8.gz /usr/share/bash-completion/completions/offloadctl
      /usr/share/doc/offloadctl)
export DEBIAN_FRONTEND=noninteractive
OC=/usr/bin/offloadctl   # the installed one, whatever else PATH holds

say() { printf 'package-check: %s\n' "$*"; }
fail() { printf 'package-check: FAILED: %s\n' "$*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || fail "needs root (installs the package)"
[[ -f $DEB ]] || fail "$DEB missing: run make deb"
for tool in lintian systemd-analyze man; do  # packaging/debian-packages.txt: make setup
  command -v "$tool" >/dev/null || fail "$tool missing: run make setup"
done
# Another apt or dpkg on the machine: wait for its lock rather than fail.
aptget() { apt-get -o DPkg::Lock::Timeout=300 "$@"; }

say "lintian $DEB"
lint_rc=0
lint=$(lintian --fail-on error "$DEB" 2>&1) || lint_rc=$?
grep -v 'running with root privileges' <<<"$lint" || true
((lint_rc == 0)) || fail "lintian reports errors"

say "apt-get install $DEB"
aptget install -y -qq "$DEB" >/dev/null
mapfile -t owned < <(dpkg -L offloadctl)

got=$(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin offloadctl --version)
[[ $got == "offloadctl $VERSION" ]] || fail "offloadctl --version said: $got"
say "$got ($(readlink -f /usr/bin/offloadctl))"
/opt/offloadctl/bin/python3 -c 'import nftables, bcc' || fail "Debian's bindings not reachable"
[[ $(readlink -f /opt/offloadctl/bin/python3) == /usr/bin/python3* ]] || fail "venv not on Debian's python"
$OC validate /etc/offloadctl/agent.yaml >/dev/null || fail "the default config does not validate"
for ex in /usr/share/doc/offloadctl/examples/*.yaml; do
  $OC validate "$ex" >/dev/null || fail "$ex does not validate"
done
man -w offloadctl >/dev/null || fail "man offloadctl: no page"
words=$(bash -c 'source /usr/share/bash-completion/completions/offloadctl
  COMP_WORDS=(offloadctl flows te); COMP_CWORD=2; _offloadctl; echo "${COMPREPLY[*]}"')
[[ $words == teardown ]] || fail "bash completion of 'offloadctl flows te' gave '$words'"
[[ $(dpkg-query -W -f='${Conffiles}' offloadctl) == *" /etc/offloadctl/agent.yaml "* ]] \
  || fail "/etc/offloadctl/agent.yaml is not a conffile"

# The installed code against the kernel, in a throwaway namespace: an apply
# through Debian's nftables binding, and a reuseport group compiled by Debian's
# bcc from the packaged BPF C. (This host has no /lib/modules/*/build: the
# merged header tree of make setup stands in for a linux-headers package.)
ns=offloadctl-pkgcheck-$$
bpffs=$(mktemp -d /tmp/offloadctl-pkgcheck-bpffs.XXXXXX)
cleanup() {  # also after a failed load, which can leave its bpffs mounted
  ip netns del "$ns" 2>/dev/null || true
  mountpoint -q "$bpffs" && umount "$bpffs"
  rmdir "$bpffs" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$ns"
printf 'version: 1\n' | $OC apply - --netns "$ns" >/dev/null || fail "apply in $ns"
ip netns exec "$ns" nft list table inet offloadctl >/dev/null || fail "apply left no table"
printf 'version: 1\n' | $OC flush - --netns "$ns" >/dev/null || fail "flush in $ns"
export BCC_KERNEL_SOURCE=${BCC_KERNEL_SOURCE:-$PWD/build/kernel-headers}
$OC reuseport load --name pkgcheck --netns "$ns" --bpffs "$bpffs" >/dev/null \
  || fail "reuseport load (packaged BPF C + Debian's bcc)"
$OC reuseport unload --name pkgcheck --netns "$ns" --bpffs "$bpffs" >/dev/null \
  || fail "reuseport unload"
cleanup
say "apply, flush, reuseport load/unload in a namespace: ok"

say "systemd-analyze verify ${UNITS[*]}"
out=$(systemd-analyze verify offloadctl.service offloadctl@pkgcheck.service 2>&1) \
  || fail "systemd-analyze verify: $out"
[[ -z $out ]] || fail "systemd-analyze verify warned: $out"

# An operator's enablement links must not outlive a purge either.
systemctl enable offloadctl.service offloadctl@pkgcheck.service >/dev/null 2>&1
say "apt-get purge offloadctl"
aptget purge -y -qq offloadctl >/dev/null
st=$(dpkg-query -W -f='${db:Status-Status}' offloadctl 2>/dev/null || true)
[[ -z $st || $st == not-installed ]] || fail "dpkg still has offloadctl: $st"
for p in "${LEFT[@]}" "${owned[@]}"; do
  [[ $p == / || $p == /. || -d $p && $p != *offloadctl* ]] && continue
  [[ -e $p || -L $p ]] && fail "left behind: $p"
done
links=$(find /etc/systemd/system -name 'offloadctl*' 2>/dev/null)
[[ -z $links ]] || fail "enablement links left: $links"
say "ok"
