"""QEMU guests: the command line, starting in a namespace, QMP, stopping, accel detection, waiting for ping.

The command line mirrors the seed's (seed/kvm-network-virtualization.txt):

    qemu-system-x86_64 -m 512M -smp 1
      -drive file=debian-8.7.1-amd64.img,if=none,cache=writeback,id=disk0,media=disk,format=qcow2
      -device virtio-blk-pci,drive=disk0,id=virtio-disk0,bootindex=1
      -netdev tap,id=net0,ifname=vm1eth0,script=/etc/ifup,downscript=/etc/ifdown
      -device virtio-net-pci,netdev=net0,id=nic0,mac=0a:e8:4f:c5:6a:16
      -no-user-config -nodefaults           (the seed's -nodefconfig is the old name)

with the built-in tiny guest as `-kernel/-initrd/-append` instead of a disk, no display (`-display none`, serial to a
log file), and run as a daemon with a pidfile and a QMP socket. Per guest, run_dir holds NAME.pid, NAME.qmp, NAME.log.

QEMU runs the ifup script with the tap's name when it opens the tap, and the downscript when it exits normally (QMP
`quit`, guest poweroff, SIGTERM), not after SIGKILL: stop() therefore asks over QMP first.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

QEMU = "qemu-system-x86_64"
NETDEV_ID = "net0"
DISK_ID = "disk0"


class QemuError(RuntimeError):
    """QEMU refused to start or to talk; str() is one line."""


# --- the command line (pure) ------------------------------------------------------------------------------------

def paths(run_dir: str | Path, name: str) -> dict[str, Path]:
    run_dir = Path(run_dir)
    return {"pid": run_dir / f"{name}.pid", "qmp": run_dir / f"{name}.qmp", "log": run_dir / f"{name}.log"}


def _opt(value: str | Path) -> str:
    """A value inside a QEMU option string (file=...,if=none): QEMU reads ",," as a literal comma."""
    return str(value).replace(",", ",,")


def guest_append(address: str | None = None, gateway: str | None = None, name: str | None = None) -> str:
    """The tiny guest's kernel command line: its /init reads kvmnet.ip/gw/name (setup/image.py)."""
    # quiet: serial output is slow under TCG. panic=-1 with -no-reboot: a guest that panics exits QEMU.
    parts = ["console=ttyS0", "quiet", "panic=-1"]
    if address:
        parts.append(f"kvmnet.ip={address}")
    if gateway:
        parts.append(f"kvmnet.gw={gateway}")
    if name:
        parts.append(f"kvmnet.name={name}")
    return " ".join(parts)


