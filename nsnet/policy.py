"""Egress policy: the rule model and the ONE decision function.

A policy is a default action (``allow`` or ``deny``) and an ordered list of
rules; the first rule that matches a flow decides it, else the default.

RULE (command line, ``--allow=RULE`` / ``--deny=RULE``) is
``[PROTO:]DEST[:PORTS]``:

- PROTO: ``tcp``, ``udp`` or ``icmp``; absent: all three.
- DEST: an IPv4 or IPv6 address or CIDR (IPv6 in brackets when a port
  follows: ``[fd00::2]:80``), a DNS name (``pypi.org``) or a suffix pattern
  (``*.example.org``: subdomains, not the bare name).  Names are compared
  case-insensitively and without a trailing dot.
- PORTS: a port or a range ``8000-8100``; absent: all.  Not with ``icmp``.

JSON form (``--policy=FILE``, the API's get_policy/set_policy)::

    {"egress": "deny",
     "rules": [{"action": "allow", "proto": "tcp", "dest": "pypi.org", "ports": "443"}]}

API for the data path and for other enforcement points (the socket bypass
of issue 13 calls this from its seccomp-notify handler)::

    pol = Policy.parse_json(obj)            # or Policy(default, [Rule...]),
                                            # Policy.from_args(egress, allow, deny)
    d = pol.decide("tcp", "10.0.2.2", 8000, names=())
    d.action        # "allow" or "deny"
    d.rule_index    # index of the deciding rule, or None for the default
    d.rule          # the Rule, or None
    d.final         # True when no name rule could have decided earlier:
                    # the decision does not depend on DNS-learned names

``names`` are the DNS names nsnet learned for ``ip`` (from answers of the
built-in DNS forwarder).  A caller that knows no names (the bypass: it sees
only connect()'s address) must treat ``final == False`` as "ask the data
path": the normal path (through libslirp) applies the learned names.

Semantics of names (one rule for everything): a rule whose DEST is a name
matches a flow when one of the names learned for the flow's destination
address is that name (or, for ``*.suffix``, ends with ``.suffix``).  Every
rule is then checked in order as written, address rules and name rules
alike: if a deny rule for 192.0.2.0/24 comes before ``allow=pypi.org`` and
pypi.org resolves into 192.0.2.0/24, the connection is denied; in the other
order it is allowed.

Lookups are by structure, not by scanning: addresses in one hash table per
prefix length (longest-prefix style: at most 33 or 129 probes, in practice
one per distinct prefix length used), names in an exact map and a suffix
map.  Each table entry holds the ascending indices of the rules with that
DEST; the decision is the smallest index whose proto and ports match.

``Policy.compile()`` turns the rules into the flat arrays the C data path
(csrc/policy.c) looks up with the same algorithm; tests/unit/test_policy.py
runs shared vectors through both.
"""

from __future__ import annotations

import ipaddress
import json
import re
TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~7 ms (the forwarder imports this)
    from typing import Any, Iterable

from .errors import PolicyError  # an NsnetError and a ValueError

ALLOW = "allow"
DENY = "deny"
ACTIONS = (ALLOW, DENY)
PROTOS = ("tcp", "udp", "icmp")
PROTO_BITS = {"tcp": 1, "udp": 2, "icmp": 4}
ALL_PROTOS = 7

# Bounds on what a policy may contain (a policy comes from the API too).
MAX_RULES = 100_000
MAX_NAME = 253
DNS_FORWARDER_RULE = "(built-in DNS forwarder)"

_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")



def normalize_name(name: str) -> str:
    """Lower case, no trailing dot: the form names are compared in."""
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    return name


def _check_name(name: str, what: str) -> str:
    n = normalize_name(name)
    if not n or len(n) > MAX_NAME:
        raise PolicyError(f"{what}: {name!r} is not a DNS name (1 to {MAX_NAME} characters)")
    for label in n.split("."):
        if not _LABEL_RE.match(label):
            raise PolicyError(
                f"{what}: {name!r} is not a DNS name (label {label!r}: letters, digits, "
                "'-' and '_', 1 to 63 characters, no '-' at either end)")
    return n


