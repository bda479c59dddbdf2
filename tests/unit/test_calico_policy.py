"""Calico policy: the profile -> nftables compiler (pure), the agent loop (fake
``apply``, real embedded datastore), and the real ``nft`` inside throwaway
network namespaces (syntax, atomic replace, idempotence, and a small routed
data path with "containers" in nested namespaces)."""
import json
import os
import socket
import textwrap
import threading
import time

import pytest

from backends.calico import agent as agent_mod, barrier, policy
from backends.calico.agent import PolicyAgent, _Prefix
from netplugin.datastore.base import Event, Item
from netplugin.datastore.embedded import EmbeddedDatastore
from tests.netns_runner import netns_unavailable_reason, run_in_netns

NET1 = "3df319d886f3a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f607182930"
NET2 = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b"
EID_A = "aaaaaaaaaaa0" + "0" * 52
EID_B = "bbbbbbbbbbb0" + "0" * 52
EID_C = "ccccccccccc0" + "0" * 52
EID_R = "ddddddddddd0" + "0" * 52


def default_rules(tag):
    return {"inbound_rules": [{"action": "allow", "src_tag": tag}],
            "outbound_rules": [{"action": "allow"}]}


def profile_items(name, tags=None, rules=None):
    return {f"/calico/v1/policy/profile/{name}/tags": json.dumps(
                [name] if tags is None else tags),
            f"/calico/v1/policy/profile/{name}/rules": json.dumps(
                default_rules(name) if rules is None else rules),
            f"/calico/v1/policy/profile/{name}/labels": "{}"}


def ep_key(host, eid):
    return f"/calico/v1/host/{host}/workload/libnetwork/libnetwork/endpoint/{eid}"


def ep_item(host, eid, profiles, v4=(), v6=(), **extra):
    value = {"state": "active", "name": "cali" + eid[:11], "mac": "EE:EE:EE:EE:EE:EE",
             "profile_ids": list(profiles), "labels": {},
             "ipv4_nets": list(v4), "ipv6_nets": list(v6)}
    value.update(extra)
    return {ep_key(host, eid): json.dumps(value)}


def world(net2_rules=None):
    """Two networks; A and B on host-a (net1, net2), R on host-b (net1)."""
    profiles = {**profile_items(NET1), **profile_items(NET2, rules=net2_rules)}
    hosts = {**ep_item("host-a", EID_A, [NET1], ["10.0.0.1/32"], ["fd00:1::1/128"]),
             **ep_item("host-a", EID_B, [NET2], ["10.0.1.1/32"]),
             **ep_item("host-b", EID_R, [NET1], ["10.0.0.9/32"], ["fd00:1::9/128"]),
             "/calico/v1/host/host-a/config/marker_created": "true"}
    return profiles, hosts


def chain(rs, name):
    return rs.chains[name]


def profile_lines(rs, name):
    """The rules of an endpoint chain without the anti-spoofing prologue."""
    return [line for line in rs.chains[name]
            if not line.startswith(("ether saddr", "ip saddr !=", "ip6 saddr !="))
            and line != "meta nfproto ipv4 drop"]


# --------------------------------------------------------------------------
# the compiler (pure)


def test_default_profiles_give_isolated_networks():
    profiles, hosts = world()
    rs = policy.compile_items(profiles, hosts, "host-a")
    assert rs.warnings == []
    assert set(rs.endpoints) == {"cali" + EID_A[:11], "cali" + EID_B[:11]}
    a, b = "cali" + EID_A[:11], "cali" + EID_B[:11]
    # inbound: members of the own tag (v4 and v6 sets), then drop
    assert profile_lines(rs, f"to-{a}") == [
        f'ip saddr @t4-{NET1} accept comment "profile {NET1} inbound 0"',
        f'ip6 saddr @t6-{NET1} accept comment "profile {NET1} inbound 0"',
        "drop"]
    # outbound: allow = return (the receiver's inbound chain decides next)
    assert profile_lines(rs, f"from-{b}") == [
        f'return comment "profile {NET2} outbound 0"', "drop"]
    # tag sets span hosts: R (host-b) is in net1's sets
    assert rs.sets[f"t4-{NET1}"] == ("ipv4_addr", ("10.0.0.1", "10.0.0.9"))
    assert rs.sets[f"t6-{NET1}"] == ("ipv6_addr", ("fd00:1::1", "fd00:1::9"))
    assert rs.sets[f"t4-{NET2}"] == ("ipv4_addr", ("10.0.1.1",))
    assert rs.sets[f"t6-{NET2}"] == ("ipv6_addr", ())
    # no chain for the remote endpoint
    assert not any(EID_R[:11] in name for name in rs.chains)
    # dispatch: known interfaces jump to their chains, any other cali* drops
    assert rs.chains["from-wl"] == [
        "ct state established,related accept", "ct state invalid drop",
        f'iifname vmap {{ "{a}" : goto from-{a}, "{b}" : goto from-{b} }}', "drop"]
    assert rs.chains["to-wl"][2].startswith('oifname vmap { "')
    assert rs.chains["forward"] == ['iifname "cali*" jump from-wl',
                                    'oifname "cali*" jump to-wl']
    assert rs.chains["input"] == ['iifname "cali*" jump from-wl-host']
    assert rs.chains["from-wl-host"][0].startswith("icmpv6 type { nd-router-solicit, "
                                                   "nd-neighbor-solicit, nd-neighbor-advert }")


def test_anti_spoofing_prologue():
    profiles, hosts = world()
    rs = policy.compile_items(profiles, hosts, "host-a")
    a, b = "cali" + EID_A[:11], "cali" + EID_B[:11]
    assert rs.chains[f"from-{a}"][:3] == [
        "ether saddr != ee:ee:ee:ee:ee:ee drop",
        "ip saddr != { 10.0.0.1 } drop",
        "ip6 saddr != { fd00:1::1, fe80::/10 } drop"]
    assert rs.chains[f"from-{b}"][:3] == [
        "ether saddr != ee:ee:ee:ee:ee:ee drop",
        "ip saddr != { 10.0.1.1 } drop",
        "ip6 saddr != { fe80::/10 } drop"]


