"""netplugin/reconcile.py: the generic observe -> desired -> diff -> apply loop."""
import threading
import time

import pytest

from netplugin.reconcile import Reconciler


def make(**kw):
    calls = []
    state = {"have": {"a", "stale"}, "want": {"a", "b"}}

    def observe():
        calls.append("observe")
        return set(state["have"])

    def desired():
        calls.append("desired")
        return set(state["want"])

    def diff(want, have):
        calls.append("diff")
        return {"add": want - have, "remove": have - want} if want != have else None

    def apply(changes):
        calls.append("apply")
        state["have"] = (state["have"] | changes["add"]) - changes["remove"]

    args = dict(observe=observe, desired=desired, diff=diff, apply=apply, interval=5.0)
    args.update(kw)
    return Reconciler("test", **args), calls, state


def test_one_run_observes_first_then_applies_the_diff():
    r, calls, state = make()
    assert r.step() == 5.0
    assert calls == ["observe", "desired", "diff", "apply"]
    assert state["have"] == {"a", "b"}
    calls.clear()
    r.step()
    assert calls == ["observe", "desired", "diff"]      # nothing to apply
    assert r.runs == 2


def test_failures_back_off_exponentially_up_to_the_cap():
    def broken():
        raise OSError("docker is down")
    r, calls, _ = make(desired=broken, retry=1.0, max_retry=5.0)
    assert [r.step() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert r.last_error == "docker is down"
    assert "apply" not in calls


def test_success_after_failures_resets_the_backoff():
    fail = {"on": True}

    def flaky():
        if fail["on"]:
            raise OSError("down")
        return {"a", "b"}
    r, _, state = make(desired=flaky, retry=1.0)
    r.step(), r.step()
    fail["on"] = False
    assert r.step() == 5.0 and r.failures == 0 and state["have"] == {"a", "b"}


def test_recheck_in_shortens_the_next_wait_once():
    r, _, _ = make()
    r.diff = lambda want, have: r.recheck_in(0.5)
    assert r.step() == 0.5
    r.diff = lambda want, have: None
    assert r.step() == 5.0


def test_run_loops_until_stopped_and_kick_runs_at_once():
    r, calls, _ = make(interval=30.0)
    stop = threading.Event()
    t = threading.Thread(target=r.run, args=(stop,))
    t.start()
    try:
        for _ in range(200):
            if r.runs == 1:
                break
            stop.wait(0.01)
        r.kick()
        for _ in range(200):
            if r.runs == 2:
                break
            stop.wait(0.01)
        assert r.runs == 2                               # not 30 s later
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        make(interval=0)


# event-driven runs: notify() with quiet/debounce, full vs change runs -------------


def test_notify_is_due_after_quiet_at_most_debounce_after_the_first(monkeypatch):
    import netplugin.reconcile as rec
    now = [100.0]
    monkeypatch.setattr(rec.time, "monotonic", lambda: now[0])
    r, _, _ = make(quiet=0.02, debounce=0.1)
    assert r.change_due() is None
    r.notify()
    assert r.change_due() == pytest.approx(100.02)
    for _ in range(10):                       # a burst: each event pushes it back...
        now[0] += 0.015
        r.notify()
    assert r.change_due() == pytest.approx(100.1)   # ...but not past the debounce
    r.notify(at_once=True)
    assert r.change_due() == pytest.approx(100.0)   # due now (since the first)


def test_change_runs_do_not_end_a_backoff_full_runs_do():
    fail = {"on": True}
    fulls = []
    r = None

    def desired():
        fulls.append(r.full)
        if r.full and fail["on"]:
            raise RuntimeError("list failed")
        return {"x"}

    r, calls, state = make(desired=desired, retry=1.0, max_retry=8.0)
    assert r.step() == 1.0 and r.failures == 1          # full run fails: backoff
    r.notify()
    delay = r.step(full=False)                          # a change run works meanwhile
    assert r.failures == 1 and 0 < delay <= 1.0          # the full retry stays due
    fail["on"] = False
    assert r.step() == 5.0 and r.failures == 0           # a full run ends the backoff
    assert fulls == [True, False, True]


def test_a_failing_change_run_brings_the_next_full_run_forward():
    def apply(changes):
        raise RuntimeError("apply failed")

    r, _, _ = make(apply=apply, retry=0.5, max_retry=4.0)
    r._full_at = None
    assert r.step(full=False) == pytest.approx(0.5, abs=0.05)
    assert r.failures == 1


def test_run_makes_a_change_run_soon_after_notify_and_stops_on_stop():
    seen = []
    r = None

    def desired():
        seen.append(r.full)
        return set()

    r, _, _ = make(desired=desired, observe=lambda: set(), interval=30.0, quiet=0.01,
                   debounce=0.05)
    stop = threading.Event()
    t = threading.Thread(target=r.run, args=(stop,), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.005)
    started = time.monotonic()
    r.notify()
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert seen == [True, False] and time.monotonic() - started < 1.0
    r.stop()                                   # stop() ends it like the event
    t.join(5)
    assert not t.is_alive()
    stop.set()
