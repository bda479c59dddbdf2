"""netplugin.linux.list_links (the lean RTM_GETLINK dump the agents poll)
against pyroute2's full decoding, in a throwaway network namespace."""
import pytest

from tests.netns_runner import netns_unavailable_reason, run_in_netns

pytestmark = pytest.mark.skipif(netns_unavailable_reason() is not None,
                                reason=str(netns_unavailable_reason()))


def test_list_links_matches_pyroute2():
    out = run_in_netns("""
from pyroute2 import IPRoute
from netplugin import linux
for i in range(100):
    linux.create_veth(f"cali{i:011d}", f"tmp{i:012d}", mtu=1400, alias=f"netplugin:{i}")
full = []
with IPRoute() as ipr:
    for m in ipr.get_links():
        info = m.get("IFLA_LINKINFO")
        full.append([m.get("IFLA_IFNAME"), m["index"], info.get("IFLA_INFO_KIND") if info else None,
                     m.get("IFLA_LINK"), m.get("IFLA_IFALIAS") or None])
lean = [[l.name, l.index, l.kind, l.peer_index, l.alias] for l in linux.list_links()]
cali = [l.name for l in linux.list_links(("cali",))]
emit({"full": sorted(full), "lean": sorted(lean), "cali": cali,
      "nsid": [l.peer_netnsid for l in linux.list_links(("cali",))]})
""")
    assert out["lean"] == out["full"]
    assert len(out["cali"]) == 100 and all(n.startswith("cali") for n in out["cali"])
    assert set(out["nsid"]) == {None}      # both ends here: no peer netns