def test_v6_only_endpoint_drops_all_ipv4_it_sends():
    profiles = profile_items(NET1)
    hosts = ep_item("h", EID_A, [NET1], [], ["fd00::5/128"])
    rs = policy.compile_items(profiles, hosts, "h")
    assert "meta nfproto ipv4 drop" in rs.chains["from-cali" + EID_A[:11]]


def test_profiles_apply_in_order_first_match_wins():
    rules_p1 = {"inbound_rules": [{"action": "deny", "protocol": "tcp", "dst_ports": [22]},
                                  {"action": "allow", "protocol": "tcp",
                                   "dst_ports": [22, "8000:8080"]}],
                "outbound_rules": []}
    rules_p2 = {"inbound_rules": [{"action": "allow"}], "outbound_rules": [{"action": "deny"}]}
    profiles = {**profile_items("p1", rules=rules_p1), **profile_items("p2", rules=rules_p2)}
    hosts = ep_item("h", EID_A, ["p2", "p1"], ["10.0.0.1/32"])
    rs = policy.compile_items(profiles, hosts, "h")
    a = "cali" + EID_A[:11]
    assert profile_lines(rs, f"to-{a}") == [
        'accept comment "profile p2 inbound 0"',
        'meta l4proto tcp tcp dport { 22 } drop comment "profile p1 inbound 0"',
        'meta l4proto tcp tcp dport { 22, 8000-8080 } accept comment "profile p1 inbound 1"',
        "drop"]
    assert profile_lines(rs, f"from-{a}") == ['drop comment "profile p2 outbound 0"', "drop"]
    # p1 first now
    hosts = ep_item("h", EID_A, ["p1", "p2"], ["10.0.0.1/32"])
    rs = policy.compile_items(profiles, hosts, "h")
    assert profile_lines(rs, f"to-{a}")[0].endswith('drop comment "profile p1 inbound 0"')
    assert profile_lines(rs, f"to-{a}")[2] == 'accept comment "profile p2 inbound 0"'


def test_missing_profile_contributes_nothing_and_default_is_drop():
    hosts = ep_item("h", EID_A, ["nothere"], ["10.0.0.1/32"])
    rs = policy.compile_items({}, hosts, "h")
    a = "cali" + EID_A[:11]
    assert profile_lines(rs, f"to-{a}") == ["drop"]
    assert profile_lines(rs, f"from-{a}") == ["drop"]


def test_rule_fields():
    c = policy.compile_rule
    assert c({}).versions == ((None, ""),) and c({}).action == "allow"
    assert c({"action": "next-tier"}).action == "allow"
    assert c({"action": "deny", "protocol": "udp", "src_ports": ["53", 123, "1:2"]}).versions \
        == ((None, "meta l4proto udp udp sport { 1-2, 53, 123 }"),)
    assert c({"protocol": "tcp", "!dst_ports": [80, 81, "82:90"]}).versions == (
        (None, "meta l4proto tcp tcp dport != { 80-90 }"),)
    assert c({"src_net": "10.1.0.0/16", "!dst_net": "10.1.2.0/24"}).versions == (
        (4, "ip saddr 10.1.0.0/16 ip daddr != 10.1.2.0/24"),)
    assert c({"dst_net": "fd00::/8"}).versions == ((6, "ip6 daddr fd00::/8"),)
    assert c({"src_net": "10.1.2.3/16"}).versions == ((4, "ip saddr 10.1.0.0/16"),)
    assert c({"protocol": "icmp", "icmp_type": 8, "icmp_code": 0}).versions == (
        (4, "meta nfproto ipv4 meta l4proto icmp icmp type 8 icmp code 0"),)
    assert c({"protocol": "icmpv6", "!icmp_type": 128}).versions == (
        (6, "meta nfproto ipv6 meta l4proto icmpv6 icmpv6 type != 128"),)
    assert c({"protocol": 47}).versions == ((None, "meta l4proto 47"),)
    assert c({"!protocol": "udp"}).versions == ((None, "meta l4proto != udp"),)
    assert c({"ip_version": 6, "protocol": "tcp"}).versions == (
        (6, "meta nfproto ipv6 meta l4proto tcp"),)
    # tags: one nft rule per IP version, against the tag's sets
    r = c({"src_tag": "web", "!dst_tag": "db", "protocol": "tcp"})
    assert r.versions == ((4, "ip saddr @t4-web ip daddr != @t4-db meta l4proto tcp"),
                          (6, "ip6 saddr @t6-web ip6 daddr != @t6-db meta l4proto tcp"))
    assert r.tags == ("web", "db")
    assert c({"src_tag": "web", "src_net": "10.0.0.0/8"}).versions == (
        (4, "ip saddr 10.0.0.0/8 ip saddr @t4-web"),)
    assert c({"protocol": "sctp", "dst_ports": [5]}).versions == (
        (None, "meta l4proto sctp sctp dport { 5 }"),)
    # None values count as absent (some writers emit nulls)
    assert c({"action": "allow", "src_tag": None}).versions == ((None, ""),)


