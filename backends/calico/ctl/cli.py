"""netpluginctl's command line: the argument parser (argparse, plus hand parsers
for ``profile`` and ``endpoint``), ``Ctl`` (every noun's commands) and ``main``.

It reads the plugin's own config file (``-f FILE``, default
``$NETPLUGIN_CONFIG``, else ``./plugin.cfg``) so the datastore and the host
name are the plugin's.  Global options (anywhere on the line):
``-f/--config FILE``, ``--json`` (machine-readable output of every command).
Errors are one line ``netpluginctl: error: <message>`` on stderr and exit
status 1; usage errors exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from netplugin import __version__
from netplugin.cli import default_config_path
from netplugin.config import load_config
from netplugin.datastore import open_datastore
from netplugin.errors import ConfigError, PluginError

from backends.calico.ctl.base import PROG, CtlError, _Usage
from backends.calico.ctl.datastore import datastore_migrate
from backends.calico.ctl.diags import DiagsCommands
from backends.calico.ctl.host import HostCommands
from backends.calico.ctl.ipam import IpamCommands
from backends.calico.ctl.log_level import LogLevelCommands
from backends.calico.ctl.pool import PoolCommands
from backends.calico.ctl.profile import ProfileCommands
from backends.calico.ctl.rules import parse_rule

__all__ = ["Ctl", "CtlError", "USAGE", "build_parser", "main"]

#: The subcommands (the epilog of ``--help``; ``<command> --help`` shows its lines).
USAGE = """\
    netpluginctl pool add <CIDRS>... [--ipip] [--nat-outgoing]
    netpluginctl pool remove <CIDRS>...
    netpluginctl pool show [--ipv4 | --ipv6]
    netpluginctl profile show [--detailed]
    netpluginctl profile add <PROFILE>
    netpluginctl profile remove <PROFILE> [--no-check]
    netpluginctl profile <PROFILE> tag show
    netpluginctl profile <PROFILE> tag (add|remove) <TAG>
    netpluginctl profile <PROFILE> rule show
    netpluginctl profile <PROFILE> rule json
    netpluginctl profile <PROFILE> rule update            (rules JSON on stdin)
    netpluginctl profile <PROFILE> rule add (inbound|outbound) [--at=<POS>] <RULE>
    netpluginctl profile <PROFILE> rule remove (inbound|outbound) (--at=<POS> | <RULE>)
    netpluginctl endpoint show [--host=<H>] [--orchestrator=<O>] [--workload=<W>]
                               [--endpoint=<E>] [--detailed]
    netpluginctl endpoint <ID> profile show
    netpluginctl endpoint <ID> profile (append|remove|set) <PROFILES>...
    netpluginctl ipam info <IP>
    netpluginctl ipam release (<IP> | --ip=<IP>) [--force]
    netpluginctl host remove <NAME> [--force]
    netpluginctl status
    netpluginctl log-level (debug|info|warning|error|critical)
    netpluginctl diags [--output DIR] [--log FILE]...
    netpluginctl datastore migrate --from CFG --to CFG [--dry-run]

    <RULE> = (allow|deny) [(tcp|udp|icmp|icmpv6)] [type <T> [code <C>]]
             [from [ports <P>] [tag <TAG>] [cidr <CIDR> | <CIDR>]]
             [to   [ports <P>] [tag <TAG>] [cidr <CIDR> | <CIDR>]]

"""


class Ctl(PoolCommands, ProfileCommands, IpamCommands, HostCommands, DiagsCommands,
          LogLevelCommands):
    """Every netpluginctl command, as a method (the nouns' classes together)."""


def _parser(prog: str, **kw) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, **kw)


