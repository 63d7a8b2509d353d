#!/usr/bin/env bash
# make deb: build/offloadctl_VERSION_ARCH.deb from this source tree.
#
# A staged tree packed by `dpkg-deb --build`, not debhelper: the package is one
# virtualenv plus a handful of files, and the steps that matter here (a venv
# made with Debian's /usr/bin/python3, hash-checked dependencies, shebangs
# pointing at /opt) are ones dh-virtualenv would need configuring for anyway.
# What debhelper would add is done explicitly below: md5sums, shlibs
# (dpkg-shlibdeps), compressed man page and changelog, conffiles.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=packaging/deb
PREFIX=/opt/offloadctl
SYSPY=/usr/bin/python3   # Debian's: an operator's host has no pyenv
DEVPY=$ROOT/.venv/bin/python   # make setup's venv: holds the locked uv and setuptools
UV=$ROOT/.venv/bin/uv
export UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1

say() { printf 'deb: %s\n' "$*"; }

VERSION=$("$SYSPY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
WORK=$ROOT/build/deb
STAGE=$WORK/root
VENV=$STAGE$PREFIX
OUT=$ROOT/build/offloadctl_${VERSION}_${ARCH}.deb
rm -rf "$WORK"
mkdir -p "$STAGE/DEBIAN" "$WORK/wheels"

# -- the private virtualenv -----------------------------------------------------
say "virtualenv $PREFIX with $SYSPY ($("$SYSPY" -V))"
"$SYSPY" -m venv --without-pip "$VENV"

# The one seam between the package and the lock: the runtime dependencies of
# uv.lock (no dev or uv group), installed exactly and hash-checked, nothing resolved.
say "runtime dependencies from uv.lock (--require-hashes)"
"$UV" export --quiet --frozen --no-default-groups --no-emit-project --format requirements-txt \
  -o "$WORK/requirements.txt"
"$UV" pip install --quiet --python "$VENV/bin/python3" --no-deps --require-hashes \
  -r "$WORK/requirements.txt"
# The project itself, built with the lock's setuptools (as make setup builds it).
"$UV" build --quiet --wheel --no-build-isolation --python "$DEVPY" --out-dir "$WORK/wheels"
"$UV" pip install --quiet --python "$VENV/bin/python3" --no-deps "$WORK"/wheels/controlplane-*.whl

# Debian's bcc and nftables bindings (pure Python over ctypes), reached as
# .venv reaches them (scripts/setup.sh): a folder of symlinks named by a .pth.
mkdir -p "$VENV/debian-bindings"
for mod in bcc nftables; do ln -s "/usr/lib/python3/dist-packages/$mod" "$VENV/debian-bindings/$mod"; done
site=$("$VENV/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PREFIX/debian-bindings" > "$site/debian-bindings.pth"

# bin/ keeps the interpreter links and offloadctl (the dependencies' own
# scripts and the activate scripts are of no use to an operator), and paths of
# the staging tree must not leak into the package.
find "$VENV/bin" -mindepth 1 ! -name 'python*' ! -name offloadctl -delete
sed -i "1s|^#!.*python.*|#!$PREFIX/bin/python3|" "$VENV/bin/offloadctl"
sed -i "s|$STAGE||g" "$VENV/pyvenv.cfg"
find "$VENV" -name direct_url.json -delete
# What dh_strip does for Debian's own packages (the wheels ship some unstripped).
find "$VENV" -type f -name '*.so*' -exec strip --strip-unneeded --remove-section=.comment \
  --remove-section=.note {} +
find "$VENV" -depth -type d -name __pycache__ -exec rm -rf {} +
if grep -rlI --exclude=RECORD "$STAGE" "$VENV" >/dev/null; then
  echo "deb: staging path left in: $(grep -rlI --exclude=RECORD "$STAGE" "$VENV" | head -3)" >&2
  exit 1
fi

# -- files around it ------------------------------------------------------------
install -d "$STAGE/usr/bin"
ln -s "$PREFIX/bin/offloadctl" "$STAGE/usr/bin/offloadctl"
install -D -m 0644 -t "$STAGE/lib/systemd/system" \
  packaging/systemd/offloadctl.service packaging/systemd/offloadctl@.service
install -D -m 0644 "$HERE/agent.yaml" "$STAGE/etc/offloadctl/agent.yaml"
echo /etc/offloadctl/agent.yaml > "$STAGE/DEBIAN/conffiles"
doc=$STAGE/usr/share/doc/offloadctl
install -D -m 0644 -t "$doc/examples" examples/configs/*.yaml
install -m 0644 "$HERE/copyright" "$doc/copyright"
sed "s/@VERSION@/$VERSION/" "$HERE/changelog" | gzip -9n > "$doc/changelog.gz"  # a native package
install -D -m 0644 "$HERE/lintian-overrides" "$STAGE/usr/share/lintian/overrides/offloadctl"

# Man page and completion from the packaged CLI's own command tree.
install -d "$STAGE/usr/share/man/man8" "$STAGE/usr/share/bash-completion/completions"
"$VENV/bin/python3" -m controlplane.cli.docgen man | gzip -9n > "$STAGE/usr/share/man/man8/offloadctl.8.gz"
"$VENV/bin/python3" -m controlplane.cli.docgen bash > "$STAGE/usr/share/bash-completion/completions/offloadctl"
find "$VENV" -depth -type d -name __pycache__ -exec rm -rf {} +

# -- control files --------------------------------------------------------------
install -m 0755 -t "$STAGE/DEBIAN" "$HERE/postinst" "$HERE/prerm" "$HERE/postrm"
mkdir -p "$WORK/shlibs/debian"
printf 'Source: offloadctl\n\nPackage: offloadctl\nArchitecture: any\n' > "$WORK/shlibs/debian/control"
mapfile -t elves < <(find "$VENV" -type f -name '*.so*')
shlibs=$(cd "$WORK/shlibs" && dpkg-shlibdeps -O --ignore-missing-info "${elves[@]}" 2>/dev/null \
  | sed -n 's/^shlibs:Depends=//p')
[[ -n $shlibs ]] || { echo "deb: dpkg-shlibdeps found no libraries" >&2; exit 1; }
size=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$size/" -e "s/@SHLIBS@/$shlibs/" \
  "$HERE/control.in" > "$STAGE/DEBIAN/control"
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
  | xargs -0 md5sum > DEBIAN/md5sums)
chmod -R u+rwX,go+rX,go-w "$STAGE"
chmod 0644 "$STAGE/DEBIAN/md5sums" "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/conffiles"

dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$OUT" >/dev/null
say "built $OUT ($(du -h "$OUT" | cut -f1))"
