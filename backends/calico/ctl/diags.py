"""netpluginctl's ``diags``: one tarball (mode 0600) with the config, a dump of
the Calico keys, the status, kernel routes/links/nftables, state and logs.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import sys
import tarfile
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from netplugin import __version__
from netplugin.errors import PluginError

from backends.calico.ctl import base as ctl_base
from backends.calico.ctl.base import PROG, CtlError, _json_text
from backends.calico.ctl.status import StatusCommands

#: Keys dumped by ``diags``.
DUMP_PREFIXES = ("/calico",)


class DiagsCommands(StatusCommands):
    def diags(self, output: Optional[str], logs: Sequence[str]) -> int:
        """The tarball is mode 0600, created exclusively (never through a
        name someone else planted); without ``--output`` it goes to a new
        private (0700) directory under the temporary directory."""
        if output and not os.path.isdir(output):
            raise CtlError(f"output directory {output} does not exist")
        out_dir = output or tempfile.mkdtemp(prefix="netplugin-diags-")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        safe_host = re.sub(r"[^A-Za-z0-9_.-]", "_", self.hostname)
        base = f"netplugin-diags-{safe_host}-{stamp}"
        path = os.path.join(out_dir, base + ".tar.gz")
        errors: List[str] = []
        with tempfile.TemporaryDirectory(prefix="netpluginctl-diags-") as work:
            top = os.path.join(work, base)
            os.makedirs(top)

            def write(name: str, text: str) -> None:
                full = os.path.join(top, name)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                with open(full, "w") as f:
                    f.write(text)

            # configuration
            try:
                os.makedirs(os.path.join(top, "config"))
                shutil.copyfile(self.cfg.path, os.path.join(
                    top, "config", os.path.basename(self.cfg.path)))
            except OSError as exc:
                errors.append(f"config {self.cfg.path}: {exc}")
            # datastore
            dump: Dict[str, Any] = {"datastore": self.datastore_description(), "keys": []}
            for prefix in DUMP_PREFIXES:
                try:
                    dump["keys"] += [{"key": i.key, "value": i.value, "version": i.version}
                                     for i in self.store.list_prefix(prefix)]
                except PluginError as exc:
                    errors.append(f"datastore dump of {prefix}: {exc}")
            write("datastore.json", _json_text(dump))
            # status summary
            try:
                write("status.json", _json_text(self.collect_status()))
            except PluginError as exc:
                errors.append(f"status: {exc}")
            # kernel state
            commands = [("ip-route.json", ["ip", "-j", "route", "show"]),
                        ("ip-6-route.json", ["ip", "-j", "-6", "route", "show"]),
                        ("ip-link.json", ["ip", "-j", "link", "show"]),
                        ("ip-addr.json", ["ip", "-j", "addr", "show"])]
            if shutil.which("nft"):
                commands += [("nft-ruleset.json", ["nft", "-j", "list", "ruleset"]),
                             ("nft-ruleset.txt", ["nft", "list", "ruleset"])]
            else:
                errors.append("nft: command not found (no ruleset collected)")
            for name, argv in commands:
                rc, out, err = ctl_base.run_command(argv)
                if rc != 0:
                    errors.append(f"{' '.join(argv)}: exit {rc}: {(err or out).strip()}")
                write(name, out)
            # host-local state of the driver (gateway table, ...)
            state = self.cfg.driver_state_dir
            if os.path.isdir(state):
                try:
                    shutil.copytree(state, os.path.join(top, "state"), symlinks=True)
                except (OSError, shutil.Error) as exc:
                    errors.append(f"state directory {state}: {exc}")
            # logs
            if logs:
                os.makedirs(os.path.join(top, "logs"))
            for i, log_path in enumerate(logs):
                try:
                    shutil.copyfile(log_path, os.path.join(
                        top, "logs", f"{i}-{os.path.basename(log_path)}"))
                except OSError as exc:
                    errors.append(f"log {log_path}: {exc.strerror or exc}")
            write("errors.txt", "".join(f"{e}\n" for e in errors))
            write("README.txt", f"netpluginctl {__version__} diagnostics of host "
                  f"{self.hostname}, {stamp}\nconfig: {self.cfg.path}\n"
                  f"datastore: {self.datastore_description()}\n")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
                    tar.add(top, arcname=base)
            except OSError as exc:
                raise CtlError(f"cannot write {path}: {exc.strerror or exc}") from None
        for err in errors:
            print(f"{PROG}: warning: {err}", file=sys.stderr)
        self.emit(f"Diagnostics saved to {path}", {"path": path, "errors": errors})
        return 0