@pytest.mark.parametrize("rule", [
    "not a dict",
    {"action": "reject"},
    {"src_selector": "role == 'db'"},
    {"protocol": "gre"},
    {"protocol": 0},
    {"protocol": 256},
    {"protocol": True},
    {"dst_ports": [80]},                                  # no protocol
    {"protocol": "icmp", "dst_ports": [80]},
    {"protocol": "tcp", "dst_ports": []},
    {"protocol": "tcp", "dst_ports": [70000]},
    {"protocol": "tcp", "dst_ports": ["9:1"]},
    {"protocol": "tcp", "dst_ports": ["a:b"]},
    {"protocol": "tcp", "dst_ports": "80"},
    {"icmp_type": 8},                                     # no protocol
    {"protocol": "icmp", "icmp_code": 0},                 # code without type
    {"protocol": "icmp", "icmp_type": 300},
    {"src_net": "10.0.0.0/33"},
    {"src_net": 10},
    {"src_net": "10.0.0.0/8", "dst_net": "fd00::/8"},     # mixed versions
    {"protocol": "icmp", "src_net": "fd00::/8"},
    {"ip_version": 5},
    {"src_tag": "bad tag"},
    {"src_tag": 'x"; flush ruleset; "'},
])
def test_invalid_rules_rejected(rule):
    with pytest.raises(policy.InvalidRule):
        policy.compile_rule(rule)


def test_invalid_rules_skipped_or_fail_closed():
    rules = {"inbound_rules": [
        {"action": "allow", "src_selector": "x"},      # invalid allow: skipped
        {"action": "log"},                             # unknown action: skipped
        {"action": "allow", "protocol": "tcp", "dst_ports": [80]},
        {"action": "deny", "src_net": "bogus"},        # invalid deny: drop all here
        {"action": "allow"},
    ], "outbound_rules": "not a list"}
    profiles = profile_items("p", rules=rules)
    hosts = ep_item("h", EID_A, ["p"], ["10.0.0.1/32"])
    rs = policy.compile_items(profiles, hosts, "h")
    a = "cali" + EID_A[:11]
    assert profile_lines(rs, f"to-{a}") == [
        'meta l4proto tcp tcp dport { 80 } accept comment "profile p inbound 2"',
        'drop comment "profile p inbound 3"',
        'accept comment "profile p inbound 4"',
        "drop"]
    assert profile_lines(rs, f"from-{a}") == ["drop"]
    assert len(rs.warnings) == 4, rs.warnings
    assert any("invalid deny rule" in w for w in rs.warnings)


def test_version_filtering():
    rules = {"inbound_rules": [{"action": "allow", "src_net": "10.0.0.0/8"},
                               {"action": "allow", "protocol": "icmpv6"},
                               {"action": "deny", "ip_version": 4}],
             "outbound_rules": []}
    rs = policy.compile_items(profile_items("p", rules=rules),
                              ep_item("h", EID_A, ["p"], ["10.0.0.1/32"], ["fd00::1/128"]), "h")
    assert profile_lines(rs, "to-cali" + EID_A[:11]) == [
        'ip saddr 10.0.0.0/8 accept comment "profile p inbound 0"',
        'meta nfproto ipv6 meta l4proto icmpv6 accept comment "profile p inbound 1"',
        'meta nfproto ipv4 drop comment "profile p inbound 2"',
        "drop"]


def test_tags_shared_by_profiles_and_only_referenced_tags_get_sets():
    # profile "web2" also carries tag "web"; "db" carries "db" (never referenced)
    profiles = {**profile_items("web"), **profile_items("web2", tags=["web", "extra"]),
                **profile_items("db", rules={"inbound_rules": [{"src_tag": "web"}],
                                             "outbound_rules": [{}]})}
    hosts = {**ep_item("h", EID_A, ["db"], ["10.0.0.1/32"]),
             **ep_item("h", EID_B, ["web"], ["10.0.0.2/32"]),
             **ep_item("other", EID_C, ["web2"], ["10.0.0.3/32"], ["fd00::3/128"])}
    rs = policy.compile_items(profiles, hosts, "h")
    assert rs.sets == {
        "t4-web": ("ipv4_addr", ("10.0.0.2", "10.0.0.3")),
        "t6-web": ("ipv6_addr", ("fd00::3",)),
    }


def test_corrupt_records_are_ignored_with_warnings():
    profiles = {**profile_items(NET1),
                f"/calico/v1/policy/profile/{NET2}/rules": "{not json",
                f"/calico/v1/policy/profile/{NET2}/tags": json.dumps(["ok", "bad tag", 7]),
                "/calico/v1/policy/profile/bad name/rules": json.dumps(default_rules("x"))}
    hosts = {**ep_item("h", EID_A, [NET1], ["10.0.0.1/32"]),
             ep_key("h", EID_B): "[]",
             **ep_item("h", EID_C, [NET1], ["not-an-ip"]),
             **ep_item("h", EID_R, [NET1], ["10.0.0.4/32"], name="eth0"),   # not cali*
             ep_key("h", "e" * 64): json.dumps({"name": "cali" + EID_A[:11],
                                                "profile_ids": [NET1],
                                                "ipv4_nets": ["10.0.0.5/32"]})}
    rs = policy.compile_items(profiles, hosts, "h")
    assert list(rs.endpoints) == ["cali" + EID_A[:11]]
    assert len(rs.warnings) == 8, rs.warnings
    # net2 exists with tag "ok" but no rules
    assert "t4-ok" not in rs.sets


def test_inactive_endpoint_drops_everything():
    hosts = ep_item("h", EID_A, [NET1], ["10.0.0.1/32"], state="inactive")
    rs = policy.compile_items(profile_items(NET1), hosts, "h")
    assert rs.chains["to-cali" + EID_A[:11]] == ["drop"]
    assert rs.chains["from-cali" + EID_A[:11]] == ["drop"]


