"""The built-in tiny guest: Debian's cloud kernel plus a busybox initramfs, built once and cached.

    image = ensure_image(progress=print)      # GuestImage(kernel=Path, initrd=Path)
    qemu ... -kernel image.kernel -initrd image.initrd -append "console=ttyS0 kvmnet.ip=192.168.98.11/24"

The kernel comes from the versioned package that `linux-image-cloud-amd64` depends on: downloaded with
`apt-get download` and unpacked with `dpkg-deb -x`, never installed. Its virtio modules are not built in, so /init
loads them in dependency order (busybox insmod does not resolve dependencies), then configures eth0 from the kernel
command line (`kvmnet.ip=ADDR/LEN` or `kvmnet.ip=dhcp`, `kvmnet.gw=ADDR`, `kvmnet.name=HOST`), answers ping and
waits. An ACPI power button press (QMP `system_powerdown`) powers it off through busybox acpid.

The cache lives in /var/cache/kvmnet/guest/<kernel-version>-<hash>/ (KVMNET_CACHE_DIR overrides the root); the hash
covers the init script, the module list and busybox, so changing any of them rebuilds.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")

# Load order matters: insmod fails on a module whose dependencies are not loaded yet.
MODULES = [
    "drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev", "drivers/virtio/virtio_pci", "net/core/failover",
    "drivers/net/net_failover", "drivers/net/virtio_net", "drivers/block/virtio_blk",
    # The ACPI power button, read by acpid through evdev: lets `system_powerdown` shut the guest down cleanly.
    "drivers/input/evdev", "drivers/acpi/button",
]

INIT = r"""#!/bin/sh
# kvmnet tiny guest: load virtio, configure eth0 from the kernel command line, answer ping, wait.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/kvmnet-modules); do
  insmod "/lib/modules/$m.ko" 2>/dev/null || echo "kvmnet-guest: insmod $m failed"
done
ip= gw= name=kvmnet-guest
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    kvmnet.ip=*) ip="${arg#kvmnet.ip=}" ;;
    kvmnet.gw=*) gw="${arg#kvmnet.gw=}" ;;
    kvmnet.name=*) name="${arg#kvmnet.name=}" ;;
  esac
done
hostname "$name"
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ip link set eth0 up || echo "kvmnet-guest: no eth0"
if [ "$ip" = dhcp ]; then
  # kvmnet.ip=dhcp: ask a DHCP server (libvirt's NAT networks: dnsmasq), keep renewing in the background.
  printf '#!/bin/sh\ncase "$1" in bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface";; esac\n' > /tmp/udhcpc.sh
  chmod +x /tmp/udhcpc.sh
  udhcpc -i eth0 -s /tmp/udhcpc.sh -x "hostname:$name" -b -t 20 -T 1 >/dev/null 2>&1
elif [ -n "$ip" ]; then
  ip addr add "$ip" dev eth0
fi
[ -n "$gw" ] && ip route add default via "$gw"
acpid -c /etc/acpi -l /tmp/acpid.log -p /tmp/acpid.pid || echo "kvmnet-guest: no acpid"
echo "kvmnet-guest: ready name=$name ip=$ip gw=$gw mac=$(cat /sys/class/net/eth0/address 2>/dev/null)"
# PID 1 must never exit (the kernel would panic); reap children while waiting.
while :; do sleep 3600; done
"""

# busybox acpid runs /etc/acpi/<action> for an event; the power button maps to PWRF/00000080.
POWER_BUTTON = "#!/bin/sh\necho 'kvmnet-guest: power button, powering off'\nsync\npoweroff -f\n"


class ImageError(RuntimeError):
    """Building the tiny guest failed; str() is one line saying what and how to fix it."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


def cache_root() -> Path:
    return Path(os.environ.get("KVMNET_CACHE_DIR", "/var/cache/kvmnet")) / "guest"


def _run(argv: list[str], what: str, **kw) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise ImageError(f"{what}: {argv[0]} not found (install it: apt-get install {argv[0]})") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise ImageError(f"{what}: {last.removeprefix('E: ')}")
    return p.stdout


def _depends() -> str | None:
    try:
        out = _run(["apt-cache", "depends", META_PACKAGE], f"resolving {META_PACKAGE}")
    except ImageError:
        return None
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", line)
        if m:
            return m.group(1)
    return None


def kernel_package(progress: Callable[[str], None] = lambda s: None) -> str:
    """The versioned kernel package the metapackage depends on, e.g. linux-image-6.1.0-56-cloud-amd64."""
    found = _depends()
    if found is None:
        # A fresh machine may have no package lists yet.
        progress(f"image: {META_PACKAGE} unknown to apt-cache, running apt-get update")
        _run(["apt-get", "update", "-qq"], "apt-get update")
        found = _depends()
    if found is None:
        raise ImageError(f"resolving {META_PACKAGE}: apt knows no linux-image-*-cloud-amd64 it depends on "
                         "(is Debian's main archive in the apt sources?)")
    return found


def _kernel_version(package: str) -> str:
    return package[len("linux-image-"):]