def build_parser() -> argparse.ArgumentParser:
    ap = _parser(PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                 description="calicoctl-style management of the Calico data used by the "
                             "netplugin calico backend.",
                 epilog="usage of the subcommands:\n" + USAGE)
    ap.add_argument("-f", "--config", default=None,
                    help="the plugin's TOML config (default: $NETPLUGIN_CONFIG, "
                         "else ./plugin.cfg)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pool = sub.add_parser("pool", help="IP pools").add_subparsers(dest="op", metavar="OP")
    pool.required = True
    p = pool.add_parser("add", help="add pools, or update an identical pool's flags")
    p.add_argument("cidrs", nargs="+", metavar="CIDR")
    p.add_argument("--ipip", action="store_true", help="IP-in-IP to other hosts (IPv4 only)")
    p.add_argument("--nat-outgoing", action="store_true",
                   help="masquerade traffic leaving the pools")
    p = pool.add_parser("remove", help="disable, release block affinities, delete")
    p.add_argument("cidrs", nargs="+", metavar="CIDR")
    p = pool.add_parser("show", help="list pools")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ipv4", dest="version", action="store_const", const=4)
    g.add_argument("--ipv6", dest="version", action="store_const", const=6)

    p = sub.add_parser("profile", help="profiles, their tags and rules", add_help=False,
                       usage=f"{PROG} profile (show|add|remove|<PROFILE> (tag|rule)) ...")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p = sub.add_parser("endpoint", help="workload endpoints", add_help=False,
                       usage=f"{PROG} endpoint (show|<ENDPOINT_ID> profile) ...")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    ipam = sub.add_parser("ipam", help="IP address management").add_subparsers(
        dest="op", metavar="OP")
    ipam.required = True
    p = ipam.add_parser("info", help="who holds an address")
    p.add_argument("ip", metavar="IP")
    p = ipam.add_parser("release", help="free an address (leaked by a crash)")
    p.add_argument("ip", nargs="?", metavar="IP")
    p.add_argument("--ip", dest="ip_opt", metavar="IP")
    p.add_argument("--force", action="store_true",
                   help="release even when an endpoint still uses the address")

    host = sub.add_parser("host", help="Calico hosts").add_subparsers(dest="op",
                                                                      metavar="OP")
    host.required = True
    p = host.add_parser("remove", help="forget a host that is gone: its block affinities, "
                                       "blocks and bird_ip")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", action="store_true",
                   help="also delete its workload endpoint records (or remove this host)")

    sub.add_parser("status", help="datastore, plugin socket, health, this host's endpoints "
                                  "and routes")
    p = sub.add_parser("log-level", help="change the running plugin's log level")
    p.add_argument("level", choices=["debug", "info", "warning", "error", "critical"])
    ds = sub.add_parser("datastore", help="the datastore itself").add_subparsers(
        dest="op", metavar="OP")
    ds.required = True
    p = ds.add_parser("migrate", help="copy the Calico tree from the datastore of one "
                                      "config to that of another (e.g. etcd v2 to etcdv3)")
    p.add_argument("--from", dest="source", required=True, metavar="CFG",
                   help="config file naming the datastore to copy from")
    p.add_argument("--to", dest="target", required=True, metavar="CFG",
                   help="config file naming the datastore to copy to")
    p.add_argument("--dry-run", action="store_true", help="only say what would be written")
    p = sub.add_parser("diags", help="collect a diagnostics tarball")
    p.add_argument("--output", metavar="DIR", help="directory for the tarball (default: a "
                                                    "new private directory in the "
                                                    "temporary directory)")
    p.add_argument("--log", action="append", default=[], metavar="FILE",
                   help="a plugin log file to include (repeatable)")
    return ap


def _command_help(command: str) -> None:
    """``profile --help`` (anywhere on the line): that command's usage lines."""
    lines, take = [], False
    for line in USAGE.splitlines():
        if line.strip().startswith(PROG):
            take = line.strip().startswith(f"{PROG} {command} ")
        elif not line.startswith("      "):
            take = False
        if take:
            lines.append(line)
    if command == "profile":
        lines += [""] + USAGE[USAGE.index("    <RULE>"):].rstrip().splitlines()
    print("usage:\n" + "\n".join(lines))
    raise SystemExit(0)


