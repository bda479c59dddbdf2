"""The Calico HostAgent (backends/calico/host_agent.py): one watch of
/calico/v1/host/ feeds the policy and the route agent; its parts injected."""
import threading
import time

from netplugin.datastore.base import Event
from netplugin.datastore.embedded import EmbeddedDatastore

from backends.calico.agent import PolicyAgent
from backends.calico.host_agent import CalicoHostAgent, fan_out
from backends.calico.routes import RouteAgent


class Consumer:
    def __init__(self, prefixes, fail=False):
        self.watch_prefixes = prefixes
        self.got = []
        self.fail = fail

    def on_event(self, prefix, ev):
        self.got.append((prefix, ev.key))
        if self.fail:
            raise RuntimeError("consumer bug")


def test_fan_out_one_callback_per_prefix_each_consumer_its_own_spelling():
    policy = Consumer(("/calico/v1/policy/profile", "/calico/v1/host"), fail=True)
    routes = Consumer(("/calico/v1/host/", "/calico/ipam/v2/host/"))
    callbacks = fan_out([policy, routes])
    assert sorted(callbacks) == ["/calico/ipam/v2/host/", "/calico/v1/host/",
                                 "/calico/v1/policy/profile/"]
    callbacks["/calico/v1/host/"](Event("put", "/calico/v1/host/b/bird_ip", "10.0.0.2", 3))
    # the first consumer raising does not keep the event from the second
    assert policy.got == [("/calico/v1/host", "/calico/v1/host/b/bird_ip")]
    assert routes.got == [("/calico/v1/host/", "/calico/v1/host/b/bird_ip")]


def test_agents_name_the_prefixes_they_follow():
    assert set(PolicyAgent.watch_prefixes) == {"/calico/v1/policy/profile", "/calico/v1/host"}
    assert set(RouteAgent.watch_prefixes) == {"/calico/v1/host/", "/calico/ipam/v2/host/"}


class CountingWatches(EmbeddedDatastore):
    def __init__(self, path):
        super().__init__(path)
        self.watched = []

    def watch_prefix(self, prefix, callback, *a, **kw):
        self.watched.append(prefix)
        return super().watch_prefix(prefix, callback, *a, **kw)


class FedAgent(Consumer):
    """Stands for the policy/route agent: runs fed by the host agent's watch."""

    def __init__(self, prefixes, until=None):
        super().__init__(prefixes)
        self.until = until
        self.runs = []
        self.stopped = False

    def run(self, stop, watched=False):
        self.runs.append(watched)
        deadline = time.monotonic() + 10
        while not stop.is_set() and not self.stopped and time.monotonic() < deadline:
            if self.until is not None and self.until():
                return
            time.sleep(0.01)

    def stop(self):
        self.stopped = True

    def fail_closed_start(self):
        self.runs.append("fail closed")


def test_one_watch_of_the_host_prefix_feeds_both_agents(tmp_path):
    store = CountingWatches(str(tmp_path / "state.db"))
    try:
        key = "/calico/v1/host/b/workload/libnetwork/libnetwork/endpoint/e1"
        routes = FedAgent(RouteAgent.watch_prefixes)
        policy = FedAgent(PolicyAgent.watch_prefixes,
                          until=lambda: any(k == key for _, k in routes.got))
        started = []
        agent = CalicoHostAgent(store, policy=policy, routes=routes,
                                restart=lambda stop: started.append(stop))
        stop = threading.Event()
        t = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        t.start()
        deadline = time.monotonic() + 5
        while (len(policy.runs), len(routes.runs)) != (2, 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        store.put(key, "{}")
        t.join(10)
        assert not t.is_alive()
        assert sorted(store.watched) == ["/calico/ipam/v2/host/", "/calico/v1/host/",
                                         "/calico/v1/policy/profile/"]
        assert policy.runs == ["fail closed", True] and routes.runs == [True]
        assert routes.stopped
        assert ("/calico/v1/host", key) in policy.got and ("/calico/v1/host/", key) in routes.got
        assert len(started) == 1
    finally:
        store.close()