def test_groups_key_on_all_addresses_of_a_container():
    """A container on net1 and net2 (two local endpoints, one group): both
    its addresses pass anti-spoofing on both interfaces and count as members
    of both tags; a remote endpoint is taken alone."""
    profiles = {**profile_items(NET1), **profile_items(NET2)}
    hosts = {**ep_item("h", EID_A, [NET1], ["10.0.0.1/32"]),
             **ep_item("h", EID_B, [NET2], ["10.0.1.1/32"]),
             **ep_item("h", EID_C, [NET2], ["10.0.1.2/32"])}
    a, b = "cali" + EID_A[:11], "cali" + EID_B[:11]
    rs = policy.compile_items(profiles, hosts, "h", groups={a: 3, b: 3, "cali-unknown": 3})
    for name in (a, b):
        assert "ip saddr != { 10.0.0.1, 10.0.1.1 } drop" in rs.chains[f"from-{name}"]
    assert "ip saddr != { 10.0.1.2 } drop" in rs.chains["from-cali" + EID_C[:11]]
    assert rs.sets[f"t4-{NET1}"][1] == ("10.0.0.1", "10.0.1.1")
    assert rs.sets[f"t4-{NET2}"][1] == ("10.0.0.1", "10.0.1.1", "10.0.1.2")
    # without groups: each endpoint alone
    rs = policy.compile_items(profiles, hosts, "h")
    assert rs.sets[f"t4-{NET1}"][1] == ("10.0.0.1",)


def test_no_local_endpoints_still_fails_closed():
    rs = policy.compile_ruleset([], [], {})
    assert rs.chains["from-wl"] == ["ct state established,related accept",
                                    "ct state invalid drop", "drop"]
    assert rs.chains["to-wl"][-1] == "drop"
    assert rs.sets == {} and rs.endpoints == {}
    assert rs.script().startswith("table inet netplugin_calico\n"
                                  "delete table inet netplugin_calico\n"
                                  "table inet netplugin_calico {\n")


def test_compile_is_deterministic():
    profiles, hosts = world()
    texts = {policy.compile_items(dict(reversed(list(profiles.items()))),
                                  dict(reversed(list(hosts.items()))), "host-a").text,
             policy.compile_items(profiles, hosts, "host-a").text}
    assert len(texts) == 1


# --------------------------------------------------------------------------
# the agent's local copy: events and re-lists in any order


def test_prefix_copy_merges_events_and_lists():
    p = _Prefix()
    assert p.event(Event("put", "/k1", "a", 5))
    assert not p.event(Event("put", "/k1", "old", 4))           # older: ignored
    assert p.event(Event("put", "/k2", "b", 6))
    assert p.event(Event("delete", "/k2", None, 8))
    assert not p.event(Event("put", "/k2", "b", 6))             # replay after delete
    assert p.values() == {"/k1": "a"}

    # A list starts; while it runs, k3 is put (9) and k1 deleted (10); the
    # list itself was read before both: the events win.
    gen = p.gen
    p.event(Event("put", "/k3", "c", 9))
    p.event(Event("delete", "/k1", None, 10))
    assert not p.relist([Item("/k1", "a", 5)], gen)
    assert p.values() == {"/k3": "c"}
    # A list read after an event delivered late: the list's newer value wins.
    gen = p.gen
    p.event(Event("put", "/k4", "old", 11))
    assert p.relist([Item("/k3", "c", 9), Item("/k4", "new", 12)], gen)
    assert p.values() == {"/k3": "c", "/k4": "new"}
    # Outside concurrent events the list is authoritative: a key it lacks is
    # gone, and even lower versions win (a store restored from a backup).
    assert p.relist([Item("/k4", "restored", 3)], p.gen)
    assert p.values() == {"/k4": "restored"}
    assert p.event(Event("put", "/k4", "after", 4))
    assert p.values() == {"/k4": "after"}


# --------------------------------------------------------------------------
# the agent loop (embedded datastore, fake apply)