def build_command(*, name: str, tap: str, mac: str, run_dir: str | Path, accel: str = "tcg",
                  memory: str = "128M", cpus: int = 1,
                  disk: str | Path | None = None, disk_format: str = "qcow2",
                  kernel: str | Path | None = None, initrd: str | Path | None = None, append: str = "",
                  ifup: str = "no", ifdown: str = "no",
                  multi_queue: bool = False, vnet_hdr: bool = True, vhost: bool = False,
                  qemu: str = QEMU) -> list[str]:
    """The argv for one guest. Exactly one of disk (a boot disk image) or kernel (+ initrd, append) is given."""
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be kvm or tcg here (resolve auto first): {accel!r}")
    if (disk is None) == (kernel is None):
        raise ValueError("give either disk or kernel")
    p = paths(run_dir, name)
    if len(str(p["qmp"]).encode()) > 107:
        # sun_path is 108 bytes with its NUL; QEMU would refuse with a less obvious message.
        raise ValueError(f"QMP socket path longer than 107 bytes: {p['qmp']}")
    argv = [qemu, "-name", name, "-machine", "pc", "-accel", accel]
    # KVM runs the host's CPU model; TCG keeps QEMU's default (qemu64), which it emulates fastest.
    if accel == "kvm":
        argv += ["-cpu", "host"]
    argv += ["-m", str(memory), "-smp", str(cpus), "-no-user-config", "-nodefaults", "-display", "none",
             "-serial", f"file:{_opt(p['log'])}", "-no-reboot"]
    if disk is not None:
        argv += ["-drive", f"file={_opt(disk)},if=none,cache=writeback,id={DISK_ID},media=disk,format={disk_format}",
                 "-device", f"virtio-blk-pci,drive={DISK_ID},id=virtio-{DISK_ID},bootindex=1"]
    else:
        argv += ["-kernel", str(kernel)]
        if initrd is not None:
            argv += ["-initrd", str(initrd)]
        if append:
            argv += ["-append", append]
    netdev = f"tap,id={NETDEV_ID},ifname={tap},script={_opt(ifup)},downscript={_opt(ifdown)}"
    netdev += f",vnet_hdr={'on' if vnet_hdr else 'off'},vhost={'on' if vhost else 'off'}"
    nic = f"virtio-net-pci,netdev={NETDEV_ID},id=nic0,mac={mac}"
    if multi_queue:
        # A multi-queue tap only accepts queues > 1 (QEMU asks for IFF_MULTI_QUEUE only then); one pair per vCPU,
        # and the NIC needs 2 MSI-X vectors per queue pair plus config and control.
        queues = max(2, cpus)
        netdev += f",queues={queues}"
        nic += f",mq=on,vectors={2 * queues + 2}"
    argv += ["-netdev", netdev, "-device", nic]
    argv += ["-qmp", f"unix:{_opt(p['qmp'])},server=on,wait=off", "-daemonize", "-pidfile", str(p["pid"])]
    return argv


def disk_format(path: str | Path) -> str:
    """qcow2 if the file starts with qcow2's magic, else raw."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


# --- QMP ----------------------------------------------------------------------------------------------------------

class QMP:
    """A minimal QMP client: one JSON object per line; events are skipped while waiting for a reply."""

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
            self.file = self.sock.makefile("rwb")
            greeting = self._read()
            if "QMP" not in greeting:
                raise QemuError(f"{path}: not a QMP greeting")
            self.execute("qmp_capabilities")
        except BaseException:
            if hasattr(self, "file"):
                self.file.close()
            self.sock.close()
            raise

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise ConnectionResetError(errno.ECONNRESET, "QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, **arguments) -> object:
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QemuError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            # else an event ({"event": ...}): not ours

    def close(self) -> None:
        # The makefile() object holds the fd open too; QEMU serves one QMP client at a time, so close both.
        self.file.close()
        self.sock.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- processes ----------------------------------------------------------------------------------------------------

def read_pid(run_dir: str | Path, name: str) -> int | None:
    try:
        return int(paths(run_dir, name)["pid"].read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """/proc/PID/stat field 22 (starttime, in clock ticks since boot): with the pid, names one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])  # fields[0] is field 3 (state); zombies count as gone
    except (OSError, IndexError, ValueError):
        return None


def _started_by_us(pid: int, pidfile: str | Path) -> bool:
    """pid is alive (not a zombie) and is the QEMU we started with this -pidfile: our run directory's pidfile path is
    on its command line. A recycled pid, or someone else's QEMU, is not ours."""
    if start_time(pid) is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    want = os.fsencode(str(pidfile))
    return any(a == b"-pidfile" and b == want for a, b in zip(argv, argv[1:]))


def find_pid(run_dir: str | Path, name: str, start: int | None = None) -> int | None:
    """The guest's QEMU, if it runs: the pidfile's pid if it is ours (and, with `start`, started then); else a
    process whose command line names our pidfile (QEMU still starting, or its pidfile lost)."""
    pidfile = paths(run_dir, name)["pid"]
    pid = read_pid(run_dir, name)
    if pid is not None and _started_by_us(pid, pidfile) and (start is None or start_time(pid) == start):
        return pid
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _started_by_us(int(entry), pidfile):
            return int(entry)
    return None


