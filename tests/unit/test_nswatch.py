"""The one namespace watcher (exporter/sources/nswatch.py) with a fake identity function, and the Service using it
to close a namespace's netlink source when the namespace goes, scraped or not."""
import pytest

from kvmnet.common.netns import NetnsGone
from kvmnet.exporter.service import Service, Settings, load
from kvmnet.exporter.sources.nswatch import NamespaceWatcher


class FakeNamespaces:
    def __init__(self, **inodes: int) -> None:
        self.inodes = dict(inodes)

    def inode(self, name: str) -> int:
        if name not in self.inodes:
            raise NetnsGone(f"network namespace {name!r} does not exist")
        return self.inodes[name]


def test_changes_are_told_once_and_the_first_sight_is_none():
    ns = FakeNamespaces(a=10, b=20)
    w = NamespaceWatcher(names=lambda: ["a", "b"], inode=ns.inode)
    heard = []
    w.subscribe(lambda name, ino: heard.append((name, ino)))
    w.check()
    assert heard == []
    del ns.inodes["a"]
    w.check()
    w.check()
    assert heard == [("a", None)]
    with pytest.raises(NetnsGone):
        w.identity("a")
    ns.inodes["a"] = 11  # created again under the same name
    assert w.identity("a") == 11
    ns.inodes["b"] = 21  # replaced between two looks, never seen gone
    w.check()
    assert heard == [("a", None), ("a", 11), ("b", 21)]


def test_a_failing_listener_does_not_silence_the_others():
    ns = FakeNamespaces(a=1)
    w = NamespaceWatcher(names=lambda: ["a"], inode=ns.inode)
    heard = []
    w.subscribe(lambda name, ino: 1 / 0)
    w.subscribe(lambda name, ino: heard.append(name))
    w.check()
    ns.inodes.clear()
    w.check()
    assert heard == ["a"]


def test_service_closes_the_source_of_a_namespace_that_goes():
    ns = FakeNamespaces(lab=5)
    closed = []

    class Source:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    settings = Settings(netns=["lab"], enabled={"identity": False})
    svc = Service(settings, load(settings), factories={}, source_factory=Source,
                  watcher=NamespaceWatcher(inode=ns.inode))
    svc.watcher.names = svc._namespaces
    svc.source("lab")
    svc.watcher.check()
    assert closed == []
    del ns.inodes["lab"]
    svc.watcher.check()  # what the service's watcher task does once a second
    assert closed == ["lab"]
