"""kvmnet-setup {plan,up,down,status,image} -c LAB.yaml [--json]

Exit status: 0 done; 1 a run-time failure (said in one line; a failed `up` is rolled back), or the lab is held by
another run; 2 bad input or a refusal (one line naming the field, nothing created), e.g. a name the lab would create
is taken by something kvmnet-setup did not create.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kvmnet.common.lab import LabError, load_lab


def _progress(quiet: bool):
    return (lambda s: None) if quiet else (lambda s: print(f"kvmnet-setup: {s}", file=sys.stderr, flush=True))


def _lab_name(path: str) -> str:
    """The state key for `down`, even when the edited lab file no longer validates. Always a valid lab name: it
    names a directory under /run/kvmnet that `down` removes."""
    from kvmnet.common import yamlfile
    from kvmnet.common.lab import _nsname
    try:
        return load_lab(path).name
    except LabError as e:
        first = e
    # A lab file deleted since `up`: the record is keyed by its stem. Unreadable or not YAML: that line, exit 2.
    data = yamlfile.read_yaml(path, LabError) if os.path.lexists(path) else None
    for name in ((data.get("name") if isinstance(data, dict) else None), Path(path).stem):
        try:
            return _nsname(name)
        except ValueError:
            continue
    raise first


def cmd_plan(args) -> int:
    from . import apply
    from .state import State
    lab = load_lab(args.config)
    actions = apply.up(lab, State(lab.name), force=args.force, dry_run=True)
    if args.json:
        print(json.dumps([a.to_json() for a in actions], indent=1))
    else:
        for a in actions:
            print(a)
        if not actions:
            print(f"lab {lab.name}: nothing to do")
    return 0


def cmd_up(args) -> int:
    from . import apply
    from .state import State
    lab = load_lab(args.config)
    progress = _progress(args.json)
    st = State(lab.name)
    st.lock()  # one run per lab, for the whole run: a second fails at once, naming this one's pid
    try:
        actions = apply.up(lab, st, force=args.force, progress=progress)
        started = [a.name for a in actions if a.op == "guest_start"]
        problems = apply.wait_guests(lab, started, args.wait, progress) if started and args.wait > 0 else []
    finally:
        st.unlock()
    if args.json:
        print(json.dumps({"lab": lab.name, "changed": len(actions), "actions": [a.to_json() for a in actions],
                          "problems": problems}))
    else:
        for a in actions:
            print(a)
        print(f"lab {lab.name}: {'up, ' + str(len(actions)) + ' change(s)' if actions else 'up, nothing changed'}")
    for p in problems:
        print(f"kvmnet-setup: up: {p}", file=sys.stderr)
    return 1 if problems else 0


def cmd_down(args) -> int:
    from . import apply
    from .state import State
    name = _lab_name(args.config)
    st = State(name)
    st.lock()
    try:
        n, problems = apply.down(st, progress=_progress(args.json))
    finally:
        st.unlock()
    if args.json:
        print(json.dumps({"lab": name, "removed": n, "problems": problems}))
    else:
        for p in problems:
            print(f"kvmnet-setup: down: {p}", file=sys.stderr)
        print(f"lab {name}: down, removed {n} object(s)" if n else f"lab {name}: nothing recorded, nothing to remove")
    return 1 if problems else 0


def cmd_status(args) -> int:
    from .status import collect, render
    lab = load_lab(args.config)
    data = collect(lab)
    print(json.dumps(data, indent=1) if args.json else render(data))
    return 0


def cmd_image(args) -> int:
    from . import image
    try:
        img = image.ensure_image(progress=_progress(args.json))
    except image.ImageError as e:
        print(f"kvmnet-setup: image: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"kernel": str(img.kernel), "initrd": str(img.initrd)}))
    else:
        print(f"kernel {img.kernel}\ninitrd {img.initrd}")
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvmnet-setup", description="Build, show and remove a KVM bridge lab.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, text in (("plan", cmd_plan, "print the actions `up` would take"),
                           ("up", cmd_up, "make the lab exist (idempotent)"),
                           ("down", cmd_down, "remove what `up` created (from its record, not the file)"),
                           ("status", cmd_status, "bridges, ports, carrier and guests"),
                           ("image", cmd_image, "build or find the cached tiny guest")):
        s = sub.add_parser(name, help=text)
        s.set_defaults(fn=fn)
        s.add_argument("-c", "--config", required=(name != "image"), metavar="LAB.yaml")
        s.add_argument("--json", action="store_true", help="machine-readable output")
        if name in ("plan", "up"):
            s.add_argument("--force", action="store_true",
                           help="move the uplink's addresses even if it carries the default route")
        if name == "up":
            s.add_argument("--wait", type=float, default=120, metavar="SECONDS",
                           help="wait this long for started QEMU guests to answer ping (0: do not wait)")
    args = p.parse_args(argv)
    from .apply import ApplyError
    from .plan import Refused
    from .state import Busy, StateError
    try:
        code = args.fn(args)
    except (LabError, Refused) as e:
        print(f"kvmnet-setup: {e}", file=sys.stderr)
        code = 2
    except (Busy, StateError) as e:
        print(f"kvmnet-setup: {args.cmd}: {e}", file=sys.stderr)
        code = 1
    except ApplyError as e:
        print(f"kvmnet-setup: {args.cmd} failed: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # an unexpected fault: still one line for people; KVMNET_DEBUG=1 shows the traceback
        import os
        if os.environ.get("KVMNET_DEBUG"):
            raise
        print(f"kvmnet-setup: {args.cmd} failed: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