def _profile_command(rest: List[str]) -> Tuple[str, Dict[str, Any]]:
    """Hand parser of ``profile ...`` (``profile NAME ...`` and ``profile
    add|show|remove`` share the first word)."""
    if "-h" in rest or "--help" in rest:
        _command_help("profile")
    base = f"{PROG} profile"
    top = _parser(base, usage=f"{base} (show [--detailed] | add <PROFILE> | remove "
                              f"<PROFILE> [--no-check] | <PROFILE> tag ... | "
                              f"<PROFILE> rule ...)")
    if not rest:
        raise _Usage(top, "expected show, add, remove or a profile name")
    head, args = rest[0], rest[1:]
    if head == "show":
        p = _parser(f"{base} show")
        p.add_argument("--detailed", action="store_true")
        return "profile_show", vars(p.parse_args(args))
    if head == "add":
        p = _parser(f"{base} add")
        p.add_argument("name", metavar="PROFILE")
        return "profile_add", vars(p.parse_args(args))
    if head == "remove":
        p = _parser(f"{base} remove")
        p.add_argument("name", metavar="PROFILE")
        p.add_argument("--no-check", action="store_true",
                       help="remove even when endpoints or a Docker network use it")
        return "profile_remove", vars(p.parse_args(args))
    if head.startswith("-"):
        raise _Usage(top, f"unrecognized argument {head}")
    name = head
    what = args[0] if args else None
    args = args[1:]
    if what == "tag":
        p = _parser(f"{base} {name} tag")
        p.add_argument("op", choices=("show", "add", "remove"))
        p.add_argument("tag", nargs="?", metavar="TAG")
        ns = p.parse_args(args)
        if ns.op == "show":
            if ns.tag is not None:
                raise _Usage(p, f"unrecognized argument {ns.tag}")
            return "tag_show", {"name": name}
        if ns.tag is None:
            raise _Usage(p, f"tag {ns.op} needs a TAG")
        return f"tag_{ns.op}", {"name": name, "tag": ns.tag}
    if what == "rule":
        p = _parser(f"{base} {name} rule",
                    usage=f"{base} {name} rule (show | json | update | add (inbound|outbound) "
                          f"[--at=<POS>] <RULE> | remove (inbound|outbound) "
                          f"(--at=<POS> | <RULE>))")
        if not args:
            raise _Usage(p, "expected show, json, update, add or remove")
        op, args = args[0], args[1:]
        if op in ("show", "json", "update"):
            if args:
                raise _Usage(p, f"unrecognized argument {args[0]}")
            return f"rule_{op}", {"name": name}
        if op not in ("add", "remove"):
            raise _Usage(p, f"unknown rule operation {op!r}")
        position = None
        tokens: List[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--at" or a.startswith("--at="):
                if a == "--at":
                    if i + 1 >= len(args):
                        raise _Usage(p, "--at needs a position")
                    value, i = args[i + 1], i + 2
                else:
                    value, i = a[len("--at="):], i + 1
                try:
                    position = int(value)
                except ValueError:
                    raise _Usage(p, f"--at: position must be an integer, got {value!r}") \
                        from None
                continue
            tokens.append(a)
            i += 1
        if not tokens or tokens[0] not in ("inbound", "outbound"):
            raise _Usage(p, "expected inbound or outbound")
        direction, spec = tokens[0], tokens[1:]
        if op == "remove" and position is not None:
            if spec:
                raise _Usage(p, "rule remove takes --at=<POS> or a rule, not both")
            return "rule_remove", {"name": name, "direction": direction,
                                   "position": position, "spec": None}
        if not spec:
            raise _Usage(p, f"rule {op} needs a rule (allow|deny ...)"
                         + (" or --at=<POS>" if op == "remove" else ""))
        return f"rule_{op}", {"name": name, "direction": direction, "position": position,
                              "spec": spec}
    raise _Usage(top, f"expected 'tag' or 'rule' after the profile name {name!r}")


def _endpoint_command(rest: List[str]) -> Tuple[str, Dict[str, Any]]:
    if "-h" in rest or "--help" in rest:
        _command_help("endpoint")
    base = f"{PROG} endpoint"
    top = _parser(base, usage=f"{base} (show [--host=<H>] [--orchestrator=<O>] "
                              f"[--workload=<W>] [--endpoint=<E>] [--detailed] | "
                              f"<ENDPOINT_ID> profile (show | append|remove|set "
                              f"<PROFILES>...))")
    if not rest:
        raise _Usage(top, "expected show or an endpoint ID")

    def filters(p: argparse.ArgumentParser, endpoint: bool) -> None:
        p.add_argument("--host", metavar="HOSTNAME")
        p.add_argument("--orchestrator", metavar="ORCHESTRATOR_ID")
        p.add_argument("--workload", metavar="WORKLOAD_ID")
        if endpoint:
            p.add_argument("--endpoint", metavar="ENDPOINT_ID")

    head, args = rest[0], rest[1:]
    if head == "show":
        p = _parser(f"{base} show")
        filters(p, True)
        p.add_argument("--detailed", action="store_true")
        return "endpoint_show", vars(p.parse_args(args))
    if head.startswith("-"):
        raise _Usage(top, f"unrecognized argument {head}")
    if not args or args[0] != "profile":
        raise _Usage(top, f"expected 'profile' after the endpoint ID {head!r}")
    p = _parser(f"{base} {head} profile")
    p.add_argument("op", choices=("show", "append", "remove", "set"))
    p.add_argument("profiles", nargs="*", metavar="PROFILE")
    filters(p, False)
    ns = p.parse_intermixed_args(args[1:])
    common = {"endpoint_id": head, "host": ns.host, "orchestrator": ns.orchestrator,
              "workload": ns.workload}
    if ns.op == "show":
        if ns.profiles:
            raise _Usage(p, f"unrecognized argument {ns.profiles[0]}")
        return "endpoint_profile_show", common
    if ns.op != "set" and not ns.profiles:
        raise _Usage(p, f"profile {ns.op} needs at least one PROFILE")
    return "endpoint_profile_change", {"op": ns.op, "profiles": ns.profiles, **common}


def _hoist_globals(argv: List[str]) -> List[str]:
    """Move the global options (``-f FILE``, ``--config[=]FILE``, ``--json``,
    ``--debug``) to the front, wherever they were written."""
    front: List[str] = []
    rest: List[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest += argv[i:]
            break
        if a in ("--json", "--debug"):
            front.append(a)
        elif a in ("-f", "--config"):
            front += argv[i:i + 2]
            i += 1
        elif a.startswith("--config=") or (a.startswith("-f") and len(a) > 2):
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest


def _dispatch(args: argparse.Namespace) -> Tuple[str, Dict[str, Any]]:
    if args.command == "pool":
        if args.op == "add":
            return "pool_add", {"cidrs": args.cidrs, "ipip": args.ipip,
                                "nat_outgoing": args.nat_outgoing}
        if args.op == "remove":
            return "pool_remove", {"cidrs": args.cidrs}
        return "pool_show", {"version": args.version}
    if args.command == "profile":
        return _profile_command(list(args.rest))
    if args.command == "endpoint":
        return _endpoint_command(list(args.rest))
    if args.command == "ipam":
        if args.op == "info":
            return "ipam_info", {"text": args.ip}
        if (args.ip is None) == (args.ip_opt is None):
            raise _Usage(argparse.ArgumentParser(prog=f"{PROG} ipam release"),
                         "give the address once: <IP> or --ip=<IP>")
        return "ipam_release", {"text": args.ip or args.ip_opt, "force": args.force}
    if args.command == "host":
        return "host_remove", {"name": args.name, "force": args.force}
    if args.command == "status":
        return "status", {}
    if args.command == "log-level":
        return "log_level", {"level": args.level}
    if args.command == "datastore":
        return "datastore_migrate", {"source": args.source, "target": args.target,
                                     "dry_run": args.dry_run}
    return "diags", {"output": args.output, "logs": args.log}


def _run(ctl: Ctl, name: str, kw: Dict[str, Any]) -> int:
    if name == "profile_show":
        return ctl.profile_show(kw["detailed"])
    if name == "profile_remove":
        return ctl.profile_remove(kw["name"], kw["no_check"])
    if name == "rule_update":
        return ctl.rule_update(kw["name"], sys.stdin.read())
    if name in ("rule_add", "rule_remove"):
        rule = parse_rule(kw["spec"]) if kw["spec"] is not None else None
        method = getattr(ctl, name)
        return method(kw["name"], kw["direction"], kw["position"], rule)
    if name == "endpoint_show":
        return ctl.endpoint_show(kw["host"], kw["orchestrator"], kw["workload"],
                                 kw["endpoint"], kw["detailed"])
    return getattr(ctl, name)(**kw)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


_QUIET_LOGGERS = ("urllib3", "etcd", "docker", "consul")


def _setup_logging(debug: bool) -> Callable[[], None]:
    """Warnings of the libraries as ``netpluginctl: warning: ...`` lines on
    stderr; returns the function restoring the previous logging setup (main()
    is also called in-process, by the tests)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level,
             {n: logging.getLogger(n).level for n in _QUIET_LOGGERS})
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        # the datastore adapters turn their failures into one DatastoreError;
        # the HTTP libraries' own retry chatter would only add lines
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)

    def restore() -> None:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)

    return restore


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        try:
            argv = _hoist_globals(argv)
            words = [a for i, a in enumerate(argv) if not a.startswith("-")
                     and (i == 0 or argv[i - 1] not in ("-f", "--config"))]
            if words and words[0] in ("profile", "endpoint") and \
                    ("-h" in argv or "--help" in argv):
                _command_help(words[0])
            args = parser.parse_args(argv)
            name, kw = _dispatch(args)
        except _Usage as exc:
            exc.parser.error(str(exc))     # prints the usage, exits 2
    except SystemExit as exc:              # argparse: usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    restore_logging = _setup_logging(args.debug)
    store = None
    try:
        if name == "datastore_migrate":   # its two configs, not the plugin's
            return datastore_migrate(as_json=args.json, **kw)
        path = args.config or default_config_path()
        cfg = load_config(path)
        if cfg.backend != "calico":
            raise ConfigError(f"{path}: backend is {cfg.backend!r}; {PROG} manages the "
                              "calico backend's data only")
        store = open_datastore(cfg.datastore)
        ctl = Ctl(cfg, store, as_json=args.json)
        return _run(ctl, name, kw)
    except (PluginError, ConfigError) as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback for the operator
        if args.debug:
            raise
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {exc} (run with --debug "
              "for a traceback)", file=sys.stderr)
        return 1
    finally:
        if store is not None:
            try:
                store.close()
            except Exception:
                pass
        restore_logging()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
