"""``netpluginctl``: a ``calicoctl`` (v0.x)-style command for the Calico data the
calico backend keeps in its datastore; one module per noun, the parser in cli.py.

pool, profile (with rules), endpoint, ipam, host, status, log_level, diags
and datastore (migrate) hold the commands; base the shared parts.
"""
from backends.calico.ctl.base import CtlError, format_table
from backends.calico.ctl.cli import Ctl, build_parser, main
from backends.calico.ctl.rules import parse_rule, rule_text

__all__ = ["Ctl", "CtlError", "build_parser", "format_table", "main", "parse_rule",
           "rule_text"]
