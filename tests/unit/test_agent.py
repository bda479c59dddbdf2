"""The per-host agent loop: restarts a crashed host agent, stops on request."""
import threading

import netplugin.runtime
from netplugin import agent
from netplugin.config import config_from_text


class FlakyBackend:
    runs = 0

    def __init__(self, stop_after):
        self.stop_after = stop_after
        self.datastore = self
        self.stopped = 0

    def host_agent(self):
        return self          # its own HostAgent: run(stop)

    def run(self, stop):
        FlakyBackend.runs += 1
        if FlakyBackend.runs == 1:
            raise RuntimeError("first run crashes")
        stop.set()

    def stop(self):
        self.stopped += 1

    def close(self):
        pass


def test_agent_restarts_after_crash_and_stops(monkeypatch):
    made = []

    def build(cfg):
        made.append(FlakyBackend(2))
        return made[-1]

    monkeypatch.setattr(netplugin.runtime, "build_backend", build)
    monkeypatch.setattr(agent, "MAX_BACKOFF", 0.01)
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(config_from_text(""), stop))
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert FlakyBackend.runs == 2 and len(made) == 2
    assert all(b.stopped == 1 for b in made)


def test_agent_retries_when_building_the_backend_raises(monkeypatch, tmp_path):
    """A backend that cannot even be built (datastore down, a bug) is built
    again after a backoff that doubles; the agent never exits by itself."""
    attempts = []
    waits = []
    stop = threading.Event()

    def build(cfg):
        attempts.append(1)
        if len(attempts) < 4:
            raise RuntimeError("cannot build")
        b = FlakyBackend(0)
        b.run = lambda ev: ev.set()
        return b

    real_wait = threading.Event.wait

    def wait(self, timeout=None):
        if self is stop and timeout is not None and \
                threading.current_thread().name == "agent-under-test":
            waits.append(timeout)
            return real_wait(self, 0.001)
        return real_wait(self, timeout)

    monkeypatch.setattr(netplugin.runtime, "build_backend", build)
    monkeypatch.setattr(threading.Event, "wait", wait)
    t = threading.Thread(target=agent.run, name="agent-under-test", args=(config_from_text(
        f'state_dir = "{tmp_path}"\n'), stop))
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert len(attempts) == 4
    assert waits == [0.5, 1.0, 2.0]
