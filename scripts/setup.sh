#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: Debian packages, .venv,
# the Debian-only bindings (bcc, nftables) made importable, and the kernel
# header tree bcc needs. Safe to run again; each step checks before acting.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
DEB_PKGS=(nftables python3-nftables python3-bpfcc bpfcc-tools linux-headers-amd64
          linux-image-amd64 qemu-system-x86 busybox-static conntrack iproute2
          iperf3 socat kmod)

say() { printf 'setup: %s\n' "$*"; }

missing=()
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || { echo "setup: need root to install: ${missing[*]}" >&2; exit 1; }
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's bcc and nftables bindings are pure Python over ctypes: expose just
# those two packages to the venv through a folder of symlinks and a .pth file,
# instead of --system-site-packages (which pyenv's python cannot see anyway).
if [[ ! -x $VENV/bin/python ]]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
debsite=$PWD/$VENV/debian-bindings
mkdir -p "$debsite"
for mod in bcc nftables; do
  ln -sfn "/usr/lib/python3/dist-packages/$mod" "$debsite/$mod"
done
sitepk=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$debsite" > "$sitepk/debian-bindings.pth"

stamp=$VENV/.deps-stamp
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  say "installing Python dependencies"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[dev]'
  touch "$stamp"
fi

# bcc wants one kernel build tree; Debian splits it into -common and -amd64.
# Merge them with symlinks (either alone lacks kconfig.h or autoconf.h).
hdr=$PWD/build/kernel-headers
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)
arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
if [[ -n $common && -n $arch && ! -e $hdr/.done ]]; then
  say "building merged kernel header tree in $hdr"
  rm -rf "$hdr"; mkdir -p "$hdr/arch/x86" "$hdr/include"
  for d in "$common"/include/*; do ln -sfn "$d" "$hdr/include/$(basename "$d")"; done
  for d in "$arch"/include/*; do ln -sfn "$d" "$hdr/include/$(basename "$d")"; done
  mkdir -p "$hdr/arch/x86/include"
  for d in "$common"/arch/x86/include/*; do ln -sfn "$d" "$hdr/arch/x86/include/$(basename "$d")"; done
  for d in "$arch"/arch/x86/include/*; do
    b=$(basename "$d")
    if [[ -d $hdr/arch/x86/include/$b && -d $d ]]; then
      # both trees have e.g. generated/: merge one level deeper
      tgt=$hdr/arch/x86/include/$b; src_common=$(readlink -f "$tgt"); rm "$tgt"; mkdir -p "$tgt"
      for e in "$src_common"/* "$d"/*; do ln -sfn "$e" "$tgt/$(basename "$e")"; done
    else
      ln -sfn "$d" "$hdr/arch/x86/include/$b"
    fi
  done
  for f in Makefile .config Module.symvers scripts; do
    [[ -e $arch/$f ]] && ln -sfn "$arch/$f" "$hdr/$f"
  done
  [[ -e $hdr/Makefile ]] || ln -sfn "$common/Makefile" "$hdr/Makefile"
  for f in "$common"/*; do b=$(basename "$f"); [[ -e $hdr/$b ]] || ln -sfn "$f" "$hdr/$b"; done
  touch "$hdr/.done"
fi
say "ok"
