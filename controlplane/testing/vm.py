"""Boot a command in a throw-away QEMU VM running Debian's stock kernel.

Stdlib only. The runner behind ``vm-tests/run`` (the project's VM suite) and behind the
pytest plugin's ``offload_vm`` marker (``controlplane.testing``), so a user's checkout can run
it too: ``python -m controlplane.testing.vm -- CMD``. See ``vm-tests/README.md``.

How it works, in short:

* the compressed ``/boot/vmlinuz-*-amd64`` is decompressed once into the cache directory (an ELF
  ``vmlinux`` that QEMU boots through PVH: saves ~3.5 s of TCG time per boot);
* a tiny busybox initramfs (``INIT_SCRIPT``, ``STAGE2_SCRIPT`` below) is built once and
  rebuilt when any of its inputs change; it loads the virtio/9p/overlay modules, mounts the
  host ``/`` read-only over virtio-9p with a tmpfs overlay on top, mounts the results
  directory read-write at the same absolute path as on the host, and ``switch_root``s into a
  stage-2 init that runs the job;
* the job (cwd, environment, command) is a shell script written into the cache directory;
  the guest sees it through the read-only root share;
* the guest writes the command's exit status to ``RESULTS/exit-status``; no such file means
  the VM itself failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import select
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.errors import EnvironmentProblem
from controlplane.kernel.flock import lock_exclusive


def default_cache_dir() -> Path:
    """Where the decompressed kernel, the initramfs and the job script live between runs:
    ``$OFFLOADCTL_VM_CACHE``, else ``~/.cache/offloadctl/vm`` (the guest reads the job
    script through the host's root share, so it must not be under ``/run``)."""
    env = os.environ.get("OFFLOADCTL_VM_CACHE")
    if env:
        return Path(env).resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).resolve() / "offloadctl" / "vm"


QEMU = "qemu-system-x86_64"
QBOOT = Path("/usr/share/qemu/qboot.rom")
BUSYBOX = Path("/bin/busybox")

# Modules the initramfs needs before it can mount the host's root (dependencies are added
# from modules.dep). Everything else is loaded by stage 2 with the guest's own modprobe.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

# Busybox applets the initramfs scripts use (symlinked in the cpio archive).
APPLETS = (
    "sh",
    "mount",
    "umount",
    "mkdir",
    "insmod",
    "cat",
    "cp",
    "echo",
    "switch_root",
    "poweroff",
    "reboot",
    "sleep",
    "ls",
)

STATUS_FILE = "exit-status"
CONSOLE_LOG = "console.log"
READY_MARK = "@@VMTEST-READY"
EXIT_MARK = "@@VMTEST-EXIT"

# Stage 1 and stage 2 of the guest's init, kept here so that an installed package (no
# source tree) carries them.
INIT_SCRIPT = r"""#!/bin/sh
# Stage 1 (busybox, in the initramfs): mount the host's / read-only over virtio-9p with a
# tmpfs overlay on top, mount the results share at its host path, switch_root to stage 2.
export PATH=/bin
fail() {
    echo "vmtest-init: $*"
    echo o > /proc/sysrq-trigger
    reboot -f
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules); do
    insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done
RESULTS=
JOB=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmtest_results=*) RESULTS="${arg#*=}" ;;
        vmtest_job=*) JOB="${arg#*=}" ;;
    esac
done
[ -n "$RESULTS" ] && [ -n "$JOB" ] || fail "vmtest_results= or vmtest_job= missing"
P9="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o "$P9,ro,cache=loose" hostroot /lower || fail "cannot mount the host root"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay"
N=/newroot
mount -t proc proc $N/proc
mount -t sysfs sysfs $N/sys
mount -t devtmpfs devtmpfs $N/dev
mkdir -p $N/dev/pts $N/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $N/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $N/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $N/run
# /tmp is left to the overlay: the host's /tmp shows through (copy-on-write), so a
# checkout or results directory under /tmp (a CI clone) is visible in the guest.
mkdir -p "$N$RESULTS"
mount -t 9p -o "$P9,cache=none" results "$N$RESULTS" || fail "cannot mount the results share"
mkdir -p $N/run/vmtest
cp /bin/busybox /stage2 $N/run/vmtest/
umount /proc /sys /dev
exec switch_root $N /run/vmtest/busybox sh /run/vmtest/stage2 "$RESULTS" "$JOB"
"""

