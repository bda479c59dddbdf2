"""The per-host agent loop: restarts a crashed run_agent, stops on request."""
import threading

import netplugin.cli
from netplugin import agent
from netplugin.config import config_from_text


class FlakyBackend:
    runs = 0

    def __init__(self, stop_after):
        self.stop_after = stop_after
        self.datastore = self
        self.stopped = 0

    def run_agent(self, stop):
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

    monkeypatch.setattr(netplugin.cli, "build_backend", build)
    monkeypatch.setattr(agent, "MAX_BACKOFF", 0.01)
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(config_from_text(""), stop))
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert FlakyBackend.runs == 2 and len(made) == 2
    assert all(b.stopped == 1 for b in made)
