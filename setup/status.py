"""`kvmnet-setup status`: bridges, their ports with carrier, and the guests (QEMU asked over QMP)."""
from __future__ import annotations

from pyroute2 import IPRoute

from kvmnet.common.lab import Lab
from kvmnet.common.netns import entered

from .apply import guest_dir, netns_exists

IFF_UP, IFF_LOWER_UP = 0x1, 0x10000


def collect(lab: Lab) -> dict:
    ns = lab.host_netns
    out = {"lab": lab.name, "netns": ns, "present": not ns or netns_exists(ns), "bridges": [], "guests": []}
    by_dev = {g.tap: g for g in lab.guests}
    if out["present"]:
        with entered(ns):
            ipr = IPRoute()
        with ipr:
            msgs = list(ipr.get_links())
            addrs: dict[int, list[str]] = {}
            for a in ipr.get_addr():
                ip = a.get_attr("IFA_ADDRESS")
                if ip and not ip.startswith("fe80:"):
                    addrs.setdefault(a["index"], []).append(f"{ip}/{a['prefixlen']}")
        links = {}
        for m in msgs:
            info = m.get_attr("IFLA_LINKINFO")
            links[m["index"]] = {
                "name": m.get_attr("IFLA_IFNAME"), "kind": (info.get_attr("IFLA_INFO_KIND") if info else "") or "",
                "up": bool(m["flags"] & IFF_UP), "carrier": bool(m["flags"] & IFF_LOWER_UP),
                "mac": m.get_attr("IFLA_ADDRESS"), "master": m.get_attr("IFLA_MASTER"),
                "addresses": addrs.get(m["index"], []),
                "stp": (info.get_attr("IFLA_INFO_DATA").get_attr("IFLA_BR_STP_STATE")
                        if info and info.get_attr("IFLA_INFO_KIND") == "bridge" else None),
            }
        for idx, l in sorted(links.items(), key=lambda kv: kv[1]["name"]):
            if l["kind"] != "bridge":
                continue
            ports = []
            for p in sorted((p for p in links.values() if p["master"] == idx), key=lambda p: p["name"]):
                g = by_dev.get(p["name"])
                port = {k: p[k] for k in ("name", "kind", "up", "carrier", "mac")}
                ports.append(port | {"guest": g.name if g else ""})
            out["bridges"].append({"name": l["name"], "up": l["up"], "carrier": l["carrier"], "stp": bool(l["stp"]),
                                   "addresses": l["addresses"], "ports": ports})
    for g in lab.guests:
        row = {"name": g.name, "kind": g.kind, "device": g.device, "bridge": g.bridge, "mac": g.mac,
               "address": str(g.address), "running": False, "detail": ""}
        if g.kind == "netns":
            row["running"] = netns_exists(lab.guest_netns(g))
            row["detail"] = f"netns {lab.guest_netns(g)}"
        else:
            from . import guests
            st = guests.status(guest_dir(lab.name), g.name)
            row["running"], row["detail"] = st.get("running", False), st.get("detail", "")
        out["guests"].append(row)
    return out


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render(d: dict) -> str:
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    lines = [f"lab {d['lab']}" + (f" (namespace {d['netns']})" if d["netns"] else " (this host)")]
    if not d["present"]:
        lines[0] += ": namespace absent, the lab is down"
    rows = [["BRIDGE", "PORT", "KIND", "UP", "CARRIER", "MAC", "GUEST"]]
    for b in d["bridges"]:
        rows.append([b["name"], "-", "bridge", yes(b["up"]), yes(b["carrier"]), ",".join(b["addresses"]) or "-",
                     f"stp {'on' if b['stp'] else 'off'}"])
        for p in b["ports"]:
            rows.append(["", p["name"], p["kind"] or "-", yes(p["up"]), yes(p["carrier"]), p["mac"] or "-",
                         p["guest"] or "-"])
    if d["present"]:
        lines.append(_table(rows) if len(rows) > 1 else "no bridges")
    if d["guests"]:
        rows = [["GUEST", "KIND", "DEVICE", "BRIDGE", "MAC", "ADDRESS", "RUNNING", "DETAIL"]]
        for g in d["guests"]:
            rows.append([g["name"], g["kind"], g["device"], g["bridge"], g["mac"], g["address"], yes(g["running"]),
                         g["detail"] or "-"])
        lines += ["", _table(rows)]
    return "\n".join(lines)