def _parse_ports(text: Any, what: str) -> tuple[int, int]:
    if isinstance(text, bool):
        raise PolicyError(f"{what}: ports must be a port or a range like 8000-8100")
    if isinstance(text, int):
        lo = hi = text
    elif isinstance(text, str):
        m = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?", text.strip())
        if not m:
            raise PolicyError(
                f"{what}: bad ports {text!r}: a port (443) or a range (8000-8100)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
    else:
        raise PolicyError(f"{what}: ports must be a port or a range like 8000-8100")
    if not (0 <= lo <= 65535 and 0 <= hi <= 65535):
        raise PolicyError(f"{what}: port out of range 0-65535 in {text!r}")
    if lo > hi:
        raise PolicyError(f"{what}: empty port range {text!r} (start above end)")
    return lo, hi


class Rule:
    """One rule (immutable).  Exactly one of net (an address or CIDR), name
    (exact) or suffix (``*.suffix``: stored without ``*.``) is set.  A plain
    class, not a dataclass: the forwarder imports this module before its
    sandbox, on the path to ready, where dataclasses cost ~10 ms."""

    __slots__ = ("action", "protos", "net", "name", "suffix", "port_lo", "port_hi")
    _FIELDS = __slots__

    def __init__(self, action: str, protos: int = ALL_PROTOS,
                 net: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None,
                 name: str | None = None, suffix: str | None = None,
                 port_lo: int = 0, port_hi: int = 65535) -> None:
        for k, v in (("action", action), ("protos", protos), ("net", net), ("name", name),
                     ("suffix", suffix), ("port_lo", port_lo), ("port_hi", port_hi)):
            object.__setattr__(self, k, v)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Rule is immutable")

    def _key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rule) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Rule({self.action} {self.text()})"

    @property
    def all_ports(self) -> bool:
        return self.port_lo == 0 and self.port_hi == 65535

    @property
    def proto(self) -> str | None:
        if self.protos == ALL_PROTOS:
            return None
        return next(p for p, b in PROTO_BITS.items() if b == self.protos)

    @property
    def dest(self) -> str:
        if self.net is not None:
            n = self.net
            full = n.prefixlen == n.max_prefixlen
            return str(n.network_address) if full else str(n)
        if self.name is not None:
            return self.name
        return "*." + str(self.suffix)

    @property
    def ports(self) -> str | None:
        if self.all_ports:
            return None
        if self.port_lo == self.port_hi:
            return str(self.port_lo)
        return f"{self.port_lo}-{self.port_hi}"

    def text(self) -> str:
        """The RULE form (without the action)."""
        dest = self.dest
        ports = self.ports
        if ports is not None and self.net is not None and self.net.version == 6:
            dest = f"[{dest}]"
        s = dest if ports is None else f"{dest}:{ports}"
        return s if self.proto is None else f"{self.proto}:{s}"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"action": self.action}
        if self.proto is not None:
            d["proto"] = self.proto
        d["dest"] = self.dest
        if self.ports is not None:
            d["ports"] = self.ports
        return d

    def matches_pp(self, pbit: int, port: int) -> bool:
        return bool(self.protos & pbit) and self.port_lo <= port <= self.port_hi


def _parse_dest(dest: str, what: str) -> dict[str, Any]:
    if not dest:
        raise PolicyError(f"{what}: no destination")
    if dest.startswith("*."):
        return {"suffix": _check_name(dest[2:], what)}
    if "*" in dest:
        raise PolicyError(f"{what}: {dest!r}: '*' only as '*.suffix' (subdomains of suffix)")
    looks_ip = ":" in dest or re.fullmatch(r"[0-9./]+", dest) is not None
    if looks_ip:
        try:
            net = ipaddress.ip_network(dest, strict=True)
        except ValueError as e:
            if "host bits set" in str(e):
                fixed = ipaddress.ip_network(dest, strict=False)
                raise PolicyError(
                    f"{what}: {dest!r} has host bits set; the network is {fixed}") from None
            raise PolicyError(f"{what}: {dest!r} is not an IP address or CIDR ({e})") from None
        return {"net": net}
    return {"name": _check_name(dest, what)}


