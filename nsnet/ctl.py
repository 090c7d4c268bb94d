"""`nsnet ctl` and `nsnet ps`: drive a running nsnet over its API socket,
and list the running instances (nsnet/registry.py).

    nsnet ctl [--socket PATH | --instance NAME] COMMAND [ARG]... [--json]
    nsnet ps [--json]

Without --socket or --instance, ctl talks to the only running instance
that has an API socket.  A readable table by default; --json (before or
after COMMAND) prints the API's reply as it is, for scripts.
Exit status: 0, 1 when the request fails or is refused, 2 for bad usage.
"""

from __future__ import annotations

import json
import sys
import time

PROG = "nsnet ctl"
EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

CTL_USAGE = """\
Usage: nsnet ctl [--socket PATH | --instance NAME] COMMAND [ARG]... [--json]
Drive a running nsnet through its API socket.

Commands:
  add-forward SPEC [--mode splice|slirp]
                       publish a port: [HOST_IP:][HOST_PORT]:GUEST_PORT[/tcp|/udp],
                       a range (8000-8002:8000-8002), a bare port (8080),
                       HOST_IP::GUEST_PORT for a port the kernel picks
  list-forwards        the port forwards
  remove-forward ID    remove a forward (several IDs: each)
  info                 versions, PIDs, target, TAP, addresses
  stats                frames, bytes, drops, connections
  start-capture PATH [--max-bytes N]
                       capture every frame to PATH (pcap; created mode 0600
                       or truncated; at most N bytes, default 1 GiB, 0: no
                       limit; docs/capture.md)
  stop-capture         stop the capture (--pcap's or start-capture's)
  policy               the egress policy in force (get_policy)
  set-policy [FILE] [--egress allow|deny] [--allow RULE]... [--deny RULE]...
             [--keep-established]
                       replace the egress policy (set_policy), built as the
                       command line builds it: FILE's rules (JSON, - for
                       stdin), then --allow/--deny in order; --egress replaces
                       FILE's default (docs/policy.md)
  call EXECUTE [JSON]  any API request, reply as JSON

Options:
  -s, --socket=PATH    the API socket (nsnet -a PATH)
  -i, --instance=NAME  an instance of `nsnet ps` (its --name, or its PID)
      --json           print the API's replies as JSON
  -h, --help           show this help and exit
"""

PS_USAGE = """\
Usage: nsnet ps [--json]
List the running nsnet instances of this user (the registry in
$XDG_RUNTIME_DIR/nsnet, or /run/nsnet for root).
"""


class CtlError(Exception):
    def __init__(self, msg: str, code: int = EXIT_FAIL) -> None:
        super().__init__(msg)
        self.code = code


# --------------------------------------------------------------------------
# Finding the socket
# --------------------------------------------------------------------------

def _resolve_socket(socket_path: str | None, instance: str | None) -> str:
    from . import registry

    if socket_path and instance:
        raise CtlError("give --socket or --instance, not both", EXIT_USAGE)
    if socket_path:
        return socket_path
    if instance:
        e = registry.find(instance)
        if e is None:
            raise CtlError(f"no running instance named {instance!r} (see nsnet ps)")
        if not e.get("api_socket"):
            raise CtlError(f"instance {instance!r} (pid {e['pid']}) has no API socket: "
                           "start it with --name or -a PATH")
        return str(e["api_socket"])
    live = [e for e in registry.entries() if e.get("api_socket")]
    if len(live) == 1:
        return str(live[0]["api_socket"])
    if not live:
        raise CtlError("no running nsnet with an API socket; give --socket PATH "
                       "(nsnet -a PATH) or start one with --name NAME", EXIT_USAGE)
    names = ", ".join(str(e.get("name") or e["pid"]) for e in live)
    raise CtlError(f"{len(live)} instances are running ({names}): give --instance NAME",
                   EXIT_USAGE)