STAGE2_SCRIPT = r"""#!/bin/sh
# Stage 2 (PID 1 after switch_root, busybox sh): load the modules the tests need, run the job
# as a child, record its exit status in the results dir, power off.
RESULTS="$1"
JOB="$2"
BB=/run/vmtest/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
off() {
    sync
    $BB poweroff -f
    echo o > /proc/sysrq-trigger
    $BB reboot -f
}
$BB hostname vmtest
ip link set lo up
# Flowtables, VLANs, bridge, veth, conntrack and the NAT/masquerade side (v4 and v6).
# nfnetlink subsystems would also autoload; loading them here keeps test timings honest.
modprobe -a nf_flow_table nf_flow_table_inet nft_flow_offload 8021q bridge veth \
    nf_conntrack nf_conntrack_netlink nf_tables nft_ct nft_nat nft_masq nft_chain_nat \
    nft_reject_inet nft_fib_inet || echo "vmtest-stage2: modprobe reported an error"
echo "@@VMTEST-READY uptime=$($BB cut -d' ' -f1 /proc/uptime)"
/bin/sh "$JOB" </dev/null
st=$?
echo "$st" > "$RESULTS/exit-status"
echo "@@VMTEST-EXIT status=$st uptime=$($BB cut -d' ' -f1 /proc/uptime)"
off
"""

# Environment variables passed from the caller into the guest command (exact names or
# prefixes ending in "_").
PASS_ENV = (
    "TERM",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "CI",
    "COLUMNS",
    "PYTHONHASHSEED",
    "PYTHONDONTWRITEBYTECODE",
    "BCC_KERNEL_SOURCE",
    "PYTEST_ADDOPTS",
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD",
    "HYPOTHESIS_",
    "VMTEST_",
    "OFFLOAD_",
)
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class VMError(Exception):
    """A problem with the VM machinery itself (not the command's failure)."""


