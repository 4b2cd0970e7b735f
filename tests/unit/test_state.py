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


def test_journal_replays_intents_and_identities_and_ignores_a_torn_last_line(tmp_path):
    from kvmnet.setup.state import State
    st = State("lab2", root=tmp_path)
    st.add({"op": "netns", "name": "h", "t": 1.0})
    st.save()                                                     # first save: state.json whole
    item = {"op": "link", "ns": "h", "name": "br0", "ifindex": 77}
    st.add(item)
    st.save()                                                     # appended
    item["nsino"] = [4, 5]
    st.touch(item)
    st.save()
    assert (tmp_path / "lab2" / "journal.jsonl").read_text().count("\n") == 2
    with open(tmp_path / "lab2" / "journal.jsonl", "a") as f:
        f.write('{"op": "link", "ns": "h", "na')                  # a write cut short by kill -9
    again = State("lab2", root=tmp_path)
    assert again.created == [{"op": "netns", "name": "h", "t": 1.0},
                             {"op": "link", "ns": "h", "name": "br0", "ifindex": 77, "nsino": [4, 5]}]
    again.remove({"op": "netns", "name": "h"})
    again.save()                                                  # a removal rewrites state.json, folds the journal
    assert not (tmp_path / "lab2" / "journal.jsonl").exists()
    assert [i["op"] for i in State("lab2", root=tmp_path).created] == ["link"]


def test_a_corrupt_record_is_one_line_not_a_traceback(tmp_path):
    import pytest

    from kvmnet.setup.state import State, StateError
    (tmp_path / "lab3").mkdir()
    (tmp_path / "lab3" / "state.json").write_text('{"created": [1, 2]}')
    with pytest.raises(StateError, match=r"state.json: unreadable record"):
        State("lab3", root=tmp_path)


def test_one_holder_at_a_time_and_the_holder_is_named(tmp_path):
    import pytest

    from kvmnet.setup.state import Busy, State
    a, b = State("lab4", root=tmp_path), State("lab4", root=tmp_path)
    a.lock()
    with pytest.raises(Busy, match=rf"lab lab4 is held by another kvmnet-setup run \(pid {os.getpid()}\)"):
        b.lock()
    a.add({"op": "netns", "name": "x"})
    a.save()
    a.created = []
    a.rewrite()
    a.save()                                                      # nothing left: the directory, lock file too
    assert not (tmp_path / "lab4").exists()
    b.lock()                                                      # locks the file that is there, not a dead one
    b.unlock()
    assert not (tmp_path / "lab4").exists()


def test_state_names_are_lab_names_never_paths(tmp_path):
    import pytest

    from kvmnet.setup.state import State
    for bad in ("..", "../x", "a/b", "", "x\n", "-x"):
        with pytest.raises(ValueError):
            State(bad, root=tmp_path)