def parse_rule(text: str, action: str) -> Rule:
    """Parse ``[PROTO:]DEST[:PORTS]`` into a Rule with the given action."""
    if action not in ACTIONS:
        raise PolicyError(f"action must be 'allow' or 'deny', not {action!r}")
    what = f"--{action}={text}"
    if not isinstance(text, str):
        raise PolicyError(f"{what}: a rule is a string [PROTO:]DEST[:PORTS]")
    s = text.strip()
    protos = ALL_PROTOS
    head, sep, tail = s.partition(":")
    if sep and head.lower() in PROTO_BITS:
        protos = PROTO_BITS[head.lower()]
        s = tail
    ports: str | None = None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise PolicyError(f"{what}: missing ']' after the IPv6 address")
        dest, rest = s[1:end], s[end + 1:]
        if rest:
            if not rest.startswith(":") or len(rest) == 1:
                raise PolicyError(f"{what}: after '[IPv6]' only ':PORTS' may follow")
            ports = rest[1:]
        spec = _parse_dest(dest, what)
        if "net" not in spec or spec["net"].version != 6:
            raise PolicyError(f"{what}: brackets are for IPv6 addresses only")
    elif s.count(":") >= 2:
        try:
            spec = _parse_dest(s, what)  # bare IPv6 (or CIDR), no port
        except PolicyError as e:
            raise PolicyError(f"{e}; write [IPv6]:PORTS when a port follows") from None
        if "net" not in spec:
            raise PolicyError(f"{what}: {s!r} is not an IPv6 address or CIDR "
                              "(write [IPv6]:PORTS when a port follows)")
    else:
        dest, sep, p = s.partition(":")
        if sep:
            ports = p
            if re.fullmatch(r"[A-Za-z]+", dest) and not re.fullmatch(r"[\d-]+", p.strip()):
                raise PolicyError(f"{what}: unknown protocol {dest!r} (tcp, udp or icmp)")
        spec = _parse_dest(dest, what)
    lo, hi = 0, 65535
    if ports is not None:
        if protos == PROTO_BITS["icmp"]:
            raise PolicyError(f"{what}: icmp has no ports")
        lo, hi = _parse_ports(ports, what)
    return Rule(action=action, protos=protos, port_lo=lo, port_hi=hi, **spec)


def rule_from_json(obj: Any, i: int) -> Rule:
    what = f"rules[{i}]"
    if not isinstance(obj, dict):
        raise PolicyError(f"{what}: a rule is an object with action, dest, and optional proto, ports")
    unknown = set(obj) - {"action", "proto", "dest", "ports"}
    if unknown:
        raise PolicyError(f"{what}: unknown key(s) {', '.join(sorted(unknown))} "
                          "(known: action, proto, dest, ports)")
    action = obj.get("action")
    if action not in ACTIONS:
        raise PolicyError(f"{what}: action must be 'allow' or 'deny', not {action!r}")
    dest = obj.get("dest")
    if not isinstance(dest, str) or not dest:
        raise PolicyError(f"{what}: dest must be an address, CIDR, name or *.suffix")
    what = f"{what} ({action} {dest})"
    protos = ALL_PROTOS
    proto = obj.get("proto")
    if proto is not None:
        if not isinstance(proto, str) or proto.lower() not in PROTO_BITS:
            raise PolicyError(f"{what}: proto must be tcp, udp or icmp, not {proto!r}")
        protos = PROTO_BITS[proto.lower()]
    d = dest.strip()
    if d.startswith("[") and d.endswith("]"):
        d = d[1:-1]
    spec = _parse_dest(d, what)
    lo, hi = 0, 65535
    if obj.get("ports") is not None:
        if protos == PROTO_BITS["icmp"]:
            raise PolicyError(f"{what}: icmp has no ports")
        lo, hi = _parse_ports(obj["ports"], what)
    return Rule(action=action, protos=protos, port_lo=lo, port_hi=hi, **spec)


class Decision(tuple):
    """(action, rule_index, rule, final): action "allow" or "deny";
    rule_index the deciding rule (None: the default); rule the Rule (or
    None); final True when the decision does not depend on DNS-learned
    names (no name rule for this proto comes before the deciding rule)."""

    __slots__ = ()

    def __new__(cls, action: str, rule_index: int | None, rule: Rule | None,
                final: bool) -> "Decision":
        return tuple.__new__(cls, (action, rule_index, rule, final))

    action = property(lambda self: self[0])
    rule_index = property(lambda self: self[1])
    rule = property(lambda self: self[2])
    final = property(lambda self: self[3])

    @property
    def allowed(self) -> bool:
        return self.action == ALLOW

    @property
    def rule_text(self) -> str:
        if self.rule is None:
            return f"default {self.action}"
        return f"{self.rule.action} {self.rule.text()}"


_INF = 1 << 62


def _first_match(idxs: list[int] | None, rules: list[Rule], pbit: int, port: int,
                 best: int) -> int:
    """The smallest index below best in the ascending list idxs whose rule
    matches proto and port, else best."""
    if idxs:
        for i in idxs:
            if i >= best:
                break
            if rules[i].matches_pp(pbit, port):
                return i
    return best


