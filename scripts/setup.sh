#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: the Debian packages of
# packaging/debian-packages.txt, .venv holding exactly uv.lock, the Debian-only
# bindings (bcc, nftables) made importable, and the kernel header tree bcc
# needs. Safe to run again; each step checks before acting.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
UV=$VENV/bin/uv
DEB_LIST=packaging/debian-packages.txt
UV_PIN=packaging/uv-requirements.txt
# uv must neither fetch a Python of its own nor resolve anything: it installs uv.lock as it is.
export UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

# Debian packages: name each missing one (and each version that differs from the tested one)
# here, instead of letting a test fail later on a missing binding or binary.
deb_status() { # prints "missing" or the installed version
  local st
  st=$(dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null) || st=
  [[ $st == "install ok installed "* ]] && echo "${st##* }" || echo missing
}
declare -A tested=()
while read -r pkg ver _; do
  [[ -z $pkg || $pkg == \#* ]] || tested[$pkg]=$ver
done <"$DEB_LIST"
missing=()
for p in $(printf '%s\n' "${!tested[@]}" | sort); do
  v=$(deb_status "$p")
  if [[ $v == missing ]]; then
    missing+=("$p")
    say "missing Debian package $p (tested with ${tested[$p]})"
  elif [[ $v != "${tested[$p]}" ]]; then
    say "note: Debian package $p is $v here, tested with ${tested[$p]} ($DEB_LIST)"
  fi
done
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || die "need root to run: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get could not install: ${missing[*]}"
  for p in "${missing[@]}"; do
    v=$(deb_status "$p")
    [[ $v != missing ]] || die "Debian package $p is still not installed"
    [[ $v == "${tested[$p]}" ]] || say "note: installed $p $v, tested with ${tested[$p]}"
  done
fi

# Python: uv (pinned, hash-checked by pip) installs exactly uv.lock into .venv.
if [[ ! -x $VENV/bin/python ]]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
uv_want=$(sed -n 's/^uv==\([^ ]*\).*/\1/p' "$UV_PIN")
uv_have=$("$UV" --version 2>/dev/null | cut -d' ' -f2) || uv_have=
if [[ $uv_have != "$uv_want" ]]; then
  say "installing uv $uv_want from $UV_PIN (--require-hashes)"
  "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$VENV/bin/python" -m ensurepip -q
  "$VENV/bin/python" -m pip install -q --no-deps --require-hashes -r "$UV_PIN"
fi
"$UV" sync --quiet --frozen --python "$VENV/bin/python"

# Debian's bcc and nftables bindings are pure Python over ctypes: expose just
# those two packages to the venv through a folder of symlinks and a .pth file,
# instead of --system-site-packages (which pyenv's python cannot see anyway).
debsite=$PWD/$VENV/debian-bindings
mkdir -p "$debsite"
for mod in bcc nftables; do
  ln -sfn "/usr/lib/python3/dist-packages/$mod" "$debsite/$mod"
done
sitepk=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$debsite" > "$sitepk/debian-bindings.pth"

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
