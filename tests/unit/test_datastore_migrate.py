"""``netpluginctl datastore migrate``: the Calico tree from the embedded store
(or a v2 etcd) to etcdv3 on a real etcd; dry run, idempotent, --json."""
import json

from backends.calico import ctl
from netplugin.config import DatastoreConfig
from netplugin.datastore import open_datastore
from netplugin.datastore.migrate import plan
from netplugin.datastore.base import Item
from tests.datastore_servers import run_etcd


def test_plan_is_pure():
    source = [Item("/calico/a", "1", 5), Item("/calico/b", "2", 6), Item("/calico/c", "3", 7)]
    target = [Item("/calico/b", "2", 100), Item("/calico/c", "old", 101), Item("/calico/z", "", 9)]
    p = plan(source, target)
    assert [i.key for i in p.create] == ["/calico/a"]
    assert [(s.key, t.version) for s, t in p.update] == [("/calico/c", 101)]
    assert p.unchanged == 1 and p.extra == ["/calico/z"] and p.writes == 2


def _cfg(path, datastore):
    path.write_text("[datastore]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                               for k, v in datastore.items()))
    return str(path)


def test_migrate_embedded_and_v2_to_etcdv3(tmp_path, capsys):
    embedded = {"type": "embedded", "path": str(tmp_path / "state.db")}
    with run_etcd() as server:
        v2 = {"type": "etcd", "endpoints": [server.url]}
        v3 = {"type": "etcdv3", "endpoints": [server.url]}
        src_path, v2_path, dst_path = (_cfg(tmp_path / "src.cfg", embedded),
                                       _cfg(tmp_path / "v2.cfg", v2), _cfg(tmp_path / "dst.cfg", v3))
        src = open_datastore(DatastoreConfig(**embedded))
        tree = {"/calico/v1/host/h1/bird_ip": "10.0.0.1",
                "/calico/ipam/v2/assignment/ipv4/block/10.60.0.0-26": json.dumps({"cidr": "x"}),
                "/calico/v1/policy/profile/p/rules": json.dumps({"inbound_rules": []}),
                "/calico/ünï/键": "ü"}
        for k, v in tree.items():
            src.put(k, v)
        src.put("/other/not-copied", "x")
        src.close()
        dst = open_datastore(DatastoreConfig(**v3))
        try:
            assert ctl.main(["datastore", "migrate", "--from", src_path, "--to", dst_path,
                             "--dry-run"]) == 0
            out = capsys.readouterr()
            assert "would write 4 new, 0 changed" in out.out and out.err == ""
            assert dst.list_prefix("/calico") == []
            assert ctl.main(["datastore", "migrate", "--from", src_path, "--to", dst_path]) == 0
            assert "wrote 4 new" in capsys.readouterr().out
            assert {i.key: i.value for i in dst.list_prefix("/calico")} == tree
            assert dst.list_prefix("/other") == []
            # idempotent, and --json like the other commands
            assert ctl.main(["--json", "datastore", "migrate", "--from", src_path,
                             "--to", dst_path]) == 0
            summary = json.loads(capsys.readouterr().out)
            assert (summary["created"], summary["updated"], summary["unchanged"]) == (0, 0, 4)
            # from a v2 etcd: same keys, a changed value is updated
            v2store = open_datastore(DatastoreConfig(**v2))
            for k, v in tree.items():
                v2store.put(k, v)
            v2store.put("/calico/v1/host/h1/bird_ip", "10.0.0.2")
            v2store.close()
            assert ctl.main(["--json", "datastore", "migrate", "--from", v2_path,
                             "--to", dst_path]) == 0
            summary = json.loads(capsys.readouterr().out)
            assert (summary["created"], summary["updated"], summary["unchanged"]) == (0, 1, 3)
            assert dst.get("/calico/v1/host/h1/bird_ip").value == "10.0.0.2"
            # the same datastore twice: refused, one line
            assert ctl.main(["datastore", "migrate", "--from", dst_path, "--to", dst_path]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "name the same datastore" in err[0]
        finally:
            dst.close()