class Policy:
    """A default action and ordered rules, with lookup structures."""

    def __init__(self, default: str = ALLOW, rules: Iterable[Rule] = ()) -> None:
        if default not in ACTIONS:
            raise PolicyError(f"egress must be 'allow' or 'deny', not {default!r}")
        self.default = default
        self.rules: list[Rule] = list(rules)
        if len(self.rules) > MAX_RULES:
            raise PolicyError(f"too many rules ({len(self.rules)}; at most {MAX_RULES})")
        # family -> {prefixlen -> {masked address int -> [rule indices]}}
        self._nets: dict[int, dict[int, dict[int, list[int]]]] = {4: {}, 6: {}}
        self._names: dict[str, list[int]] = {}
        self._suffixes: dict[str, list[int]] = {}
        # per proto bit: the smallest index of a name rule for that proto
        self._first_name_rule = {b: _INF for b in PROTO_BITS.values()}
        for i, r in enumerate(self.rules):
            if r.net is not None:
                by_len = self._nets[r.net.version].setdefault(r.net.prefixlen, {})
                by_len.setdefault(int(r.net.network_address), []).append(i)
            else:
                if r.name is not None:
                    self._names.setdefault(r.name, []).append(i)
                else:
                    self._suffixes.setdefault(str(r.suffix), []).append(i)
                for b in PROTO_BITS.values():
                    if r.protos & b and self._first_name_rule[b] == _INF:
                        self._first_name_rule[b] = i
        # longest prefixes first (any order gives the same answer)
        self._lens = {f: sorted(d, reverse=True) for f, d in self._nets.items()}

    # -- construction ------------------------------------------------------

    @classmethod
    def from_args(cls, egress: str | None = None, allow: Iterable[str] = (),
                  deny: Iterable[str] = (), ordered: Iterable[tuple[str, str]] | None = None
                  ) -> "Policy":
        """From command-line style input.  ordered: (action, RULE) pairs in
        the order given on the command line (so --allow and --deny
        interleave).  Else (two separate lists, the Python API) the rules
        whose action is the default's come first: they can only matter as
        exceptions to the others (egress deny: deny=["bad.example.org"]
        carves out of allow=["*.example.org"]; egress allow: allow=["10.0.2.2"]
        out of deny=["10.0.0.0/8"]).  Within each list, the order given."""
        egress = egress or ALLOW
        if ordered is None:
            a = [(ALLOW, r) for r in allow]
            d = [(DENY, r) for r in deny]
            ordered = d + a if egress == DENY else a + d
        if egress not in ACTIONS:
            raise PolicyError(f"--egress must be 'allow' or 'deny', not {egress!r}")
        if isinstance(allow, str) or isinstance(deny, str):
            raise PolicyError("allow and deny are lists of rules, not strings")
        rules = [parse_rule(text, action) for action, text in ordered]
        return cls(egress, rules)

    @classmethod
    def parse_json(cls, obj: Any) -> "Policy":
        if isinstance(obj, (str, bytes)):
            try:
                obj = json.loads(obj)
            except ValueError as e:
                raise PolicyError(f"policy is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise PolicyError('a policy is an object {"egress": "allow"|"deny", "rules": [...]}')
        unknown = set(obj) - {"egress", "rules"}
        if unknown:
            raise PolicyError(f"policy: unknown key(s) {', '.join(sorted(unknown))} "
                              "(known: egress, rules)")
        egress = obj.get("egress", ALLOW)
        if egress not in ACTIONS:
            raise PolicyError(f"policy: egress must be 'allow' or 'deny', not {egress!r}")
        rules = obj.get("rules", [])
        if not isinstance(rules, list):
            raise PolicyError("policy: rules must be a list")
        if len(rules) > MAX_RULES:
            raise PolicyError(f"policy: too many rules ({len(rules)}; at most {MAX_RULES})")
        return cls(egress, [rule_from_json(r, i) for i, r in enumerate(rules)])

    @classmethod
    def load(cls, path: str) -> "Policy":
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise PolicyError(f"--policy={path}: cannot read it: {e.strerror}") from None
        try:
            return cls.parse_json(data)
        except PolicyError as e:
            raise PolicyError(f"--policy={path}: {e}") from None

    def to_json(self) -> dict[str, Any]:
        return {"egress": self.default, "rules": [r.to_json() for r in self.rules]}

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Policy) and self.default == other.default
                and self.rules == other.rules)

    def __repr__(self) -> str:
        return f"Policy({json.dumps(self.to_json())})"

    @property
    def is_open(self) -> bool:
        """allow with no rules: today's behaviour, nothing to enforce."""
        return self.default == ALLOW and not self.rules

    @property
    def has_names(self) -> bool:
        return bool(self._names or self._suffixes)

    # -- decisions ---------------------------------------------------------

    def _name_candidates(self, name: str) -> Iterable[list[int]]:
        n = normalize_name(name)
        lst = self._names.get(n)
        if lst:
            yield lst
        if self._suffixes:
            dot = n.find(".")
            while dot >= 0:
                lst = self._suffixes.get(n[dot + 1:])
                if lst:
                    yield lst
                dot = n.find(".", dot + 1)

    def decide(self, proto: str, ip: Any, port: int = 0, names: Iterable[str] = ()) -> Decision:
        """The decision for a new flow of proto ("tcp", "udp", "icmp") to
        ip:port (port 0 for icmp), the DNS names learned for ip given."""
        pbit = PROTO_BITS[proto]
        addr = ip if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)) \
            else ipaddress.ip_address(ip)
        a = int(addr)
        fam = addr.version
        bits = 32 if fam == 4 else 128
        best = _INF
        nets = self._nets[fam]
        for plen in self._lens[fam]:
            masked = a & (((1 << plen) - 1) << (bits - plen)) if plen else 0
            best = _first_match(nets[plen].get(masked), self.rules, pbit, port, best)
        for name in names:
            for lst in self._name_candidates(name):
                best = _first_match(lst, self.rules, pbit, port, best)
        final = self._first_name_rule[pbit] >= best
        if best == _INF:
            return Decision(self.default, None, None, final)
        return Decision(self.rules[best].action, best, self.rules[best], final)

    def decide_name(self, proto: str, name: str, port: int = 0) -> Decision:
        """The decision by name rules alone (for the DNS filter and tests)."""
        pbit = PROTO_BITS[proto]
        best = _INF
        for lst in self._name_candidates(name):
            best = _first_match(lst, self.rules, pbit, port, best)
        if best == _INF:
            return Decision(self.default, None, None, True)
        return Decision(self.rules[best].action, best, self.rules[best], True)

    def name_could_be_allowed(self, name: str) -> bool:
        """Whether a DNS query for name may be forwarded: walking the name
        rules that match it in order, an allow rule says yes, a deny rule
        for all protocols and ports says no; if neither, the default."""
        idxs = sorted(i for lst in self._name_candidates(name) for i in lst)
        for i in idxs:
            r = self.rules[i]
            if r.action == ALLOW:
                return True
            if r.protos == ALL_PROTOS and r.all_ports:
                return False
        return self.default == ALLOW

    def refuses_every_name(self) -> bool:
        """Whether every DNS query to the built-in forwarder is answered
        REFUSED: the default is deny and no allow rule names a name or a
        suffix (address rules never allow a name)."""
        return self.default == DENY and not any(
            r.action == ALLOW and r.net is None for r in self.rules)

    # -- the C data path's tables -------------------------------------------

    def compile(self) -> dict[str, Any]:
        """Flat tables for csrc/policy.c (see nsnet_policy_new there):
        rules: [(action 0 allow/1 deny, protos, port_lo, port_hi)];
        prefixes: [(family, plen, 16 address bytes, first, count)] sorted by
        (family, plen, address); names: [(name bytes, is_suffix, first,
        count)] sorted by (name, is_suffix); index: the rule-index lists."""
        rules = [(0 if r.action == ALLOW else 1, r.protos, r.port_lo, r.port_hi)
                 for r in self.rules]
        index: list[int] = []
        prefixes = []
        for fam in (4, 6):
            nbytes = 4 if fam == 4 else 16
            for plen in sorted(self._nets[fam]):
                for addr in sorted(self._nets[fam][plen]):
                    lst = self._nets[fam][plen][addr]
                    raw = addr.to_bytes(nbytes, "big").ljust(16, b"\0")
                    prefixes.append((fam, plen, raw, len(index), len(lst)))
                    index.extend(lst)
        names = []
        entries = [(n.encode(), 0, lst) for n, lst in self._names.items()]
        entries += [(s.encode(), 1, lst) for s, lst in self._suffixes.items()]
        for name, suf, lst in sorted(entries, key=lambda e: (e[0], e[1])):
            names.append((name, suf, len(index), len(lst)))
            index.extend(lst)
        return {"default": 0 if self.default == ALLOW else 1, "rules": rules,
                "prefixes": prefixes, "names": names, "index": index}


def open_policy() -> Policy:
    return Policy(ALLOW, [])


# ---- command-line options (rows of nsnet/options.py) ------------------------

def from_options(egress: str | None, ordered: Iterable[tuple[str, str]],
                 file: str | None) -> Policy | None:
    """The policy of --egress, --allow/--deny (in command-line order) and
    --policy=FILE: the file's rules first, then --allow/--deny; --egress
    replaces the file's default.  None when none of them was given."""
    ordered = list(ordered)
    if file is None and egress is None and not ordered:
        return None
    base = Policy.load(file) if file else Policy()
    rules = list(base.rules) + [parse_rule(t, a) for a, t in ordered]
    return Policy(egress or base.default, rules)