class Recorder:
    def __init__(self):
        self.applied = []
        self.lock = threading.Lock()
        self.fail = False

    def __call__(self, ruleset):
        if self.fail:
            raise policy.NftError("nft is broken")
        with self.lock:
            self.applied.append(ruleset)

    def last(self):
        with self.lock:
            return self.applied[-1] if self.applied else None

    def wait_for(self, pred, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rs = self.last()
            if rs is not None and pred(rs):
                return rs
            time.sleep(0.01)
        raise AssertionError(f"no applied ruleset matched; last: "
                             f"{self.last() and self.last().endpoints}")


@pytest.fixture
def store(tmp_path):
    s = EmbeddedDatastore(str(tmp_path / "state.db"))
    yield s
    s.close()


def start_agent(store, rec, **kw):
    kw.setdefault("table_exists", lambda: True)
    agent = PolicyAgent(store, "host-a", apply=rec, link_groups=None, **kw)
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    t.start()
    return agent, stop, t


def test_agent_follows_the_datastore(store):
    profiles, hosts = world()
    for k, v in {**profiles, **hosts}.items():
        store.put(k, v)
    rec = Recorder()
    agent, stop, t = start_agent(store, rec)
    try:
        a, b = "cali" + EID_A[:11], "cali" + EID_B[:11]
        rec.wait_for(lambda rs: set(rs.endpoints) == {a, b})
        # a new local endpoint: its chains appear
        key, value = next(iter(ep_item("host-a", EID_C, [NET1], ["10.0.0.3/32"]).items()))
        t0 = time.monotonic()
        store.put(key, value)
        rec.wait_for(lambda rs: "cali" + EID_C[:11] in rs.endpoints)
        assert time.monotonic() - t0 < 1.0
        assert "10.0.0.3" in rec.last().sets[f"t4-{NET1}"][1]
        # editing a profile's rules
        store.put(f"/calico/v1/policy/profile/{NET2}/rules", json.dumps({
            "inbound_rules": [{"action": "allow", "src_tag": NET2},
                              {"action": "allow", "src_tag": NET1}],
            "outbound_rules": [{"action": "allow"}]}))
        rs = rec.wait_for(lambda rs: any(f"@t4-{NET1}" in line
                                         for line in rs.chains[f"to-{b}"]))
        assert rs.sets[f"t4-{NET1}"][1] == ("10.0.0.1", "10.0.0.3", "10.0.0.9")
        # endpoints go
        store.delete(key)
        store.delete(ep_key("host-a", EID_A))
        rec.wait_for(lambda rs: set(rs.endpoints) == {b})
        # unrelated change (remote endpoint not in any referenced tag): no apply
        count = len(rec.applied)
        store.put("/calico/v1/host/host-b/config/foo", "bar")
        time.sleep(0.3)
        assert len(rec.applied) == count
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


def test_agent_debounces_bursts(store):
    rec = Recorder()
    agent, stop, t = start_agent(store, rec, quiet=0.05, debounce=0.5)
    try:
        rec.wait_for(lambda rs: True)
        before = len(rec.applied)
        for k, v in profile_items(NET1).items():
            store.put(k, v)
        for i in range(20):
            store.put(*next(iter(ep_item("host-a", f"{i:02d}" + "f" * 62, [NET1],
                                         [f"10.0.0.{i + 1}/32"]).items())))
        rs = rec.wait_for(lambda rs: len(rs.endpoints) == 20)
        assert len(rs.sets[f"t4-{NET1}"][1]) == 20
        assert len(rec.applied) - before <= 5
    finally:
        stop.set()
        t.join(10)


def test_agent_start_fails_closed_and_survives_errors(store):
    rec = Recorder()
    exists = []
    # no table at start: an empty one (drop all cali*) is installed first
    agent, stop, t = start_agent(store, rec, table_exists=lambda: bool(exists),
                                 retry_interval=0.05, resync_interval=0.2)
    try:
        rs = rec.wait_for(lambda rs: True)
        assert rs.endpoints == {} and rs.chains["from-wl"][-1] == "drop"
        # nft failing: the agent keeps running and retries
        rec.fail = True
        for k, v in {**profile_items(NET1),
                     **ep_item("host-a", EID_A, [NET1], ["10.0.0.1/32"])}.items():
            store.put(k, v)
        time.sleep(0.3)
        rec.fail = False
        rec.wait_for(lambda rs: list(rs.endpoints) == ["cali" + EID_A[:11]])
        # periodic resync re-applies even without changes
        n = len(rec.applied)
        deadline = time.monotonic() + 3
        while len(rec.applied) == n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(rec.applied) > n
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


def test_agent_keeps_rules_while_datastore_fails(store, monkeypatch):
    from netplugin.datastore import DatastoreUnavailable
    for k, v in {**profile_items(NET1),
                 **ep_item("host-a", EID_A, [NET1], ["10.0.0.1/32"])}.items():
        store.put(k, v)
    rec = Recorder()
    real_list = store.list_prefix
    calls = {"n": 0}

    def flaky_list(prefix):
        calls["n"] += 1
        if calls["n"] <= 4:
            raise DatastoreUnavailable("store down")
        return real_list(prefix)

    monkeypatch.setattr(store, "list_prefix", flaky_list)
    agent, stop, t = start_agent(store, rec, retry_interval=0.05)
    try:
        # nothing is applied from a partial picture; then the list succeeds
        rs = rec.wait_for(lambda rs: True)
        assert list(rs.endpoints) == ["cali" + EID_A[:11]]
        assert calls["n"] >= 5
    finally:
        stop.set()
        t.join(10)


# --------------------------------------------------------------------------
# real nft, in throwaway network namespaces

needs_netns = pytest.mark.skipif(netns_unavailable_reason() is not None,
                                 reason=str(netns_unavailable_reason()))


def full_world():
    """Every kind of rule, to check nft accepts what the compiler writes."""
    rules = {"inbound_rules": [
        {"action": "deny", "protocol": "tcp", "dst_ports": [22, "1000:2000"]},
        {"action": "deny", "protocol": "udp", "!src_ports": [53]},
        {"action": "allow", "src_tag": NET2},
        {"action": "allow", "!src_tag": NET1, "protocol": "sctp", "dst_ports": [9]},
        {"action": "allow", "src_net": "10.9.0.0/16", "!dst_net": "10.9.9.0/24"},
        {"action": "allow", "src_net": "fd00:9::/64"},
        {"action": "allow", "protocol": "icmp", "icmp_type": 8, "icmp_code": 0},
        {"action": "allow", "protocol": "icmpv6", "!icmp_type": 129},
        {"action": "allow", "protocol": 47},
        {"action": "allow", "!protocol": "udplite", "ip_version": 6},
        {"action": "next-tier", "dst_tag": "other.tag_1-x"},
        {"action": "deny", "src_selector": "has(x)"},
    ], "outbound_rules": [{"action": "deny", "dst_net": "169.254.0.0/16"}, {}]}
    profiles = {**profile_items(NET1), **profile_items(NET2, rules=rules),
                **profile_items("other", tags=["other.tag_1-x"])}
    hosts = {**ep_item("host-a", EID_A, [NET1], ["10.0.0.1/32"], ["fd00:1::1/128"]),
             **ep_item("host-a", EID_B, [NET2, NET1], ["10.0.1.1/32"]),
             **ep_item("host-a", EID_C, ["other"], [], ["fd00:3::1/128"]),
             **ep_item("host-b", EID_R, [NET1, "other"], ["10.0.0.9/32"])}
    return profiles, hosts


@needs_netns
def test_nft_accepts_the_ruleset_replaces_it_atomically_and_idempotently():
    profiles, hosts = full_world()
    full = policy.compile_items(profiles, hosts, "host-a")
    small = policy.compile_items(*world(), "host-a")
    result = run_in_netns(f"""
        import json, subprocess
        from backends.calico import policy
        full = policy.Ruleset({full.text!r}, {{}}, {{}}, {{}}, [])
        small = policy.Ruleset({small.text!r}, {{}}, {{}}, {{}}, [])
        def listing():
            return subprocess.run(["nft", "list", "table", "inet", "netplugin_calico"],
                                  capture_output=True, text=True, check=True).stdout
        out = {{"before": policy.table_exists()}}
        policy.apply(full)
        first = listing()
        policy.apply(full)
        out["idempotent"] = listing() == first
        out["chains_full"] = sorted(policy.installed_chains())
        policy.apply(small)
        out["chains_small"] = sorted(policy.installed_chains())
        # a broken script is rejected as a whole: the table stays as it was
        broken = policy.Ruleset(small.text.replace("drop\\n\\t}}", "dorp\\n\\t}}", 1),
                                {{}}, {{}}, {{}}, [])
        try:
            policy.apply(broken)
            out["broken"] = "applied?!"
        except policy.NftError as exc:
            out["broken"] = str(exc)
        out["chains_after_broken"] = sorted(policy.installed_chains())
        # someone else's table is left alone
        subprocess.run(["nft", "add", "table", "inet", "other"], check=True)
        policy.apply(full)
        out["tables"] = subprocess.run(["nft", "list", "tables"], capture_output=True,
                                       text=True, check=True).stdout.split("\\n")
        out["deleted"] = policy.delete_table()
        out["after"] = policy.table_exists()
        emit(out)
    """)
    assert result["before"] is False
    assert result["idempotent"] is True
    assert result["chains_full"] == sorted(full.chains)
    assert result["chains_small"] == sorted(small.chains)
    assert "dorp" in result["broken"]
    assert result["chains_after_broken"] == sorted(small.chains)
    assert "table inet other" in result["tables"]
    assert result["deleted"] is True and result["after"] is False
    assert len(full.warnings) == 1      # the selector rule


# A routed data path like the driver builds, without Docker: "containers" are
# nested network namespaces held by `unshare --net sleep`, each joined to the
# test namespace (the "host") by a veth cali<id> <-> eth0, /32 routes, proxy
# ARP and the fe80::1 gateway for IPv6.
DATAPATH_PRELUDE = r"""
import os, subprocess, time
from backends.calico import policy
from backends.calico.agent import cali_link_groups

procs = []

def sh(*cmd, check=True):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=check)

def container():
    p = subprocess.Popen(["unshare", "--net", "sleep", "120"])
    procs.append(p)
    me = os.readlink("/proc/self/ns/net")
    for _ in range(200):
        try:
            if os.readlink(f"/proc/{p.pid}/ns/net") != me:
                break
        except OSError:
            pass
        time.sleep(0.01)
    sh("nsenter", "-t", p.pid, "-n", "ip", "link", "set", "lo", "up")
    return p.pid

def attach(pid, host_if, cif, v4=(), v6=(), default=True):
    sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "tmp" + host_if[4:])
    sh("ip", "link", "set", "tmp" + host_if[4:], "address", "ee:ee:ee:ee:ee:ee")
    sh("ip", "link", "set", "tmp" + host_if[4:], "netns", str(pid))
    n = ["nsenter", "-t", pid, "-n"]
    sh(*n, "ip", "link", "set", "tmp" + host_if[4:], "name", cif)
    sh(*n, "ip", "link", "set", cif, "up")
    sh("ip", "link", "set", host_if, "up")
    with open(f"/proc/sys/net/ipv4/conf/{host_if}/proxy_arp", "w") as f:
        f.write("1")
    with open(f"/proc/sys/net/ipv4/neigh/{host_if}/proxy_delay", "w") as f:
        f.write("0")
    for a in v4:
        sh(*n, "ip", "addr", "add", a + "/32", "dev", cif)
        sh("ip", "route", "replace", a + "/32", "dev", host_if)
    if v4 and default:
        sh(*n, "ip", "route", "add", "169.254.1.1", "dev", cif)
        sh(*n, "ip", "route", "add", "default", "via", "169.254.1.1", "dev", cif)
    if v6:
        sh("ip", "addr", "add", "fe80::1/64", "dev", host_if, "nodad")
        for a in v6:
            sh(*n, "ip", "addr", "add", a + "/128", "dev", cif, "nodad")
            sh("ip", "-6", "route", "replace", a + "/128", "dev", host_if)
        if default:
            sh(*n, "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", cif)

def ping(pid, dst, src=None):
    cmd = ["nsenter", "-t", pid, "-n", "busybox", "ping", "-c1", "-W1"]
    if src:
        cmd += ["-I", src]
    return sh(*cmd, dst, check=False).returncode == 0

for name in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
    with open("/proc/sys/" + name, "w") as f:
        f.write("1")
# like a real host: an address and a default route elsewhere (proxy ARP
# answers for 169.254.1.1 only when the host has a route to it)
sh("ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1")
sh("ip", "link", "set", "uplink1", "up")
sh("ip", "link", "set", "uplink0", "up")
sh("ip", "addr", "add", "10.255.0.1/24", "dev", "uplink0")
sh("ip", "route", "add", "default", "via", "10.255.0.2", "dev", "uplink0")
"""


@needs_netns
def test_datapath_isolation_in_namespaces():
    """net1 = {A, A2}, net2 = {B}; C sits on an interface we have no record
    for (fail closed); D is on a non-cali interface (untouched)."""
    profiles = {**profile_items(NET1), **profile_items(NET2)}
    hosts = {**ep_item("h", EID_A, [NET1], ["10.0.0.1/32"], ["fd00:1::1/128"]),
             **ep_item("h", "a2" + EID_A[2:], [NET1], ["10.0.2.1/32"], ["fd00:2::1/128"]),
             **ep_item("h", EID_B, [NET2], ["10.0.1.1/32"], ["fd00:3::1/128"])}
    rs = policy.compile_items(profiles, hosts, "h")
    a, a2, b = "cali" + EID_A[:11], "calia2" + EID_A[2:11], "cali" + EID_B[:11]
    result = run_in_netns(DATAPATH_PRELUDE + textwrap.dedent(f"""
        out = {{}}
        try:
            A, A2, B, C, D = (container() for _ in range(5))
            attach(A, {a!r}, "eth0", ["10.0.0.1"], ["fd00:1::1"])
            attach(A2, {a2!r}, "eth0", ["10.0.2.1"], ["fd00:2::1"])
            attach(B, {b!r}, "eth0", ["10.0.1.1"], ["fd00:3::1"])
            attach(C, "calinorecord", "eth0", ["10.0.3.1"])
            attach(D, "calXother", "eth0", ["10.0.4.1"])
            out["open_before"] = ping(A, "10.0.1.1")           # no table yet
            policy.apply(policy.Ruleset({rs.text!r}, {{}}, {{}}, {{}}, []))
            out["A->A2"] = ping(A, "10.0.2.1")
            out["A2->A"] = ping(A2, "10.0.0.1")
            out["A->A2 v6"] = ping(A, "fd00:2::1")
            out["A->B"] = ping(A, "10.0.1.1")
            out["B->A"] = ping(B, "10.0.0.1")
            out["A->B v6"] = ping(A, "fd00:3::1")
            out["B->A v6"] = ping(B, "fd00:1::1")
            out["A->C"] = ping(A, "10.0.3.1")
            out["C->A"] = ping(C, "10.0.0.1")
            out["D->host"] = ping(D, "10.255.0.1")
            out["A->host"] = ping(A, "10.255.0.1")   # outbound allow: host reachable
            out["C->host"] = ping(C, "10.255.0.1")
            out["A->gw v6"] = ping(A, "fe80::1%eth0")  # NDP + ICMPv6 to the host
            # anti-spoofing: B claims A2's address to reach A (A2 is in net1).
            # A later-priority forward chain counts what our table let through.
            subprocess.run(["nft", "-f", "-"], check=True, text=True, input='''
                table inet probe {{
                  chain spoofed {{ type filter hook forward priority 100; policy accept;
                    ip saddr 10.0.2.1 iifname "{b}" counter
                  }}
                }}''')
            sh("nsenter", "-t", B, "-n", "ip", "addr", "add", "10.0.2.1/32", "dev", "eth0")
            ping(B, "10.0.0.1", src="10.0.2.1")
            out["spoof_counter"] = sh("nft", "list", "chain", "inet", "probe", "spoofed").stdout
        finally:
            for p in procs:
                p.kill()
                p.wait()
        emit(out)
    """), timeout=120)
    assert result.pop("open_before") is True
    spoof = result.pop("spoof_counter")
    assert "packets 0 " in spoof, spoof
    assert result == {
        "A->A2": True, "A2->A": True, "A->A2 v6": True,
        "A->B": False, "B->A": False, "A->B v6": False, "B->A v6": False,
        "A->C": False, "C->A": False,
        "D->host": True, "A->host": True, "C->host": False,
        "A->gw v6": True,
    }


@needs_netns
def test_datapath_multi_network_container_uses_all_its_addresses():
    """M is on net1 (caliM1, 10.0.0.5) and net2 (caliM2, 10.0.1.5); it pings
    B (net2) from its net1 address through its net2 interface.  The link
    groups read from the kernel make that address a net2 member."""
    profiles = {**profile_items(NET1), **profile_items(NET2)}
    m1, m2 = "m1" + "0" * 62, "m2" + "0" * 62
    hosts = {**ep_item("h", m1, [NET1], ["10.0.0.5/32"]),
             **ep_item("h", m2, [NET2], ["10.0.1.5/32"]),
             **ep_item("h", EID_B, [NET2], ["10.0.1.1/32"])}
    c1, c2, b = "cali" + m1[:11], "cali" + m2[:11], "cali" + EID_B[:11]
    result = run_in_netns(DATAPATH_PRELUDE + textwrap.dedent(f"""
        import json
        from backends.calico.policy import compile_items, apply
        profiles, hosts = json.loads({json.dumps(json.dumps([profiles, hosts]))})
        out = {{}}
        try:
            M, B = container(), container()
            attach(M, {c1!r}, "eth0", ["10.0.0.5"])
            attach(M, {c2!r}, "eth1", ["10.0.1.5"], default=False)
            sh("nsenter", "-t", M, "-n", "ip", "route", "add", "10.0.1.1", "dev", "eth1")
            attach(B, {b!r}, "eth0", ["10.0.1.1"])
            groups = cali_link_groups()
            out["grouped"] = groups.get({c1!r}) == groups.get({c2!r}) != None
            out["B grouped apart"] = groups.get({b!r}) != groups.get({c1!r})
            apply(compile_items(profiles, hosts, "h"))
            out["alone: M->B from net1 address"] = ping(M, "10.0.1.1", src="10.0.0.5")
            out["alone: M->B"] = ping(M, "10.0.1.1")
            apply(compile_items(profiles, hosts, "h", groups))
            out["grouped: M->B from net1 address"] = ping(M, "10.0.1.1", src="10.0.0.5")
            out["grouped: M->B"] = ping(M, "10.0.1.1")
        finally:
            for p in procs:
                p.kill()
                p.wait()
        emit(out)
    """), timeout=120)
    assert result == {"grouped": True, "B grouped apart": True,
                      "alone: M->B from net1 address": False, "alone: M->B": True,
                      "grouped: M->B from net1 address": True, "grouped: M->B": True}


# --------------------------------------------------------------------------
# Join's barrier: the agent enforces a new endpoint at once


class SlowWatchStore:
    """The embedded store whose watch never delivers: only the barrier's own
    read can tell the agent about a new endpoint (a watch lagging under load)."""

    def __init__(self, inner):
        self.inner = inner

    def watch_prefix(self, prefix, callback, since=None):
        from netplugin.datastore import Watch
        return Watch()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_merge_groups_joins_interfaces_seen_together_in_any_view():
    links = {"cali1": 7, "cali2": 7, "cali3": 9}
    sandboxes = {"cali3": "sb-x", "cali4": "sb-x", "cali5": "sb-y"}
    groups = agent_mod.merge_groups(links, sandboxes)
    assert groups["cali1"] == groups["cali2"] != groups["cali3"]
    assert groups["cali3"] == groups["cali4"]
    assert "cali5" not in groups                       # alone: its own container
    assert agent_mod.merge_groups({}, {}) == {}


def test_barrier_applies_a_new_endpoint_without_the_watch(store, tmp_path):
    profiles, hosts = world()
    for k, v in {**profiles, **hosts}.items():
        store.put(k, v)
    rec = Recorder()
    state = tmp_path / "state"
    sandboxes = {}
    agent, stop, t = start_agent(SlowWatchStore(store), rec, barrier_dir=str(state),
                                 quiet=5.0, debounce=5.0, resync_interval=3600,
                                 sandbox_groups=lambda: dict(sandboxes))
    try:
        a, b = "cali" + EID_A[:11], "cali" + EID_B[:11]
        rec.wait_for(lambda rs: set(rs.endpoints) == {a, b})
        # unknown to the agent until Join asks (the watch is silent, quiet is 5 s)
        key, value = next(iter(ep_item("host-a", EID_C, [NET1], ["10.0.0.3/32"]).items()))
        store.put(key, value)
        c = "cali" + EID_C[:11]
        sandboxes.update({a: "sb1", c: "sb1"})     # a and c: one container
        t0 = time.monotonic()
        assert barrier.wait_applied(str(state), key) == "ok"
        assert time.monotonic() - t0 < 1.0
        rs = rec.last()
        assert c in rs.endpoints
        # c's chain admits a's address too: one container
        assert any("10.0.0.1" in line and "10.0.0.3" in line for line in rs.chains[f"from-{c}"])
        # asked again with nothing new: answered from the applied table, no apply
        count = len(rec.applied)
        assert barrier.wait_applied(str(state), key) == "ok"
        assert len(rec.applied) == count
        # CreateEndpoint's notify: answered at once, applied without the quiet
        key_r, value_r = next(iter(ep_item("host-a", EID_R, [NET1], ["10.0.0.4/32"]).items()))
        store.put(key_r, value_r)
        assert barrier.notify(str(state), key_r) == "queued"
        rec.wait_for(lambda rs: "cali" + EID_R[:11] in rs.endpoints, timeout=2.0)
        # a foreign host's key or garbage is refused, the agent keeps serving
        assert barrier.wait_applied(str(state), ep_key("host-b", EID_C)) == "timeout"
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(barrier.socket_path(str(state)))
            s.sendall(b"{not json\n")
            assert s.recv(100).startswith(b"error")
        assert oct(os.stat(barrier.socket_path(str(state))).st_mode & 0o777) == "0o600"
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


def test_barrier_reads_the_profile_of_a_network_the_watch_missed(store, tmp_path):
    """A watch still backing off after an outage has not delivered a new
    network's profile: Join's barrier reads it with the endpoint, so the first
    packet between two containers of that network finds its tag set."""
    profiles, hosts = world()
    for k, v in {**profiles, **hosts}.items():
        store.put(k, v)
    rec = Recorder()
    state = tmp_path / "state"
    agent, stop, t = start_agent(SlowWatchStore(store), rec, barrier_dir=str(state),
                                 quiet=5.0, debounce=5.0, resync_interval=3600)
    try:
        rec.wait_for(lambda rs: len(rs.endpoints) == 2)
        net3 = "5" * 64
        for k, v in profile_items(net3).items():
            store.put(k, v)
        keys = []
        for eid, addr in ((EID_C, "10.0.3.2/32"), (EID_R, "10.0.3.3/32")):
            key, value = next(iter(ep_item("host-a", eid, [net3], [addr]).items()))
            store.put(key, value)
            keys.append(key)
            assert barrier.wait_applied(str(state), key) == "ok"
        rs = rec.last()
        assert f"t4-{net3}" in rs.sets
        c = "cali" + EID_C[:11]
        assert any(f"@t4-{net3} accept" in line for line in rs.chains[f"to-{c}"])
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


def test_join_without_an_agent_does_not_wait(tmp_path):
    t0 = time.monotonic()
    assert barrier.wait_applied(str(tmp_path), "/calico/v1/host/h/x") == "no agent"
    assert time.monotonic() - t0 < 0.5


def test_barrier_requests_reuse_a_bounded_set_of_threads(tmp_path):
    """The handler reads the datastore, which may keep a connection per thread
    (the embedded one does): requests must not each get a new thread."""
    threads = set()

    def handler(key, timeout):
        threads.add(threading.get_ident())
        return True

    stop = threading.Event()
    assert barrier.BarrierServer(str(tmp_path), handler).start(stop)
    try:
        for i in range(3 * barrier.WORKERS):
            assert barrier.wait_applied(str(tmp_path), f"/calico/v1/host/h/{i}") == "ok"
        assert 1 <= len(threads) <= barrier.WORKERS
    finally:
        stop.set()


def test_a_slow_link_poll_never_puts_back_groups_a_barrier_replaced(store):
    """The link poll computed its groups before Join recorded a container's
    second interface; the barrier stored the newer groups meanwhile: the
    poll's stale result is computed again, not stored."""
    in_poll, release = threading.Event(), threading.Event()
    sandboxes = {}
    calls = []

    def links():
        calls.append(1)
        if len(calls) == 1:
            in_poll.set()
            release.wait(5)
        return {}

    agent = PolicyAgent(store, "host-a", apply=Recorder(), link_groups=links,
                        sandbox_groups=lambda: dict(sandboxes))
    poll = threading.Thread(target=agent._refresh_groups)
    poll.start()
    assert in_poll.wait(5)
    sandboxes.update({"cali1": "sb", "cali2": "sb"})       # Join of the 2nd interface
    assert agent._refresh_groups(poll_links=False)          # the barrier's view
    release.set()
    poll.join(5)
    assert agent._groups == {"cali1": "cali1", "cali2": "cali1"}
    assert len(calls) == 2                                  # the poll looked again
