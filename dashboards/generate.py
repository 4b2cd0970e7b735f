#!/usr/bin/env python3
"""Writes the Grafana dashboards (kvmnet-overview.json, kvmnet-bridge.json, kvmnet-guest.json) next to this file.

    python3 dashboards/generate.py           # rewrite the JSON files
    python3 dashboards/generate.py --check   # exit 1 if a JSON file differs from what this script writes

The JSON files are committed and importable as they are (Grafana: Dashboards > New > Import, or file
provisioning); this script is how they are edited, so that every panel gets a unit, the same label filters and the
same datasource, and tests/unit/test_dashboards.py keeps it that way. Standard library only.

Conventions:
- Every query uses `${datasource}`, and filters with the template variables as regexes (`=~"$netns"`), so "All"
  and multi-value selections work: Grafana substitutes a regex alternation `(a|b)` or the variable's allValue.
- Rates use `$__rate_interval`, sums over the dashboard range `$__range`.
- Direction: kvmnet reports the host's view (a tap's transmit is its guest's receive). The guest dashboard turns
  that around and says so in each series' name.
- The guest table, loss and RTT percentiles use the recording rules in kvmnet.rules.yml: load them too.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}

# Label filters, by scope.
INST = 'instance=~"$instance"'
NS = f'{INST},netns=~"$netns"'
BR = f'{NS},bridge=~"$bridge"'
DEV = f'{BR},device=~"$device"'
GUESTS = f'{NS},guest=~"$guest"'
GUEST1 = f'{INST},guest="$guest"'


# ---------------------------------------------------------------------------------------------------- variables

def v_datasource() -> dict:
    return {"current": {}, "hide": 0, "includeAll": False, "label": "Data source", "multi": False,
            "name": "datasource", "options": [], "query": "prometheus", "refresh": 1, "regex": "",
            "skipUrlSync": False, "type": "datasource"}


def v_query(name: str, label: str, query: str, multi: bool = True, all_value: str | None = None) -> dict:
    """A label_values() variable. allValue ".*" where a label can be empty (netns "" is the exporter's own)."""
    v = {"current": {}, "datasource": DS, "definition": query, "hide": 0, "includeAll": multi,
         "label": label, "multi": multi, "name": name, "options": [],
         "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
         "refresh": 2, "regex": "", "skipUrlSync": False, "sort": 1, "type": "query"}
    if all_value is not None:
        v["allValue"] = all_value
    return v


V_INSTANCE = v_query("instance", "Exporter", "label_values(kvmnet_scrape_collector_success, instance)")
V_NETNS = v_query("netns", "Namespace", f"label_values(kvmnet_bridge_up{{{INST}}}, netns)", all_value=".*")
V_BRIDGE = v_query("bridge", "Bridge", f"label_values(kvmnet_bridge_up{{{NS}}}, bridge)")
V_DEVICE = v_query("device", "Port", f"label_values(kvmnet_port_up{{{BR}}}, device)")
V_GUEST_NETNS = v_query("netns", "Namespace", f"label_values(kvmnet_guest_up{{{INST}}}, netns)", all_value=".*")
V_GUESTS = v_query("guest", "Guest", f"label_values(kvmnet_guest_up{{{NS}}}, guest)")
V_GUEST1 = v_query("guest", "Guest", f"label_values(kvmnet_guest_up{{{INST}}}, guest)", multi=False)


# ---------------------------------------------------------------------------------------------------- panels

class Layout:
    """Places panels left to right in rows of 24 columns and numbers them."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = self.y = 0
        self.row_h = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                            "id": self._id(), "panels": [], "title": title, "type": "row"})
        self.y += 1

    def add(self, panel: dict, w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self) -> None:
        self.y += self.row_h
        self.x = self.row_h = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str = "time_series") -> dict:
    t = {"datasource": DS, "editorMode": "code", "expr": " ".join(expr.split()), "legendFormat": legend or "__auto",
         "refId": ref, "range": not instant, "instant": instant}
    if fmt != "time_series":
        t["format"] = fmt
    return t


def refs(*targets: dict) -> list[dict]:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return list(targets)


def timeseries(title: str, targets: list[dict], unit: str, description: str = "", stack: bool = False,
               negative_y: str | None = None, bars: bool = False, min0: bool = True, overrides=None) -> dict:
    custom = {"drawStyle": "bars" if bars else "line", "lineWidth": 1, "fillOpacity": 40 if bars else 10,
              "showPoints": "never", "spanNulls": False, "axisSoftMin": 0 if min0 and not negative_y else None,
              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    custom = {k: v for k, v in custom.items() if v is not None}
    ov = list(overrides or [])
    if negative_y:
        ov.append({"matcher": {"id": "byRegexp", "options": negative_y},
                   "properties": [{"id": "custom.transform", "value": "negative-Y"}]})
    return {"datasource": DS, "description": description, "type": "timeseries", "title": title,
            "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"}},
                            "overrides": ov},
            "options": {"legend": {"displayMode": "table", "placement": "right", "showLegend": True,
                                   "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


UPDOWN = [{"type": "value", "options": {"0": {"text": "DOWN", "color": "red", "index": 0},
                                         "1": {"text": "UP", "color": "green", "index": 1}}}]
CARRIER = [{"type": "value", "options": {"0": {"text": "NO CARRIER", "color": "red", "index": 0},
                                          "1": {"text": "CARRIER", "color": "green", "index": 1}}}]
OKFAIL = [{"type": "value", "options": {"0": {"text": "FAILING", "color": "red", "index": 0},
                                         "1": {"text": "OK", "color": "green", "index": 1}}}]
STP_STATES = ["disabled", "listening", "learning", "forwarding", "blocking"]
STP_COLOURS = ["text", "yellow", "blue", "green", "red"]
STP = [{"type": "value", "options": {str(i): {"text": s, "color": c, "index": i}
                                     for i, (s, c) in enumerate(zip(STP_STATES, STP_COLOURS))}}]
# kvmnet_guest_state's states (exporter/sources/identity.py GUEST_STATES), in that order.
RUN_STATES = ["running", "paused", "shutdown", "shutoff", "crashed", "pmsuspended", "blocked", "unknown"]
RUN_COLOURS = ["green", "yellow", "blue", "text", "red", "yellow", "orange", "text"]
RUN = [{"type": "value", "options": {str(i): {"text": s, "color": c, "index": i}
                                     for i, (s, c) in enumerate(zip(RUN_STATES, RUN_COLOURS))}}]


def stat(title: str, targets: list[dict], unit: str, description: str = "", mappings=None, thresholds=None,
         colour_mode: str = "value") -> dict:
    th = thresholds or [{"color": "green", "value": None}]
    return {"datasource": DS, "description": description, "type": "stat", "title": title, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or [],
                                         "thresholds": {"mode": "absolute", "steps": th},
                                         "color": {"mode": "thresholds"}}, "overrides": []},
            "options": {"colorMode": colour_mode, "graphMode": "area", "justifyMode": "auto",
                        "orientation": "auto", "textMode": "auto", "wideLayout": True,
                        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}}


def state_timeline(title: str, targets: list[dict], unit: str, mappings, description: str = "") -> dict:
    return {"datasource": DS, "description": description, "type": "state-timeline", "title": title,
            "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings, "color": {"mode": "thresholds"},
                                         "thresholds": {"mode": "absolute",
                                                        "steps": [{"color": "green", "value": None}]},
                                         "custom": {"fillOpacity": 80, "lineWidth": 0}},
                            "overrides": []},
            "options": {"mergeValues": True, "showValue": "auto", "alignValue": "left", "rowHeight": 0.9,
                        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
                        "tooltip": {"mode": "single", "sort": "none"}}}


def heatmap(title: str, expr: str, description: str = "") -> dict:
    return {"datasource": DS, "description": description, "type": "heatmap", "title": title,
            "targets": [target(expr, "{{le}}", fmt="heatmap")],
            "fieldConfig": {"defaults": {"unit": "s", "custom": {"scaleDistribution": {"type": "linear"},
                                                                 "hideFrom": {"legend": False, "tooltip": False,
                                                                              "viz": False}}},
                            "overrides": []},
            "options": {"calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left", "unit": "s"},
                        "rowsFrame": {"layout": "auto"}, "color": {"mode": "scheme", "scheme": "Oranges",
                                                                   "scale": "exponential", "exponent": 0.5,
                                                                   "fill": "dark-orange", "steps": 64},
                        "cellValues": {"unit": "short"}, "filterValues": {"le": 1e-9},
                        "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": False},
                        "legend": {"show": True}, "exemplars": {"color": "rgba(255,0,255,0.7)"}}}


def table(title: str, targets: list[dict], unit: str, overrides: list[dict], organize: dict,
          description: str = "", sort_by: str | None = None) -> dict:
    return {"datasource": DS, "description": description, "type": "table", "title": title, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "custom": {"align": "auto", "cellOptions": {"type": "auto"},
                                                                  "filterable": True},
                                         "mappings": [], "thresholds": {"mode": "absolute",
                                                                        "steps": [{"color": "green",
                                                                                   "value": None}]}},
                            "overrides": overrides},
            "options": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"]},
                        "sortBy": [{"displayName": sort_by, "desc": False}] if sort_by else []},
            "transformations": [{"id": "merge", "options": {}},
                                {"id": "organize", "options": organize}]}


def col(name: str, unit: str | None = None, mappings=None, cell: str | None = None, thresholds=None) -> dict:
    props = []
    if unit:
        props.append({"id": "unit", "value": unit})
    if mappings:
        props.append({"id": "mappings", "value": mappings})
    if cell:
        props.append({"id": "custom.cellOptions", "value": {"type": cell}})
    if thresholds:
        props.append({"id": "thresholds", "value": {"mode": "absolute", "steps": thresholds}})
        props.append({"id": "color", "value": {"mode": "thresholds"}})
    return {"matcher": {"id": "byName", "options": name}, "properties": props}


def dashboard(uid: str, title: str, description: str, variables: list[dict], panels: list[dict]) -> dict:
    return {
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [{"asDropdown": False, "icon": "external link", "includeVars": True, "keepTime": True,
                   "tags": ["kvmnet"], "targetBlank": False, "title": "kvmnet", "type": "dashboards"}],
        "liveNow": False,
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["kvmnet", "kvm", "network"],
        "templating": {"list": variables},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


# ---------------------------------------------------------------------------------------------------- overview

def overview() -> dict:
    L = Layout()
    L.row("Guests")
    L.add(stat("Guests answering", [target(f"sum(kvmnet_guest_up{{{GUESTS}}})", "up", instant=True)], "short",
               "Guests that answer the kvmnet prober now.", colour_mode="value"), 4, 4)
    L.add(stat("Guests not answering", [target(f"count(kvmnet_guest_up{{{GUESTS}}} == 0) or vector(0)",
                                              "down", instant=True)], "short",
               "Guests the prober considers down (down_after consecutive losses).",
               thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}],
               colour_mode="background"), 4, 4)
    L.add(stat("Ports without carrier", [target(f"count(kvmnet_port_up{{{NS}}} == 0) or vector(0)",
                                               "no carrier", instant=True)], "short",
               "Bridge ports with no carrier: a tap whose QEMU died, an unplugged uplink, a veth whose peer is gone.",
               thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}],
               colour_mode="background"), 4, 4)
    L.add(stat("Worst loss (5m)", [target(f"max(kvmnet:guest_ping_loss:ratio_rate5m{{{GUESTS}}})", "loss",
                                          instant=True)], "percentunit",
               "Highest ping loss ratio of any selected guest over 5 minutes (recording rule).",
               thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.01},
                           {"color": "red", "value": 0.05}]), 4, 4)
    L.add(stat("Worst RTT p90 (1m)", [target(f"max(kvmnet:guest_ping_rtt_seconds:p90_rate1m{{{GUESTS}}})",
                                             "p90", instant=True)], "s",
               "Highest 90th percentile ping RTT of any selected guest over the last minute (recording rule)."), 4, 4)
    L.add(stat("Firing kvmnet alerts", [target('count(ALERTS{alertname=~"Kvmnet.*",alertstate="firing"}) '
                                               'or vector(0)', "firing", instant=True)], "short",
               "Alerts from kvmnet.rules.yml firing in this Prometheus.",
               thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}],
               colour_mode="background"), 4, 4)
    L.add(table("Guests", refs(
        target(f"max by (instance, netns, guest) (kvmnet_guest_up{{{GUESTS}}})", instant=True, fmt="table"),
        target(f"max by (instance, netns, guest) (kvmnet:guest_ping_loss:ratio_rate5m{{{GUESTS}}})", instant=True,
               fmt="table"),
        target(f"max by (instance, netns, guest) (kvmnet:guest_ping_rtt_seconds:p50_rate1m{{{GUESTS}}})",
               instant=True, fmt="table"),
        target(f"max by (instance, netns, guest) (kvmnet:guest_ping_rtt_seconds:p90_rate1m{{{GUESTS}}})",
               instant=True, fmt="table"),
        target(f"max by (instance, netns, guest, address, bridge, device) (kvmnet_guest_info{{{GUESTS}}})",
               instant=True, fmt="table")), "none",
        [col("State", mappings=UPDOWN, cell="color-background"),
         col("Loss (5m)", "percentunit", cell="color-text",
             thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.01},
                         {"color": "red", "value": 0.05}]),
         col("RTT p50 (1m)", "s"), col("RTT p90 (1m)", "s"),
         {"matcher": {"id": "byName", "options": "Guest"},
          "properties": [{"id": "links", "value": [{"title": "Guest dashboard",
                                                    "url": "/d/kvmnet-guest/kvmnet-guest?${datasource:queryparam}"
                                                           "&var-instance=${__data.fields.instance}"
                                                           "&var-guest=${__value.raw}"}]}]}],
        {"excludeByName": {"Time": True, "job": True, "Value #E": True, "__name__": True},
         "indexByName": {"guest": 0, "Value #A": 1, "Value #B": 2, "Value #C": 3, "Value #D": 4, "address": 5,
                         "bridge": 6, "device": 7, "netns": 8, "instance": 9},
         "renameByName": {"guest": "Guest", "Value #A": "State", "Value #B": "Loss (5m)", "Value #C": "RTT p50 (1m)",
                          "Value #D": "RTT p90 (1m)", "address": "Address", "bridge": "Bridge", "device": "Port",
                          "netns": "Probed from"}},
        "Every probed guest: up or down now, loss over 5 minutes, RTT percentiles over the last minute, and the "
        "bridge port it sits on.", sort_by="Guest"), 24, 8)
    L.add(heatmap("RTT distribution (all selected guests)",
                  f"sum by (le) (increase(kvmnet_guest_ping_rtt_seconds_bucket{{{GUESTS}}}[$__rate_interval]))",
                  "Replies per RTT bucket of the prober's histogram, per interval."), 12, 9)
    L.add(timeseries("Ping loss per guest", [target(f"kvmnet:guest_ping_loss:ratio_rate1m{{{GUESTS}}}",
                                                    "{{guest}}")], "percentunit",
                     "1 - replies/requests over the last minute (recording rule kvmnet:guest_ping_loss:ratio_rate1m)."),
          12, 9)
    L.add(timeseries("RTT p90 per guest", [target(f"kvmnet:guest_ping_rtt_seconds:p90_rate1m{{{GUESTS}}}",
                                                  "{{guest}}")], "s",
                     "90th percentile ping RTT over the last minute (recording rule)."), 12, 8)
    L.add(state_timeline("Guest up/down", [target(f"kvmnet_guest_up{{{GUESTS}}}", "{{guest}}")], "none", UPDOWN,
                         "1 while the guest answers ping."), 12, 8)

    L.row("Bridges")
    L.add(timeseries("Bridge traffic (sum over ports)", refs(
        target(f"8 * sum by (netns, bridge) (rate(kvmnet_port_receive_bytes_total{{{BR}}}[$__rate_interval]))",
               "{{bridge}} in from ports"),
        target(f"8 * sum by (netns, bridge) (rate(kvmnet_port_transmit_bytes_total{{{BR}}}[$__rate_interval]))",
               "{{bridge}} out to ports")), "bps",
        "What the bridge switches: bits received from all its ports (up) and sent out of them (down). Broadcasts "
        "count once in and once per port out.", negative_y=".* out to ports"), 12, 8)
    L.add(timeseries("Bridge device traffic (host stack)", refs(
        target(f"8 * rate(kvmnet_bridge_receive_bytes_total{{{BR}}}[$__rate_interval])", "{{bridge}} receive"),
        target(f"8 * rate(kvmnet_bridge_transmit_bytes_total{{{BR}}}[$__rate_interval])", "{{bridge}} transmit")),
        "bps", "The bridge device's own counters: traffic between the bridge and the host's IP stack.",
        negative_y=".* transmit"), 12, 8)
    L.add(timeseries("Drops and errors per bridge", refs(
        target(f"sum by (netns, bridge) (rate(kvmnet_port_receive_dropped_total{{{BR}}}[$__rate_interval]) "
               f"+ rate(kvmnet_port_transmit_dropped_total{{{BR}}}[$__rate_interval]))", "{{bridge}} port drops"),
        target(f"sum by (netns, bridge) (rate(kvmnet_port_receive_errors_total{{{BR}}}[$__rate_interval]) "
               f"+ rate(kvmnet_port_transmit_errors_total{{{BR}}}[$__rate_interval]))", "{{bridge}} port errors"),
        target(f"rate(kvmnet_bridge_receive_dropped_total{{{BR}}}[$__rate_interval]) "
               f"+ rate(kvmnet_bridge_transmit_dropped_total{{{BR}}}[$__rate_interval])", "{{bridge}} device drops"),
        target(f"rate(kvmnet_bridge_receive_errors_total{{{BR}}}[$__rate_interval]) "
               f"+ rate(kvmnet_bridge_transmit_errors_total{{{BR}}}[$__rate_interval])", "{{bridge}} device errors")),
        "pps", "Packets dropped and errors per second: summed over the bridge's ports, and on the bridge device."),
        12, 8)
    L.add(timeseries("Ports with and without carrier", refs(
        target(f"sum by (netns, bridge) (kvmnet_port_up{{{BR}}})", "{{bridge}} up"),
        target(f"sum by (netns, bridge) (1 - kvmnet_port_up{{{BR}}})", "{{bridge}} no carrier")), "short",
        "Bridge ports by carrier. A tap without carrier has no QEMU holding it.",
        overrides=[{"matcher": {"id": "byRegexp", "options": ".* no carrier"},
                    "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}]}]), 12, 8)
    L.add(timeseries("FDB entries per bridge", [target(
        f"sum by (netns, bridge, type) (kvmnet_bridge_fdb_entries{{{BR}}})", "{{bridge}} {{type}}")], "short",
        "Forwarding database size by kind: local (the bridge's own ports), static (added by hand or by "
        "libvirt), learned (MACs seen on ports). The learned budget is kvmnet:fdb_learned_limit.",
        stack=False), 12, 8)
    L.add(table("Bridges", refs(
        target(f"max by (instance, netns, bridge) (kvmnet_bridge_up{{{BR}}})", instant=True, fmt="table"),
        target(f"max by (instance, netns, bridge) (kvmnet_bridge_ports{{{BR}}})", instant=True, fmt="table"),
        target(f"sum by (instance, netns, bridge) (1 - kvmnet_port_up{{{BR}}})", instant=True, fmt="table"),
        target(f'sum by (instance, netns, bridge) (kvmnet_bridge_fdb_entries{{{BR},type="learned"}})',
               instant=True, fmt="table")), "none",
        [col("State", mappings=UPDOWN, cell="color-background"), col("Ports", "short"),
         col("Without carrier", "short", cell="color-text",
             thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}]),
         col("Learned MACs", "short")],
        {"excludeByName": {"Time": True, "job": True, "__name__": True},
         "indexByName": {"bridge": 0, "Value #A": 1, "Value #B": 2, "Value #C": 3, "Value #D": 4, "netns": 5},
         "renameByName": {"bridge": "Bridge", "Value #A": "State", "Value #B": "Ports", "Value #C": "Without carrier",
                          "Value #D": "Learned MACs", "netns": "Namespace", "instance": "Exporter"}},
        "Each bridge: operational state, ports, ports without carrier, learned MACs.", sort_by="Bridge"), 12, 8)

    L.row("Exporter")
    L.add(timeseries("Collector duration", [target(
        f"kvmnet_scrape_collector_duration_seconds{{{INST}}}", "{{collector}} {{netns}}")], "s",
        "Time each collector took in the last scrape."), 8, 7)
    L.add(state_timeline("Collector success", [target(
        f"kvmnet_scrape_collector_success{{{INST}}}", "{{collector}} {{netns}}")], "none", OKFAIL,
        "0: the collector failed in that scrape; the exporter's log says why (event=collector_failed)."), 8, 7)
    L.add(timeseries("Scrape", refs(
        target(f"scrape_duration_seconds{{{INST}}}", "{{instance}} scrape duration"),
        target(f"up{{{INST}}}", "{{instance}} up")), "s",
        "Prometheus' view of the exporter: how long a scrape takes, and up (1/0, shown on the right axis).",
        overrides=[{"matcher": {"id": "byRegexp", "options": ".* up"},
                    "properties": [{"id": "unit", "value": "none"},
                                   {"id": "custom.axisPlacement", "value": "right"},
                                   {"id": "max", "value": 1}]}]), 8, 7)
    return dashboard("kvmnet-overview", "kvmnet / Overview",
                     "KVM/QEMU bridge networking: bridges, ports, guests' reachability, and the exporter's health.",
                     [v_datasource(), V_INSTANCE, V_NETNS, V_BRIDGE, V_GUESTS], L.panels)


# ---------------------------------------------------------------------------------------------------- bridge

def bridge() -> dict:
    L = Layout()
    L.row("Traffic per port (host's view: a tap's transmit is its guest's receive)")
    L.add(timeseries("Bits per port", refs(
        target(f"8 * rate(kvmnet_port_receive_bytes_total{{{DEV}}}[$__rate_interval])", "{{device}} in (from port)"),
        target(f"8 * rate(kvmnet_port_transmit_bytes_total{{{DEV}}}[$__rate_interval])", "{{device}} out (to port)")),
        "bps", "Received by the bridge from each port (up) and sent out of it (down).",
        negative_y=r".* out \(to port\)"), 12, 9)
    L.add(timeseries("Packets per port", refs(
        target(f"rate(kvmnet_port_receive_packets_total{{{DEV}}}[$__rate_interval])", "{{device}} in (from port)"),
        target(f"rate(kvmnet_port_transmit_packets_total{{{DEV}}}[$__rate_interval])", "{{device}} out (to port)")),
        "pps", "Packets received from each port (up) and sent out of it (down).",
        negative_y=r".* out \(to port\)"), 12, 9)
    L.row("Drops and errors")
    L.add(timeseries("Drops per port", refs(
        target(f"rate(kvmnet_port_receive_dropped_total{{{DEV}}}[$__rate_interval])", "{{device}} in dropped"),
        target(f"rate(kvmnet_port_transmit_dropped_total{{{DEV}}}[$__rate_interval])", "{{device}} out dropped")),
        "pps", "Out drops on a tap: its guest did not take the frames (queue full, hung guest, no carrier).",
        negative_y=".* out dropped"), 8, 8)
    L.add(timeseries("Errors per port", refs(
        target(f"rate(kvmnet_port_receive_errors_total{{{DEV}}}[$__rate_interval])", "{{device}} in errors"),
        target(f"rate(kvmnet_port_transmit_errors_total{{{DEV}}}[$__rate_interval])", "{{device}} out errors")),
        "pps", "Errors per second on each port.", negative_y=".* out errors"), 8, 8)
    L.add(timeseries("Bridge device drops and errors", refs(
        target(f"rate(kvmnet_bridge_receive_dropped_total{{{BR}}}[$__rate_interval])", "{{bridge}} rx dropped"),
        target(f"rate(kvmnet_bridge_transmit_dropped_total{{{BR}}}[$__rate_interval])", "{{bridge}} tx dropped"),
        target(f"rate(kvmnet_bridge_receive_errors_total{{{BR}}}[$__rate_interval])", "{{bridge}} rx errors"),
        target(f"rate(kvmnet_bridge_transmit_errors_total{{{BR}}}[$__rate_interval])", "{{bridge}} tx errors")),
        "pps", "The bridge device itself (host stack side)."), 8, 8)
    L.row("Forwarding database")
    L.add(timeseries("FDB entries per port by kind", [target(
        f"kvmnet_port_fdb_entries{{{DEV}}}", "{{device}} {{type}}")], "short",
        "Entries per port: local (the port's own MAC), static, learned (MACs seen behind the port). A guest's tap "
        "should hold one learned MAC; many mean a guest flooding or spoofing (KvmnetPortMacFlood).",
        stack=False), 12, 9)
    L.add(table("FDB entries per port (now)", refs(
        target(f'sum by (instance, netns, bridge, device) (kvmnet_port_fdb_entries{{{DEV},type="learned"}})',
               instant=True, fmt="table"),
        target(f'sum by (instance, netns, bridge, device) (kvmnet_port_fdb_entries{{{DEV},type="static"}})',
               instant=True, fmt="table"),
        target(f'sum by (instance, netns, bridge, device) (kvmnet_port_fdb_entries{{{DEV},type="local"}})',
               instant=True, fmt="table"),
        target(f"max by (instance, netns, bridge, device, kind, guest) (kvmnet_port_info{{{DEV}}})",
               instant=True, fmt="table")), "short",
        [col("kind", "none"), col("guest", "none")],
        {"excludeByName": {"Time": True, "job": True, "type": True, "Value #D": True, "__name__": True},
         "indexByName": {"bridge": 0, "device": 1, "kind": 2, "guest": 3, "Value #A": 4, "Value #B": 5, "Value #C": 6},
         "renameByName": {"bridge": "Bridge", "device": "Port", "kind": "Kind", "guest": "Guest",
                          "Value #A": "Learned", "Value #B": "Static", "Value #C": "Local", "netns": "Namespace",
                          "instance": "Exporter"}},
        "Each port with its kind, the guest behind it (when known) and its FDB entries by kind.", sort_by="Port"),
        12, 9)
    L.add(timeseries("Learned MACs against the kernel's limit", refs(
        target(f"kvmnet_bridge_fdb_learned_entries{{{BR}}}", "{{bridge}} learned"),
        target(f"kvmnet_bridge_fdb_learned_limit{{{BR}}} > 0", "{{bridge}} limit (fdb_max_learned)")), "short",
        "Learned entries as the kernel counts them, and the bridge's fdb_max_learned where one is set (kernel "
        "6.8+). At the limit new MACs are silently not learned and their traffic floods "
        "(KvmnetBridgeFdbLimitReached)."),
        8, 8)
    L.add(timeseries("MAC moves onto each port", [target(
        f"increase(kvmnet_port_fdb_moves_total{{{DEV}}}[$__rate_interval])", "{{device}}")], "short",
        "Learned MACs that moved onto the port from another port: a loop, a cloned guest or spoofing when it keeps "
        "happening (KvmnetFdbMacFlapping). The exporter logs event=fdb_move with the MAC.", bars=True), 8, 8)
    L.add(table("Guests and their configured MACs", [target(
        f"max by (instance, netns, bridge, device, guest, mac) (kvmnet_guest_mac_conflict{{{BR}}})",
        instant=True, fmt="table")], "short", [col("mac", "none"), col("guest", "none")],
        {"excludeByName": {"Time": True, "job": True, "__name__": True},
         "renameByName": {"bridge": "Bridge", "device": "Port", "guest": "Guest", "mac": "MAC",
                          "Value": "Guests with it", "netns": "Namespace", "instance": "Exporter"}},
        "From the guests' identity (QEMU, libvirt, lab file): how many guests on the bridge are configured with each "
        "guest's MAC; more than 1 is a conflict (KvmnetGuestMacConflict).", sort_by="MAC"), 8, 8)
    L.row("Tap queues (root qdisc per port)")
    L.add(timeseries("Qdisc drops and overlimits per port", refs(
        target(f"rate(kvmnet_port_qdisc_drops_total{{{DEV}}}[$__rate_interval])", "{{device}} drops"),
        target(f"rate(kvmnet_port_qdisc_overlimits_total{{{DEV}}}[$__rate_interval])", "{{device}} overlimits"),
        target(f"rate(kvmnet_port_qdisc_requeues_total{{{DEV}}}[$__rate_interval])", "{{device}} requeues")),
        "pps", "Drops on a shaped tap (tbf/htb, as Proxmox and OpenStack limit guests) mean its rate limit is hit "
        "(KvmnetPortQdiscDrops); overlimits count packets held back by the shaper."), 8, 8)
    L.add(timeseries("Qdisc backlog per port", refs(
        target(f"kvmnet_port_qdisc_backlog_bytes{{{DEV}}}", "{{device}} bytes")), "bytes",
        "Bytes waiting in the port's root qdisc towards its guest."), 8, 8)
    L.add(timeseries("Transmit queue length per port", [target(
        f"kvmnet_port_transmit_queue_length{{{DEV}}}", "{{device}}")], "short",
        "IFLA_TXQLEN in packets: how much the host may queue towards a guest (`ip link set DEV txqueuelen N`)."),
        8, 8)
    L.row("Carrier and spanning tree")
    L.add(state_timeline("Carrier per port", [target(f"kvmnet_port_up{{{DEV}}}", "{{device}}")], "none", CARRIER,
                         "IFF_LOWER_UP: a tap has carrier while a process (its QEMU) holds it."), 12, 9)
    L.add(timeseries("Carrier changes", [target(
        f"increase(kvmnet_port_carrier_changes_total{{{DEV}}}[$__rate_interval])", "{{device}}")], "short",
        "Carrier flaps per interval: a guest restarting, a QEMU dying, an uplink flapping.", bars=True), 12, 9)
    stp_expr = " or ".join(
        f'(kvmnet_port_stp_state{{{DEV},state="{s}"}} == 1) * {i}' for i, s in enumerate(STP_STATES))
    L.add(state_timeline("STP state per port", [target(
        f"max by (instance, netns, bridge, device) ({stp_expr})", "{{device}}")], "none", STP,
        "The kernel's port state. With STP off (the default) a port is forwarding, or disabled without carrier."),
        12, 9)
    L.add(timeseries("STP state changes", [target(
        f'changes(kvmnet_port_stp_state{{{DEV},state="forwarding"}}[$__range])', "{{device}}")], "short",
        "How often each port entered or left forwarding over the dashboard's range (KvmnetStpStateFlapping at "
        "4 in 15 minutes)."), 12, 9)
    L.add(timeseries("STP BPDUs, TCNs and transitions per port", refs(
        target(f'rate(kvmnet_port_stp_bpdus_total{{{DEV},direction="receive"}}[$__rate_interval])',
               "{{device}} BPDUs in"),
        target(f'rate(kvmnet_port_stp_bpdus_total{{{DEV},direction="transmit"}}[$__rate_interval])',
               "{{device}} BPDUs out"),
        target(f"rate(kvmnet_port_stp_tcns_total{{{DEV}}}[$__rate_interval])", "{{device}} TCNs {{direction}}"),
        target(f"increase(kvmnet_port_stp_transitions_total{{{DEV}}}[$__rate_interval])",
               "{{device}} to {{to}}")), "short",
        "From the bridge's STP xstats: BPDUs received on a guest port mean a guest speaks STP; TCNs and "
        "transitions to blocking mean the topology is changing."), 12, 9)
    L.add(table("STP root per bridge", refs(
        target(f"max by (instance, netns, bridge, root_id) (kvmnet_bridge_stp_root_info{{{BR}}})",
               instant=True, fmt="table"),
        target(f"max by (instance, netns, bridge) (kvmnet_bridge_stp_root_port{{{BR}}})", instant=True, fmt="table"),
        target(f"max by (instance, netns, bridge) (kvmnet_bridge_stp_root_path_cost{{{BR}}})", instant=True,
               fmt="table")), "short", [col("root_id", "none")],
        {"excludeByName": {"Time": True, "job": True, "__name__": True, "Value #A": True},
         "renameByName": {"bridge": "Bridge", "root_id": "Root", "Value #B": "Root port",
                          "Value #C": "Path cost", "netns": "Namespace", "instance": "Exporter"}},
        "Who the bridge believes is root; root port 0 means it is the root itself (KvmnetStpRootChanged).",
        sort_by="Bridge"), 12, 9)
    return dashboard("kvmnet-bridge", "kvmnet / Bridge",
                     "One bridge's ports: traffic in both directions, drops, errors, FDB by kind and its learning "
                     "limit, MAC moves, tap queues, carrier, STP and its root.",
                     [v_datasource(), V_INSTANCE, V_NETNS, V_BRIDGE, V_DEVICE], L.panels)


# ---------------------------------------------------------------------------------------------------- guest

def guest() -> dict:
    L = Layout()
    # The guest's port: kvmnet_port_info carries the guest's name (QEMU, libvirt or lab file), in the bridge's
    # namespace; a port counter joined with it keeps only this guest's tap.
    # Its NICs: the tap (or a light guest's veth, or a macvtap), not Proxmox's firewall veths fwlnNiM/fwprNpM,
    # which carry the guest's name but every guest's frames.
    NIC = f'{GUEST1},device!~"fw(ln|pr)[0-9]+[ip][0-9]+"'
    PORT = f"* on (instance, netns, bridge, device) group_left (guest) kvmnet_port_info{{{NIC}}}"

    def gview(direction: str, unit: str) -> str:
        """The guest's `direction` (receive/transmit) of its NICs, from the host's counters: a tap's transmit is
        its guest's receive (a light guest's veth too); a macvtap's receive is."""
        other = "transmit" if direction == "receive" else "receive"
        join = "* on (instance, netns, bridge, device) group_left (guest) kvmnet_port_info"
        return (f'(rate(kvmnet_port_{other}_{unit}_total[$__rate_interval]) {join}{{{NIC},kind!="macvtap"}}'
                f' or rate(kvmnet_port_{direction}_{unit}_total[$__rate_interval]) {join}{{{NIC},kind="macvtap"}})')
    L.add(stat("Answers ping", [target(f"kvmnet_guest_up{{{GUEST1}}}", "{{netns}}", instant=True)], "none",
               "The prober's verdict now.", mappings=UPDOWN, colour_mode="background"), 4, 4)
    L.add(stat("Loss (5m)", [target(f"kvmnet:guest_ping_loss:ratio_rate5m{{{GUEST1}}}", "{{netns}}",
                                    instant=True)], "percentunit", "1 - replies/requests over 5 minutes.",
               thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.01},
                           {"color": "red", "value": 0.05}]), 4, 4)
    L.add(stat("RTT p50 (1m)", [target(f"kvmnet:guest_ping_rtt_seconds:p50_rate1m{{{GUEST1}}}", "{{netns}}",
                                       instant=True)], "s", "Median ping RTT over the last minute."), 4, 4)
    L.add(stat("RTT mean, 1h baseline", [target(f"kvmnet:guest_ping_rtt_seconds:mean_rate1h{{{GUEST1}}}",
                                                "{{netns}}", instant=True)], "s",
               "The guest's own baseline that KvmnetGuestLatencyHigh compares with."), 4, 4)
    L.add(stat("Last reply", [target(f"time() - kvmnet_guest_last_reply_timestamp_seconds{{{GUEST1}}} "
                                     f"and kvmnet_guest_last_reply_timestamp_seconds{{{GUEST1}}} > 0",
                                     "{{netns}}", instant=True)], "s", "Seconds since the last echo reply.",
               thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 5}]), 4, 4)
    L.add(table("Guest", refs(target(f"kvmnet_guest_info{{{GUEST1}}}", instant=True, fmt="table")), "none", [],
                {"excludeByName": {"Time": True, "job": True, "__name__": True, "Value": True},
                 "renameByName": {"guest": "Guest", "address": "Address", "mac": "MAC", "bridge": "Bridge",
                                  "device": "Port", "netns": "Probed from", "instance": "Exporter"}},
                "What the prober knows about the guest."), 4, 4)
    L.row("Reachability")
    L.add(timeseries("RTT percentiles", refs(
        target(f"kvmnet:guest_ping_rtt_seconds:p50_rate1m{{{GUEST1}}}", "p50"),
        target(f"kvmnet:guest_ping_rtt_seconds:p90_rate1m{{{GUEST1}}}", "p90"),
        target(f"kvmnet:guest_ping_rtt_seconds:p99_rate1m{{{GUEST1}}}", "p99"),
        target(f"kvmnet:guest_ping_rtt_seconds:mean_rate1m{{{GUEST1}}}", "mean"),
        target(f"kvmnet:guest_ping_rtt_seconds:mean_rate1h{{{GUEST1}}}", "mean, 1h baseline")), "s",
        "Percentiles from the prober's histogram over the last minute (bucket resolution), exact means from "
        "its sum and count."), 12, 9)
    L.add(timeseries("Loss", refs(
        target(f"kvmnet:guest_ping_loss:ratio_rate1m{{{GUEST1}}}", "loss (1m)"),
        target(f"kvmnet:guest_ping_loss:ratio_rate5m{{{GUEST1}}}", "loss (5m)")), "percentunit",
        "1 - replies/requests. KvmnetGuestPacketLoss: above 5% for 2 minutes."), 12, 9)
    L.add(heatmap("RTT distribution",
                  f"sum by (le) (increase(kvmnet_guest_ping_rtt_seconds_bucket{{{GUEST1}}}[$__rate_interval]))",
                  "Replies per RTT bucket, per interval."), 12, 8)
    L.add(timeseries("Probes", refs(
        target(f"rate(kvmnet_guest_ping_requests_total{{{GUEST1}}}[$__rate_interval])", "requests"),
        target(f"rate(kvmnet_guest_ping_replies_total{{{GUEST1}}}[$__rate_interval])", "replies"),
        target(f"rate(kvmnet_guest_ping_send_errors_total{{{GUEST1}}}[$__rate_interval])", "send errors")), "pps",
        "Echo requests sent, replies received in time, requests the kernel refused."), 12, 8)
    L.add(state_timeline("Up/down history", [target(f"kvmnet_guest_up{{{GUEST1}}}", "{{guest}}")], "none", UPDOWN,
                         "1 while the guest answers; 0 after down_after consecutive losses."), 24, 4)
    run_expr = " or ".join(f'(kvmnet_guest_state{{{GUEST1},state="{s}"}} == 1) * {i}'
                           for i, s in enumerate(RUN_STATES))
    # "unknown" (7) where nothing tells the state (no libvirt, no QMP): a probed guest without kvmnet_guest_state.
    unknown = f"max by (instance, netns, guest) (kvmnet_guest_up{{{GUEST1}}}) * 0 + {RUN_STATES.index('unknown')}"
    L.add(state_timeline("Run state", [target(f"max by (instance, netns, guest) ({run_expr}) or {unknown}",
                                              "{{guest}}")],
                         "none", RUN,
                         "libvirt's or QMP's run state: a paused or shut-off guest answers no ping on purpose "
                         "(its alerts are held back). Unknown when nothing tells the state (no libvirt, no QMP)."),
          24, 4)
    L.row("Its tap or macvtap, in the guest's view (guest receive = tap transmit = macvtap receive)")
    L.add(timeseries("Guest traffic (guest's view)", refs(
        target(f"8 * {gview('receive', 'bytes')}", "guest receive ({{device}})"),
        target(f"8 * {gview('transmit', 'bytes')}", "guest transmit ({{device}})")), "bps",
        "The guest's side of its NIC: what the host sends out of its tap (or receives on its macvtap: the other "
        "way round) the guest receives, and the reverse. Guest transmit is drawn below the axis.",
        negative_y="guest transmit.*"), 12, 8)
    L.add(timeseries("Guest packets (guest's view)", refs(
        target(gview("receive", "packets"), "guest receive ({{device}})"),
        target(gview("transmit", "packets"), "guest transmit ({{device}})")), "pps",
        "Packets, guest's view.", negative_y="guest transmit.*"), 12, 8)
    L.add(timeseries("Drops and errors (guest's view)", refs(
        target(f"rate(kvmnet_port_transmit_dropped_total[$__rate_interval]) {PORT}",
               "not delivered to guest (tap {{device}} transmit dropped)"),
        target(f"rate(kvmnet_port_receive_dropped_total[$__rate_interval]) {PORT}",
               "from guest, dropped (tap {{device}} receive dropped)"),
        target(f"(rate(kvmnet_port_transmit_errors_total[$__rate_interval]) "
               f"+ rate(kvmnet_port_receive_errors_total[$__rate_interval])) {PORT}",
               "errors (tap {{device}})")), "pps",
        "Frames the guest did not take (its queue full, the guest hung, or no QEMU on the tap), frames from the "
        "guest the host dropped, and errors."), 12, 8)
    L.add(state_timeline("Tap carrier", [target(f"kvmnet_port_up {PORT}", "tap {{device}}")], "none", CARRIER,
                         "The tap has carrier while the guest's QEMU holds it."), 12, 8)
    return dashboard("kvmnet-guest", "kvmnet / Guest",
                     "One guest: reachability, latency against its own baseline, loss, and its tap's traffic "
                     "in the guest's view.",
                     [v_datasource(), V_INSTANCE, V_GUEST1], L.panels)


DASHBOARDS = {"kvmnet-overview.json": overview, "kvmnet-bridge.json": bridge, "kvmnet-guest.json": guest}


def render(build) -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, build in DASHBOARDS.items():
        path, text = HERE / name, render(build)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"dashboards: out of date, run dashboards/generate.py: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