def _download(package: str, dest: Path, progress: Callable[[str], None]) -> Path:
    progress(f"image: downloading {package}")
    argv = ["apt-get", "download", "-q", package]
    try:
        _run(argv, f"downloading {package}", cwd=dest)
    except ImageError:
        # A stale package list is the usual cause; refresh it once.
        progress("image: apt-get download failed, running apt-get update")
        _run(["apt-get", "update", "-qq"], "apt-get update")
        _run(argv, f"downloading {package}", cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise ImageError(f"downloading {package}: apt-get download left no .deb in {dest}")
    return debs[-1]


def _read_module(path: Path) -> bytes:
    """A module's bytes, decompressed: busybox insmod takes plain .ko only."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        # No zstd in Python 3.11's standard library: the zstd tool (bootstrap installs it).
        try:
            p = subprocess.run(["zstd", "-dc", str(path)], capture_output=True)
        except FileNotFoundError:
            raise ImageError(f"{path.name} is zstd-compressed and zstd is missing: apt-get install zstd") from None
        if p.returncode != 0:
            raise ImageError(f"decompressing {path.name}: {p.stderr.decode(errors='replace').strip()}")
        return p.stdout
    if path.suffix == ".gz":
        return gzip.decompress(data)
    return data


def _find_module(moddir: Path, rel: str) -> Path:
    for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        p = moddir / "kernel" / (rel + ext)
        if p.exists():
            return p
    raise ImageError(f"kernel package has no module {rel}.ko (looked in {moddir})")


class _Cpio:
    """A newc cpio archive, written in Python: deterministic, and no device-node permissions needed."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nameb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + nameb)
        self.buf.write(b"\0" * (-(110 + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self.add(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.add(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self.buf.getvalue()


def _busybox_applets() -> list[str]:
    out = _run([str(BUSYBOX), "--list"], "listing busybox applets")
    return [a for a in out.split() if a and a != "busybox"]


def build_initramfs(moddir: Path, modules: list[str] = MODULES) -> bytes:
    """The gzip'd newc initramfs: busybox and its applet links, /init, the decompressed modules."""
    c = _Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "etc", "etc/acpi", "etc/acpi/PWRF", "lib", "lib/modules",
              "tmp", "root"):
        c.dir(d)
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    c.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    c.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in _busybox_applets():
        c.symlink(f"bin/{applet}", "busybox")
    c.symlink("sbin/init", "../init")
    c.file("init", INIT.encode(), 0o755)
    c.file("etc/acpi/PWRF/00000080", POWER_BUTTON.encode(), 0o755)
    names = []
    for rel in modules:
        name = rel.rsplit("/", 1)[1]
        c.file(f"lib/modules/{name}.ko", _read_module(_find_module(moddir, rel)))
        names.append(name)
    c.file("etc/kvmnet-modules", ("\n".join(names) + "\n").encode())
    # mtime=0: the same inputs give the same bytes.
    return gzip.compress(c.finish(), compresslevel=6, mtime=0)


def _recipe_hash() -> str:
    h = hashlib.sha256()
    h.update(INIT.encode())
    h.update(POWER_BUTTON.encode())
    h.update("\n".join(MODULES).encode())
    st = BUSYBOX.stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def _check_busybox() -> None:
    if not BUSYBOX.exists():
        raise ImageError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    # A dynamically linked busybox would need its libc in the initramfs.
    with BUSYBOX.open("rb") as f:
        head = f.read(4096)
    if b"/lib64/ld-linux" in head or b"ld-linux-x86-64" in head:
        raise ImageError(f"{BUSYBOX} is dynamically linked: apt-get install busybox-static")


def ensure_image(progress: Callable[[str], None] = print, package: str | None = None) -> GuestImage:
    """The cached tiny guest, built first if needed. Safe to call from several processes at once."""
    _check_busybox()
    root = cache_root()
    recipe = _recipe_hash()
    if package is None:
        try:
            package = kernel_package(progress)
        except ImageError:
            # Offline or no apt lists: a guest built earlier from the same recipe still serves.
            built = sorted(root.glob(f"*-{recipe}/initrd.gz"), key=lambda p: p.stat().st_mtime)
            if built:
                final = built[-1].parent
                return GuestImage(kernel=final / "vmlinuz", initrd=final / "initrd.gz")
            raise
    kver = _kernel_version(package)
    final = root / f"{kver}-{recipe}"
    image = GuestImage(kernel=final / "vmlinuz", initrd=final / "initrd.gz")
    if image.kernel.exists() and image.initrd.exists():
        return image
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same image
        if image.kernel.exists() and image.initrd.exists():
            return image
        with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
            tmp = Path(tmp)
            os.chmod(tmp, 0o755)  # apt-get download drops to the _apt user when it can write here
            deb = _download(package, tmp, progress)
            progress(f"image: extracting {deb.name} ({deb.stat().st_size // 1_000_000} MB)")
            _run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], f"extracting {deb.name}")
            vmlinuz = tmp / "x" / "boot" / f"vmlinuz-{kver}"
            moddir = tmp / "x" / "lib" / "modules" / kver
            if not vmlinuz.exists():
                raise ImageError(f"{deb.name} has no boot/vmlinuz-{kver}")
            progress(f"image: packing initramfs (busybox + {len(MODULES)} modules)")
            out = tmp / "out"
            out.mkdir()
            (out / "initrd.gz").write_bytes(build_initramfs(moddir))
            shutil.copy2(vmlinuz, out / "vmlinuz")
            (out / "package").write_text(deb.name + "\n")
            os.chmod(out, 0o755)
            os.rename(out, final)  # atomic: readers see a complete image or none
        progress(f"image: ready in {final}")
    return image


def main() -> None:
    """`python -m kvmnet.setup.image`: build (or find) the tiny guest and print its paths."""
    import sys
    try:
        img = ensure_image(progress=lambda s: print(s, file=sys.stderr))
    except ImageError as e:
        print(f"kvmnet image: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(img.kernel)
    print(img.initrd)


if __name__ == "__main__":
    main()