def log(msg: str) -> None:
    print(f"[offloadctl vm] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- kernel


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: Path


def _version_key(v: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", v)]


def find_kernel() -> Kernel:
    """The newest /boot/vmlinuz-*-amd64 that has its modules installed."""
    candidates = []
    for path in glob.glob("/boot/vmlinuz-*-amd64"):
        version = os.path.basename(path)[len("vmlinuz-") :]
        mods = Path("/lib/modules") / version
        if (mods / "modules.dep").exists():
            candidates.append(Kernel(version, Path(path), mods))
    if not candidates:
        raise VMError(
            "no Debian kernel found: need /boot/vmlinuz-*-amd64 with /lib/modules/<version>/ "
            "(apt-get install linux-image-amd64; `make setup` does it)"
        )
    return max(candidates, key=lambda k: _version_key(k.version))


def _decompress_bzimage(data: bytes) -> bytes:
    """The ELF vmlinux inside a bzImage (payload located through the setup header)."""
    if data[0x202:0x206] != b"HdrS":
        raise VMError("kernel image is not a bzImage (no HdrS header)")
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        out = gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        if not shutil.which("zstd"):
            raise VMError("kernel is zstd-compressed: apt-get install zstd")
        out = subprocess.run(
            ["zstd", "-dc"], input=payload, stdout=subprocess.PIPE, check=True
        ).stdout
    else:
        raise VMError(f"unsupported kernel compression (magic {payload[:6].hex()})")
    if not out.startswith(b"\x7fELF"):
        raise VMError("decompressed kernel is not an ELF file")
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def uncompressed_kernel(kernel: Kernel, cache: Path) -> Path:
    """CACHE/vmlinux-VERSION, decompressed from /boot once."""
    out = cache / f"vmlinux-{kernel.version}"
    key_file = out.with_name(out.name + ".key")
    key = _stat_key(kernel.vmlinuz)
    if out.exists() and key_file.exists() and key_file.read_text() == key:
        return out
    t0 = time.monotonic()
    _write_atomic(out, _decompress_bzimage(kernel.vmlinuz.read_bytes()))
    key_file.write_text(key)
    log(f"decompressed {kernel.vmlinuz} -> {out} in {time.monotonic() - t0:.1f}s")
    return out


# --------------------------------------------------------------------------- modules


def _read_modules_dep(kernel: Kernel) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()
    return deps


def _module_name(relpath: str) -> str:
    base = os.path.basename(relpath)
    name = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return name.replace("-", "_")


def _builtin_modules(kernel: Kernel) -> set[str]:
    path = kernel.modules / "modules.builtin"
    if not path.exists():
        return set()
    return {_module_name(line) for line in path.read_text().split()}


def resolve_modules(kernel: Kernel, names: Iterable[str]) -> list[str]:
    """modules.dep paths (relative) for NAMES plus dependencies, in load order."""
    deps = _read_modules_dep(kernel)
    by_name = {_module_name(p): p for p in deps}
    builtin = _builtin_modules(kernel)
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        # modules.dep lists the full transitive closure, deepest dependency last.
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        order.append(path)

    for name in names:
        norm = name.replace("-", "_")
        if norm in by_name:
            visit(by_name[norm])
        elif norm not in builtin:
            raise VMError(f"module {name} not found for kernel {kernel.version}")
    return order


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        if not shutil.which("zstd"):
            raise VMError(f"{path} is zstd-compressed: apt-get install zstd")
        return subprocess.run(["zstd", "-dc", str(path)], stdout=subprocess.PIPE, check=True).stdout
    return data


# --------------------------------------------------------------------------- initramfs


class _Cpio:
    """Minimal newc cpio writer (no external cpio needed, device nodes without root)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (
                self.ino,
                mode,
                0,  # uid
                0,  # gid
                1,  # nlink
                0,  # mtime (reproducible)
                len(data),
                0,
                0,
                rdev[0],
                rdev[1],
                len(namez),
                0,
            )
        )
        self.ino += 1
        self.buf.write(hdr.encode() + namez)
        self.buf.write(b"\0" * (-(110 + len(namez)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def initramfs(kernel: Kernel, cache: Path) -> Path:
    """CACHE/initramfs-VERSION.cpio, rebuilt whenever one of its inputs changes."""
    if not BUSYBOX.exists():
        raise VMError(f"{BUSYBOX} missing: apt-get install busybox-static")
    mods = resolve_modules(kernel, BOOT_MODULES)
    key_parts = [
        "v1",
        kernel.version,
        _stat_key(BUSYBOX),
        *(_stat_key(kernel.modules / m) for m in mods),
        hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),  # holds the scripts
    ]
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()
    out = cache / f"initramfs-{kernel.version}.cpio"
    key_file = out.with_name(out.name + ".key")
    if out.exists() and key_file.exists() and key_file.read_text() == key:
        return out

    t0 = time.monotonic()
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "newroot", "lower", "rw"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    load_list = []
    for rel in mods:
        name = _module_name(rel)
        cpio.file(f"lib/modules/{name}.ko", _read_module(kernel.modules / rel))
        load_list.append(name)
    cpio.file("modules", ("\n".join(load_list) + "\n").encode())
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.file("stage2", STAGE2_SCRIPT.encode(), 0o755)
    _write_atomic(out, cpio.finish())
    key_file.write_text(key)
    log(
        f"built {out} ({out.stat().st_size // 1024} KiB, modules: {' '.join(load_list)}) "
        f"in {time.monotonic() - t0:.1f}s"
    )
    return out


# --------------------------------------------------------------------------- running


@dataclass
class RunConfig:
    command: list[str]
    results: Path
    cwd: Path
    timeout: float = 900.0
    mem: str = "1G"
    smp: int = 2
    extra_env: dict[str, str] = field(default_factory=dict)
    cache: Path = field(default_factory=default_cache_dir)
    echo: bool = True  # stream the guest console to stdout (it is always in RESULTS)


def guest_env(extra: dict[str, str]) -> dict[str, str]:
    env = {"PATH": GUEST_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root"}
    for name, value in os.environ.items():
        if any(name == p or (p.endswith("_") and name.startswith(p)) for p in PASS_ENV):
            env[name] = value
    if not sys.stdout.isatty():
        env["TERM"] = "dumb"
    env.setdefault("TERM", "dumb")
    env.setdefault("LANG", "C.UTF-8")
    # pytest's entry-point plugins (hypothesis' costs ~11 s of imports under TCG) are off in
    # the guest unless the caller sets this variable itself.
    env.setdefault("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    env["VMTEST_GUEST"] = "1"
    env.update(extra)
    return env


def _job_script(cfg: RunConfig) -> str:
    env = guest_env(cfg.extra_env)
    assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    cmd = " ".join(shlex.quote(a) for a in cfg.command)
    msg = f"vm-tests/run: cannot cd to {cfg.cwd} in the guest"
    return (
        "# generated by controlplane.testing.vm\n"
        f"cd {shlex.quote(str(cfg.cwd))} || {{ echo {shlex.quote(msg)}; exit 125; }}\n"
        f"exec env -i {assigns} {cmd}\n"
    )


def _check_path(label: str, path: Path) -> None:
    if re.search(r"\s", str(path)):
        raise VMError(f"{label} path must not contain whitespace: {path!r}")


def qemu_argv(cfg: RunConfig, vmlinux: Path, initrd: Path, job: Path) -> list[str]:
    cmdline = " ".join(
        [
            "console=ttyS0",
            "quiet",
            "loglevel=3",
            "panic=-1",
            "oops=panic",
            "rdinit=/init",
            "mitigations=off",
            "random.trust_cpu=on",
            "8250.nr_uarts=1",
            "no_timer_check",
            f"vmtest_results={cfg.results}",
            f"vmtest_job={job}",
        ]
    )
    return [
        QEMU,
        "-M", "q35",
        "-bios", str(QBOOT),
        "-accel", "tcg,tb-size=256",
        "-cpu", "max",
        "-m", cfg.mem,
        "-smp", str(cfg.smp),
        "-nodefaults",
        "-nographic",
        "-no-reboot",
        "-serial", "stdio",
        "-kernel", str(vmlinux),
        "-initrd", str(initrd),
        "-append", cmdline,
        "-fsdev", "local,id=hostroot,path=/,readonly=on,security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=results,path={cfg.results},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=results,mount_tag=results",
    ]  # fmt: skip


def _preflight() -> None:
    if not shutil.which(QEMU):
        raise VMError(f"{QEMU} not found: apt-get install qemu-system-x86 (`make setup`)")
    if not QBOOT.exists():
        raise VMError(f"{QBOOT} not found: apt-get install qemu-system-x86 (`make setup`)")
    if not BUSYBOX.exists():
        raise VMError(f"{BUSYBOX} missing: apt-get install busybox-static")


def unavailable() -> str | None:
    """Why no VM can be booted here (None: it can), without booting one."""
    if os.geteuid() != 0:
        return "the VM runner needs root (its guest runs the command as root)"
    try:
        _preflight()
        find_kernel()
    except VMError as exc:
        return str(exc)
    return None


MACHINE_LOCK = Path("/run/lock/offloadctl-vm.lock")


class _Lock:
    """The machine lock, waited for at most ``wait`` seconds (then VMError naming it):
    a hung holder costs the next run an error, never a hang."""

    def __init__(self, path: Path, wait: float) -> None:
        self.path = path
        self.wait = wait
        self.fd = -1

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another VM is running (lock {self.path}); waiting for it")
            try:
                lock_exclusive(self.fd, self.wait, f"the VM machine lock {self.path}")
            except EnvironmentProblem as exc:
                os.close(self.fd)
                raise VMError(str(exc)) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In QEMU's child before exec: SIGKILL it when the runner dies, even by ``kill -9``
    (which no handler sees), so no guest outlives its runner and the machine lock."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run(cfg: RunConfig) -> int:
    """Boot the VM, run the command, return its exit status (or raise VMError)."""
    _preflight()
    for label, p in (("results", cfg.results), ("cwd", cfg.cwd), ("cache", cfg.cache)):
        _check_path(label, p)
    cfg.cache.mkdir(parents=True, exist_ok=True)
    cfg.results.mkdir(parents=True, exist_ok=True)
    # One VM per machine, not per checkout: two TCG guests on 2 cores starve each
    # other into timeouts (a CI clone and a work tree must wait for each other).
    with _Lock(MACHINE_LOCK, wait=cfg.timeout):
        kernel = find_kernel()
        vmlinux = uncompressed_kernel(kernel, cfg.cache)
        initrd = initramfs(kernel, cfg.cache)
        job = cfg.cache / "job.sh"
        job.write_text(_job_script(cfg))
        status_file = cfg.results / STATUS_FILE
        status_file.unlink(missing_ok=True)
        (cfg.results / "vm-timing.json").unlink(missing_ok=True)
        return _boot(cfg, qemu_argv(cfg, vmlinux, initrd, job), status_file, kernel)


def _boot(cfg: RunConfig, argv: list[str], status_file: Path, kernel: Kernel) -> int:
    console = open(cfg.results / CONSOLE_LOG, "wb")  # noqa: SIM115
    tail: deque[str] = deque(maxlen=40)
    partial = b""
    t0 = time.monotonic()
    boot_time: float | None = None
    guest_uptime = ""
    if cfg.echo:
        command = " ".join(shlex.quote(a) for a in cfg.command)
        log(f"booting {kernel.version} under TCG: {command}")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group: killed as a group on timeout
        preexec_fn=_die_with_parent,
    )
    assert proc.stdout is not None
    out = sys.stdout.buffer
    timed_out = False

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        fd = proc.stdout.fileno()
        deadline = t0 + cfg.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"")
            console.write(chunk)
            if cfg.echo:
                with contextlib.suppress(BrokenPipeError):
                    out.write(chunk)
                    out.flush()
            partial += chunk
            *lines, partial = partial.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                tail.append(line)
                if boot_time is None and line.startswith(READY_MARK):
                    boot_time = time.monotonic() - t0
                    guest_uptime = line.split("uptime=", 1)[-1].strip()
    except KeyboardInterrupt:
        _kill_group(proc)
        console.close()
        log("interrupted: VM killed")
        raise
    finally:
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
    if timed_out:
        _kill_group(proc)
    else:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
    if partial:
        tail.append(partial.decode(errors="replace"))
    console.close()
    total = time.monotonic() - t0
    timing = (
        f"boot {boot_time:.1f}s (guest uptime {guest_uptime}s), total {total:.1f}s"
        if boot_time is not None
        else f"total {total:.1f}s (the command never started)"
    )
    if timed_out:
        _fail_report(f"VM TIMED OUT after {cfg.timeout:g}s and was killed", tail, cfg)
        log(timing)
        raise VMError("timeout")
    try:
        text = status_file.read_text().strip()
        status = int(text)
    except (OSError, ValueError):
        _fail_report(
            f"VM FAILED: no exit status in {status_file} (qemu exited {proc.returncode})",
            tail,
            cfg,
        )
        log(timing)
        raise VMError("no exit status") from None
    if cfg.echo:
        log(f"command exited {status}; {timing}")
    _write_timing(cfg, boot_time, total, status)
    return status


def _write_timing(cfg: RunConfig, boot: float | None, total: float, status: int) -> None:
    data = {
        "boot_seconds": None if boot is None else round(boot, 3),
        "total_seconds": round(total, 3),
        "exit_status": status,
    }
    (cfg.results / "vm-timing.json").write_text(json.dumps(data) + "\n")


def _fail_report(headline: str, tail: Iterable[str], cfg: RunConfig) -> None:
    if not cfg.echo:  # the caller reads RESULTS/console.log itself
        return
    bar = "=" * 72
    lines = [bar, f"vm-tests/run: {headline}", f"last console lines ({cfg.results / CONSOLE_LOG}):"]
    lines += [f"  | {line}" for line in tail]
    lines.append(bar)
    print("\n".join(lines), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- command line

EXIT_TIMEOUT = 124
EXIT_VM_FAILED = 125


def main(
    argv: list[str], *, prog: str = "python -m controlplane.testing.vm", cache: Path | None = None
) -> int:
    """``[--results DIR] [--timeout S] [--mem 1G] [--smp N] [--cwd DIR] [--env K=V] -- CMD``.

    Exit status: the command's; 124 if the VM timed out; 125 if the VM failed (no exit
    status); 2 for usage errors; 130 if interrupted."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description="Run CMD inside a QEMU VM with Debian's kernel."
    )
    parser.add_argument(
        "--results", default="build/vm-results", help="results dir (default: %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds (default: 900)")
    parser.add_argument("--mem", default="1G", help="guest memory (default: 1G)")
    parser.add_argument("--smp", type=int, default=2, help="guest CPUs (default: 2)")
    parser.add_argument("--cwd", default=None, help="working dir in the guest (default: cwd)")
    parser.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="extra guest env variable"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    command = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error(f"no command given ({prog} [options] -- CMD ARGS...)")
    extra = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env wants K=V, got {item!r}")
        extra[key] = value
    cfg = RunConfig(
        command=command,
        results=Path(args.results).resolve(),
        cwd=Path(args.cwd or os.getcwd()).resolve(),
        timeout=args.timeout,
        mem=args.mem,
        smp=args.smp,
        extra_env=extra,
        cache=cache or default_cache_dir(),
    )
    try:
        return run(cfg)
    except KeyboardInterrupt:
        return 130
    except VMError as exc:
        if str(exc) == "timeout":
            return EXIT_TIMEOUT
        if str(exc) != "no exit status":
            log(f"error: {exc}")
        return EXIT_VM_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
