"""The record `down` works from, and how kvmnet-ifup finds a tap's bridge in it."""
from __future__ import annotations

import json
import os

from kvmnet.setup.state import State, find_tap


def test_record_is_kept_once_and_survives_reload(tmp_path):
    st = State("lab1", root=tmp_path)
    assert not st.exists
    assert st.add({"op": "netns", "name": "h"})
    assert not st.add({"op": "netns", "name": "h"})             # the creator keeps it; a second `up` adds nothing
    st.add({"op": "flushed", "ns": "h", "dev": "eth1", "addresses": ["10.0.0.1/24"]})
    st.taps = {"vm1eth0": {"bridge": "br0", "netns": "h"}}
    st.save()
    again = State("lab1", root=tmp_path)
    assert again.created == st.created and again.taps == st.taps
    again.remove({"op": "netns", "name": "h"})
    assert [i["op"] for i in again.created] == ["flushed"]
    again.created, again.taps = [], {}
    again.save()                                                  # nothing left: the directory goes
    assert not (tmp_path / "lab1").exists()


def test_find_tap_prefers_the_entry_in_our_namespace(tmp_path):
    me = os.stat("/proc/self/ns/net").st_ino
    for lab, bridge, netns in (("a", "brA", "no-such-ns-kvmnet"), ("b", "brB", "")):
        (tmp_path / lab).mkdir()
        (tmp_path / lab / "taps.json").write_text(json.dumps({"vm1eth0": {"bridge": bridge, "netns": netns}}))
    # Both labs have a vm1eth0; only lab b's lives in this (the host's) namespace... when we are in it.
    host = os.stat("/proc/1/ns/net").st_ino if os.access("/proc/1/ns/net", os.R_OK) else None
    if host == me:
        assert find_tap("vm1eth0", me, root=tmp_path)["bridge"] == "brB"
    assert find_tap("vm1eth0", None, root=tmp_path)["bridge"] in ("brA", "brB")
    assert find_tap("other", me, root=tmp_path) is None