def _call(path: str, execute: str, arguments: dict | None = None) -> dict:
    import errno

    from .client import api_call
    from .diag import why
    from .errors import ApiError

    try:
        return api_call(path, execute, arguments)
    except ApiError as e:
        desc = str(e)
        for head in (f"bad request: {execute}: ", f"{execute}: "):  # said once is enough
            if desc.startswith(head):
                desc = desc[len(head):]
                break
        raise CtlError(f"{execute}: {desc}") from None
    except OSError as e:
        hint = {errno.ENOENT: "is nsnet running with this -a/--api-socket?",
                errno.ECONNREFUSED: "the nsnet that made it has exited",
                errno.EACCES: "the socket belongs to another user",
                errno.ENOTSOCK: "not a socket"}.get(e.errno or 0, "")
        raise CtlError(f"cannot reach the API socket {path}: {why(e)}"
                       + (f"; {hint}" if hint else "")) from None


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str("-" if c is None else c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def _addr(a: str, port: object) -> str:
    return f"[{a}]:{port}" if ":" in a else f"{a}:{port}"


def forwards_table(entries: list[dict]) -> str:
    rows = [[e.get("id"), e.get("proto"), _addr(e.get("host_addr", ""), e.get("host_port")),
             _addr(e.get("guest_addr", ""), e.get("guest_port")), e.get("mode", "slirp")]
            for e in entries]
    return table(["ID", "PROTO", "HOST", "GUEST", "MODE"], rows)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def kv_text(d: dict) -> str:
    items = _flatten(d)
    w = max((len(k) for k, _ in items), default=0)
    return "".join(f"{k.ljust(w)}  {json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}\n"
                   for k, v in items)


# --------------------------------------------------------------------------
# ctl
# --------------------------------------------------------------------------

def _add_forward(path: str, args: list[str], as_json: bool) -> int:
    from .portspec import PortSpecError, parse_many

    mode = "slirp"
    rest = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--mode="):
            mode = a.split("=", 1)[1]
        elif a == "--mode" and i + 1 < len(args):
            i += 1
            mode = args[i]
        else:
            rest.append(a)
        i += 1
    if len(rest) != 1:
        raise CtlError("add-forward takes one SPEC ([HOST_IP:][HOST_PORT]:GUEST_PORT[/PROTO])",
                       EXIT_USAGE)
    if mode not in ("slirp", "splice"):
        raise CtlError(f"--mode must be slirp or splice, not {mode!r}", EXIT_USAGE)
    try:
        specs = parse_many(rest[0])
    except PortSpecError as e:
        raise CtlError(f"bad port spec {e}", EXIT_USAGE) from None
    replies = []
    added: list[int] = []
    for spec in specs:
        arguments = {"proto": spec.proto, "host_addr": spec.host_addr,
                     "host_port": spec.host_port, "guest_port": spec.guest_port}
        if spec.guest_addr:
            arguments["guest_addr"] = spec.guest_addr
        if mode != "slirp":
            arguments["mode"] = mode
        try:
            reply = _call(path, "add_hostfwd", arguments)
        except CtlError as e:
            for fid in added:  # a range is all or nothing
                try:
                    _call(path, "remove_hostfwd", {"id": fid})
                except CtlError:
                    pass
            if "slirp_add_hostfwd failed" in str(e) and spec.host_port:
                from .portspec import port_in_use

                if port_in_use(spec.proto, spec.host_addr, spec.host_port):
                    raise CtlError(f"cannot forward {spec}: {spec.host_addr or '0.0.0.0'}:"
                                   f"{spec.host_port}/{spec.proto} is already in use "
                                   "(EADDRINUSE)") from None
            raise
        added.append(int(reply["return"]["id"]))
        replies.append(reply)
    if as_json:
        print(json.dumps(replies[0] if len(replies) == 1 else replies))
        return EXIT_OK
    for spec, reply in zip(specs, replies):
        ret = reply["return"]
        port = ret.get("host_port", spec.host_port)
        host = _addr(spec.host_addr or "0.0.0.0", port)
        print(f"forward {ret['id']}: {host}/{spec.proto} -> guest port {spec.guest_port}"
              + (f" ({mode})" if mode != "slirp" else ""))
    return EXIT_OK


def _start_capture(path: str, args: list[str], as_json: bool) -> int:
    import os

    from .options import PCAP_MAX_BYTES

    max_bytes: int | None = None
    rest = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--max-bytes="):
            text: str | None = a.split("=", 1)[1]
        elif a == "--max-bytes":
            if i + 1 == len(args):
                raise CtlError("--max-bytes needs a number of bytes", EXIT_USAGE)
            i += 1
            text = args[i]
        else:
            rest.append(a)
            text = None
        if text is not None:
            if not text.isdigit():
                raise CtlError(f"--max-bytes must be a non-negative integer (0: no limit), "
                               f"not {text!r}", EXIT_USAGE)
            max_bytes = int(text)
        i += 1
    if len(rest) != 1 or not rest[0]:
        raise CtlError("start-capture takes one PATH (the pcap file to write)", EXIT_USAGE)
    # The supervisor opens it, from its own working directory: send it absolute.
    file = os.path.abspath(rest[0])
    arguments: dict = {"path": file}
    if max_bytes is not None:
        arguments["max_bytes"] = max_bytes
    reply = _call(path, "start_capture", arguments)
    if as_json:
        print(json.dumps(reply))
        return EXIT_OK
    cap = PCAP_MAX_BYTES if max_bytes is None else max_bytes
    print(f"capturing to {file} (" + (f"at most {cap} bytes)" if cap else "no size limit)"))
    return EXIT_OK


def _stop_capture(path: str, as_json: bool) -> int:
    file = None
    if not as_json:  # to say which file was closed (best effort)
        try:
            file = _call(path, "get_info")["return"].get("capture")
        except (CtlError, AttributeError, KeyError, TypeError):
            file = None
    reply = _call(path, "stop_capture")
    print(json.dumps(reply) if as_json else
          "capture stopped" + (f": {file}" if isinstance(file, str) else ""))
    return EXIT_OK


def _policy(path: str, as_json: bool) -> int:
    reply = _call(path, "get_policy")
    if as_json:
        print(json.dumps(reply))
        return EXIT_OK
    from .policy import PolicyError, rule_from_json

    pol = reply.get("return", {})
    rows = []
    for i, r in enumerate(pol.get("rules", [])):
        try:
            text = rule_from_json(r, i).text()
        except PolicyError:
            text = json.dumps(r)
        rows.append([i, r.get("action") if isinstance(r, dict) else None, text])
    sys.stdout.write(f"egress {pol.get('egress')} (what no rule matches gets)\n")
    if rows:
        sys.stdout.write(table(["#", "ACTION", "RULE"], rows))
    return EXIT_OK


def _set_policy(path: str, args: list[str], as_json: bool) -> int:
    from .policy import PolicyError, from_options

    egress = file = None
    ordered: list[tuple[str, str]] = []
    keep = False
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, val = a.partition("=")
        if name in ("--egress", "--allow", "--deny"):
            if not eq:
                if i + 1 == len(args):
                    raise CtlError(f"{name} needs a value", EXIT_USAGE)
                i += 1
                val = args[i]
            if name == "--egress":
                if val not in ("allow", "deny"):
                    raise CtlError(f"--egress must be allow or deny, not {val!r}", EXIT_USAGE)
                egress = val
            else:
                ordered.append((name[2:], val))
        elif a == "--keep-established":
            keep = True
        elif a.startswith("--"):
            raise CtlError(f"set-policy: unknown option {a!r}", EXIT_USAGE)
        elif file is None:
            file = "/dev/stdin" if a == "-" else a
        else:
            raise CtlError("set-policy takes one FILE", EXIT_USAGE)
        i += 1
    try:
        pol = from_options(egress, ordered, file)
    except PolicyError as e:
        raise CtlError(str(e), EXIT_USAGE) from None
    if pol is None:
        raise CtlError("set-policy needs a FILE or --egress, --allow, --deny", EXIT_USAGE)
    reply = _call(path, "set_policy", dict(pol.to_json(), keep_established=keep))
    n = len(pol.rules)
    print(json.dumps(reply) if as_json else
          f"policy set: egress {pol.default}, {n} rule{'' if n == 1 else 's'}"
          + (" (established flows kept)" if keep else ""))
    return EXIT_OK


def ctl_main(argv: list[str]) -> int:
    from .getopt_long import GetoptError, getopt_long

    try:
        opts, args = getopt_long(argv, "+s:i:h", ["socket=", "instance=", "json", "help"])
    except GetoptError as e:
        print(f"{PROG}: {e}\nTry 'nsnet ctl --help'.", file=sys.stderr)
        return EXIT_USAGE
    socket_path = instance = None
    as_json = False
    for o, v in opts:
        if o in ("-h", "--help"):
            sys.stdout.write(CTL_USAGE)
            return EXIT_OK
        if o in ("-s", "--socket"):
            socket_path = v
        elif o in ("-i", "--instance"):
            instance = v
        elif o == "--json":
            as_json = True
    if "--json" in args:  # accepted after COMMAND too
        as_json = True
        args = [a for a in args if a != "--json"]
    if not args:
        sys.stderr.write(CTL_USAGE)
        return EXIT_USAGE
    cmd, rest = args[0], args[1:]
    try:
        path = _resolve_socket(socket_path, instance)
        return _run(path, cmd, rest, as_json)
    except CtlError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.code


def _run(path: str, cmd: str, rest: list[str], as_json: bool) -> int:
    if cmd == "add-forward":
        return _add_forward(path, rest, as_json)
    if cmd == "list-forwards":
        _no_args(cmd, rest)
        reply = _call(path, "list_hostfwd")
        entries = reply.get("return", reply).get("entries", reply.get("entries", []))
        sys.stdout.write(json.dumps(reply) + "\n" if as_json else forwards_table(entries))
        return EXIT_OK
    if cmd == "remove-forward":
        if not rest:
            raise CtlError("remove-forward takes a forward ID (see list-forwards)", EXIT_USAGE)
        for r in rest:
            if not r.isdigit():
                raise CtlError(f"a forward ID is a number, not {r!r}", EXIT_USAGE)
        for r in rest:
            reply = _call(path, "remove_hostfwd", {"id": int(r)})
            print(json.dumps(reply) if as_json else f"forward {r} removed")
        return EXIT_OK
    if cmd in ("info", "stats"):
        _no_args(cmd, rest)
        reply = _call(path, "get_info" if cmd == "info" else "get_stats")
        sys.stdout.write(json.dumps(reply) + "\n" if as_json else kv_text(reply["return"]))
        return EXIT_OK
    if cmd == "start-capture":
        return _start_capture(path, rest, as_json)
    if cmd == "stop-capture":
        _no_args(cmd, rest)
        return _stop_capture(path, as_json)
    if cmd == "policy":
        _no_args(cmd, rest)
        return _policy(path, as_json)
    if cmd == "set-policy":
        return _set_policy(path, rest, as_json)
    if cmd == "call":
        if not rest or len(rest) > 2:
            raise CtlError("call takes EXECUTE and optionally a JSON object of arguments",
                           EXIT_USAGE)
        arguments = None
        if len(rest) == 2:
            try:
                arguments = json.loads(rest[1])
            except ValueError as e:
                raise CtlError(f"call: the arguments are not JSON: {e}", EXIT_USAGE) from None
        print(json.dumps(_call(path, rest[0], arguments)))
        return EXIT_OK
    raise CtlError(f"unknown command {cmd!r}; see nsnet ctl --help", EXIT_USAGE)


def _no_args(cmd: str, rest: list[str]) -> None:
    if rest:
        raise CtlError(f"{cmd} takes no arguments, not {' '.join(rest)!r}", EXIT_USAGE)


# --------------------------------------------------------------------------
# ps
# --------------------------------------------------------------------------

def _uptime(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ps_rows() -> list[dict]:
    from . import registry
    from .client import api_call

    out = []
    now = time.time()
    for e in registry.entries():
        fwds = None
        sock = e.get("api_socket")
        if sock:
            try:
                reply = api_call(sock, "list_hostfwd", timeout=2.0)
                fwds = len(reply.get("entries", []))
            except Exception:  # noqa: BLE001  (a busy or dying instance: show "-")
                fwds = None
        row = dict(e)
        row["forwards"] = fwds
        row["uptime"] = round(now - float(e.get("started", now)), 3)
        out.append(row)
    return out


def ps_main(argv: list[str]) -> int:
    as_json = False
    for a in argv:
        if a == "--json":
            as_json = True
        elif a in ("-h", "--help"):
            sys.stdout.write(PS_USAGE)
            return EXIT_OK
        else:
            print(f"nsnet ps: unknown argument {a!r}\nTry 'nsnet ps --help'.", file=sys.stderr)
            return EXIT_USAGE
    rows = ps_rows()
    if as_json:
        print(json.dumps(rows))
        return EXIT_OK
    sys.stdout.write(table(
        ["NAME", "PID", "KIND", "TARGET", "TAP", "API SOCKET", "FORWARDS", "UPTIME"],
        [[r.get("name"), r.get("pid"), r.get("kind"), r.get("target"), r.get("tap"),
          r.get("api_socket"), r.get("forwards"), _uptime(r["uptime"])] for r in rows]))
    return EXIT_OK