def pid_alive(run_dir: str | Path, name: str) -> int | None:
    """The guest's QEMU pid if it runs, else None."""
    pid = read_pid(run_dir, name)
    if pid is not None and _started_by_us(pid, paths(run_dir, name)["pid"]):
        return pid
    return None


def _netns_prefix(netns: str) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def _start_error(output: str) -> str:
    """One line from QEMU's stderr: its own last message without the echoed option, plus what the ifup script said
    (`kvmnet-ifup: vm1eth0: no bridge 'br9' ...`), which is usually the actual cause."""
    lines = [l.strip() for l in output.splitlines() if l.strip()]
    if not lines:
        return "no message"
    ours = [l for l in lines if l.startswith("qemu-system")]
    last = ours[-1] if ours else lines[-1]
    last = re.sub(r"^qemu-system[^:]*: ", "", last)
    last = re.sub(r"^-[a-z-]+ [^:]*: ", "", last)  # "-netdev tap,id=...: network script ... failed"
    others = [l for l in lines if not l.startswith("qemu-system")]
    return last + (f" ({'; '.join(others[-2:])})" if others and ours else "")


def start(argv: Sequence[str], netns: str = "", env: dict[str, str] | None = None, timeout: float = 60.0) -> int:
    """Run a build_command() argv inside namespace netns (the tap is created there) and return QEMU's pid.

    With -daemonize the first process exits only once the guest is set up (tap opened, ifup script run), so a
    zero exit means the tap is on its bridge. env adds variables for the ifup/downscript (QEMU passes its own
    environment to them).
    """
    argv = list(argv)
    try:
        pidfile = Path(argv[argv.index("-pidfile") + 1])
    except (ValueError, IndexError):
        raise ValueError("argv has no -pidfile (use build_command)") from None
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.unlink(missing_ok=True)
    full_env = dict(os.environ, **(env or {}))
    try:
        p = subprocess.run(_netns_prefix(netns) + argv, env=full_env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise QemuError(f"{e.filename} not found (apt-get install qemu-system-x86)") from None
    except subprocess.TimeoutExpired:
        # Only the foreground QEMU was killed; its daemon half may already have written the pidfile.
        try:
            pid = int(pidfile.read_text().split()[0])
            if _started_by_us(pid, pidfile):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
        raise QemuError(f"QEMU did not finish starting within {timeout:.0f}s") from None
    if p.returncode != 0:
        raise QemuError(f"QEMU exited with status {p.returncode}: {_start_error(p.stderr + p.stdout)}")
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        raise QemuError(f"QEMU started but wrote no pidfile {pidfile}") from None


def status(run_dir: str | Path, name: str) -> dict:
    """{"name", "pid", "alive", "status"}: status is QMP query-status ("running", "paused", ...), or "stopped"
    when no QEMU runs, or "unknown" when it runs but QMP does not answer."""
    pid = pid_alive(run_dir, name)
    out = {"name": name, "pid": pid, "alive": pid is not None, "status": "stopped"}
    if pid is None:
        return out
    try:
        with QMP(paths(run_dir, name)["qmp"], timeout=2.0) as q:
            out["status"] = q.execute("query-status").get("status", "unknown")
    except (OSError, QemuError, ValueError):
        out["status"] = "unknown"
    return out


def _wait_gone(pid: int, start: int | None, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if start_time(pid) != start:
            return True
        time.sleep(0.05)
    return start_time(pid) != start


def stop(run_dir: str | Path, name: str, timeout: float = 10.0, powerdown: bool = True,
         start: int | None = None) -> str:
    """Stop a guest; returns how: "not running", "powerdown", "quit", "sigterm" or "sigkill".

    powerdown first asks the guest (ACPI power button) and waits up to half the timeout; then QMP `quit`; then
    SIGTERM (QEMU still runs the downscript); SIGKILL last (no downscript, but the kernel removes a non-persistent
    tap when its last fd closes).
    """
    p = paths(run_dir, name)
    pid = find_pid(run_dir, name, start)
    how = "not running"
    if pid is not None:
        started = start_time(pid)  # every signal below goes to this process only, never to a pid reused since
        how = ""
        steps: list[tuple[str, float]] = []
        if powerdown:
            steps.append(("powerdown", timeout / 2))
        steps += [("quit", timeout / 4), ("sigterm", timeout / 4), ("sigkill", 5.0)]
        for step, wait in steps:
            asked = False
            try:
                if step == "powerdown":
                    with QMP(p["qmp"], timeout=2.0) as q:
                        # A paused guest cannot see the button: go straight to quit.
                        if q.execute("query-status").get("status") != "running":
                            continue
                        asked = True
                        q.execute("system_powerdown")
                elif step == "quit":
                    with QMP(p["qmp"], timeout=2.0) as q:
                        asked = True
                        q.execute("quit")
                elif start_time(pid) == started:
                    os.kill(pid, signal.SIGTERM if step == "sigterm" else signal.SIGKILL)
            except (OSError, QemuError, ValueError):
                # No QMP socket (or QEMU exited meanwhile): no point waiting long on a request never made. If it
                # was made and the connection dropped, QEMU is on its way out: wait as usual.
                if not asked:
                    wait = 0.2
            if _wait_gone(pid, started, wait):
                how = step
                break
        if not how:
            raise QemuError(f"guest {name}: QEMU pid {pid} survived SIGKILL")
    for f in p.values():
        if f.suffix != ".log":
            f.unlink(missing_ok=True)
    return how


# --- acceleration -------------------------------------------------------------------------------------------------

# A boot sector that writes 0x10 to isa-debug-exit: QEMU exits with status (0x10 << 1) | 1 = 33 once the BIOS has
# run and jumped to it, i.e. once the accelerator really executes guest code.
_PROBE_SECTOR = bytes([0xB0, 0x10, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD]).ljust(510, b"\0") + b"\x55\xaa"
_PROBE_EXIT = 33
_accel_cache: str | None = None


def _run_probe(argv: list[str], timeout: float) -> tuple[int | None, str]:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, ""
    lines = p.stderr.strip().splitlines()
    return p.returncode, lines[-1] if lines else f"exit status {p.returncode}"


def _probe_kvm(qemu: str = QEMU, timeout: float = 20.0, accel: str = "kvm", cpu: str = "host") -> tuple[bool, str]:
    """Does KVM run a Linux guest here? Returns (yes, why).

    Two steps, because a nested PVM /dev/kvm passes the easy test and fails the real one: with -cpu qemu64 it runs
    a boot sector but a Linux kernel never prints a line, and -cpu host fails at once. So: a boot sector first
    (fails fast), then the tiny guest's kernel must reach its init's "ready" line on the serial port.
    accel and cpu are for testing the probe itself (accel="tcg" must pass; cpu="qemu64" fails on PVM hosts).
    """
    import tempfile

    from . import image as _image
    if accel == "kvm":
        if not os.path.exists("/dev/kvm"):
            return False, "no /dev/kvm"
        try:
            os.close(os.open("/dev/kvm", os.O_RDWR))
        except OSError as e:
            return False, f"/dev/kvm: {e.strerror}"
    base = [qemu, "-machine", "pc", "-accel", accel, "-cpu", cpu, "-nodefaults", "-no-user-config",
            "-display", "none", "-monitor", "none", "-no-reboot"]
    with tempfile.TemporaryDirectory(prefix="kvmnet-probe-") as tmp:
        sector = Path(tmp) / "boot.img"
        sector.write_bytes(_PROBE_SECTOR)
        rc, msg = _run_probe(base + ["-m", "32M", "-serial", "none",
                                     "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                                     "-drive", f"file={sector},format=raw,if=ide"], timeout)
        if rc != _PROBE_EXIT:
            return False, f"QEMU -accel {accel} -cpu {cpu}: {msg or f'no boot sector run within {timeout:.0f}s'}"
        try:
            img = _image.ensure_image(progress=lambda s: None)
        except _image.ImageError as e:
            return False, f"cannot build the tiny guest to test KVM with: {e}"
        log = Path(tmp) / "serial.log"
        proc = subprocess.Popen(base + ["-m", "128M", "-serial", f"file:{log}", "-kernel", str(img.kernel),
                                        "-initrd", str(img.initrd), "-append", guest_append(name="kvmprobe")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        end = time.monotonic() + timeout
        ready = False
        while time.monotonic() < end and proc.poll() is None:
            if log.exists() and b"kvmnet-guest: ready" in log.read_bytes():
                ready = True
                break
            time.sleep(0.1)
        proc.kill()
        _, err = proc.communicate()
    if ready:
        return True, f"{accel} booted the tiny guest"
    last = err.decode(errors="replace").strip().splitlines()
    why = f"a Linux guest under {accel} -cpu {cpu} did not boot within {timeout:.0f}s"
    return False, why + (f": {last[-1]}" if last else "")


def _cache_file() -> Path:
    return Path(os.environ.get("KVMNET_RUN_DIR", "/run/kvmnet")) / "accel.json"


def detect_accel(refresh: bool = False, qemu: str = QEMU) -> str:
    """"kvm" when KVM really runs a guest here, else "tcg". Probed once per boot: the answer is kept in memory
    and in /run/kvmnet/accel.json (tmpfs, so a reboot onto another kernel probes again)."""
    global _accel_cache
    if _accel_cache and not refresh:
        return _accel_cache
    f = _cache_file()
    if not refresh:
        try:
            _accel_cache = json.loads(f.read_text())["accel"]
            return _accel_cache
        except (OSError, ValueError, KeyError, TypeError):
            pass
    ok, why = _probe_kvm(qemu)
    _accel_cache = "kvm" if ok else "tcg"
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"accel": _accel_cache, "reason": why}) + "\n")
    except OSError:
        pass
    return _accel_cache


def accel_reason() -> str:
    """Why detect_accel() answered what it did (from the cache file), for status output and logs."""
    try:
        return json.loads(_cache_file().read_text()).get("reason", "")
    except (OSError, ValueError):
        return ""


def resolve_accel(accel: str) -> str:
    """A guest's accel setting ("auto" | "kvm" | "tcg") -> what to run with."""
    return detect_accel() if accel == "auto" else accel


def vhost_available(accel: str) -> bool:
    # vhost-net needs KVM's ioeventfd/irqfd to pay off, and the module's device node.
    return accel == "kvm" and os.path.exists("/dev/vhost-net")


# --- waiting for a guest ------------------------------------------------------------------------------------------

def wait_for_ping(netns: str, address: str, timeout: float = 60.0,
                  progress: Callable[[str], None] | None = print, name: str | None = None) -> float:
    """Ping address from netns until it answers; returns the seconds waited. Raises TimeoutError.
    Prints a line about once a second while waiting (a TCG guest takes a few seconds)."""
    address = str(address).split("/")[0]
    label = name or address
    t0 = time.monotonic()
    last_report = 0.0
    while True:
        attempt = time.monotonic()
        p = subprocess.run(_netns_prefix(netns) + ["ping", "-c1", "-W1", "-q", address], capture_output=True)
        waited = time.monotonic() - t0
        if p.returncode == 0:
            if progress:
                progress(f"guest {label}: answers ping after {waited:.1f}s")
            return waited
        if waited >= timeout:
            raise TimeoutError(f"guest {label} ({address}) did not answer ping within {timeout:.0f}s")
        if progress and waited - last_report >= 1.0:
            progress(f"guest {label}: waiting for ping ({int(waited)}s)")
            last_report = waited
        # ping -W1 waits a second for a reply; an instant failure (no route yet) should not spin.
        time.sleep(max(0.0, 0.5 - (time.monotonic() - attempt)))


def format_command(argv: Sequence[str]) -> str:
    """A shell-pasteable rendering, for logs and plans."""
    return " ".join(shlex.quote(a) for a in argv)
