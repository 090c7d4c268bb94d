"""The supervisor's side of the egress policy (nsnet/policy.py).

The supervisor keeps the policy in force: every forwarder it starts gets it
at fork (so a restarted forwarder enforces what its predecessor did), and
the API's set_policy replaces it in the running forwarder.  The forwarder
sends audit records as control events; the supervisor writes them to its
log and to --audit-log=FILE, which it opens itself (the sandboxed
forwarder has no filesystem).
"""

from __future__ import annotations

import json
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Generator

from .. import log
from ..policy import Policy, PolicyError

# A policy crosses the forwarder's control socket (SEQPACKET, one message
# per request) in parts of this many characters.
PART = 32768
# The bypass handler's audit records the supervisor writes at most, a
# second (burst): the forwarder's cap (csrc/filter.c AUDIT_RATE, AUDIT_RING;
# the handler applies it too, csrc/bypass.h), kept here because the
# supervisor believes no child.
BYPASS_AUDIT_RATE = 500
BYPASS_AUDIT_BURST = 1024


class PolicyControlError(Exception):
    """Setting up or changing the policy failed; str() says why."""


class PolicyControl:
    def __init__(self, policy: Policy | None, audit_all: bool = False,
                 audit_log: str | None = None) -> None:
        self.policy = policy
        self.audit_all = audit_all
        self.log = log.get("nsnet.policy")
        self.audit_fd = -1
        self.audit_lost = 0
        self.bypass_audit_capped = 0
        self._bypass_tokens = float(BYPASS_AUDIT_BURST)
        self._bypass_refill = time.monotonic()
        if audit_log is not None:
            try:
                self.audit_fd = os.open(audit_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                        | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise PolicyControlError(
                    f"--audit-log={audit_log}: cannot open it for appending: {e.strerror} "
                    "(give a writable file)") from None

    @property
    def active(self) -> bool:
        return self.policy is not None or self.audit_all

    def forwarder_arg(self) -> dict[str, Any] | None:
        """What a new forwarder enforces (host/forwarder.main's policy=)."""
        if not self.active:
            return None
        pol = self.policy or Policy()
        return {"policy": pol.to_json(), "audit_all": self.audit_all}

    def get(self) -> dict[str, Any]:
        return (self.policy or Policy()).to_json()

    def parse_set(self, args: dict[str, Any]) -> tuple[Policy, bool]:
        """set_policy's arguments: the policy's JSON form plus
        "keep_established"."""
        args = dict(args)
        keep = args.pop("keep_established", False)
        if not isinstance(keep, bool):
            raise PolicyControlError("keep_established must be true or false")
        try:
            return Policy.parse_json(args), keep
        except PolicyError as e:
            raise PolicyControlError(str(e)) from None

    def send(self, request: Callable[[dict[str, Any]], Any], pol: Policy,
             keep_established: bool) -> Generator[Any, Any, None]:
        """Replace the running forwarder's policy, as a task
        (supervisor/tasks.py: request sends one control request and returns
        the Future of its reply).  Raises PolicyControlError when it refuses."""
        text = json.dumps(pol.to_json(), separators=(",", ":"))
        parts = [text[i:i + PART] for i in range(0, len(text), PART)] or [""]
        for i, part in enumerate(parts[:-1]):
            reply = yield request({"op": "policy_part", "index": i, "data": part})
            if not reply.get("ok"):
                raise PolicyControlError(str(reply.get("error", "refused")))
        reply = yield request({"op": "policy", "last_part": parts[-1], "parts": len(parts),
                               "keep_established": keep_established,
                               "audit_all": self.audit_all})
        if not reply.get("ok"):
            raise PolicyControlError(str(reply.get("error", "refused")))

    def on_audit(self, msg: dict[str, Any]) -> None:
        """An {"event": "audit", "records": [...]} from the forwarder."""
        records = msg.get("records")
        if not isinstance(records, list):
            return
        lines = []
        for rec in records:
            if not isinstance(rec, dict):
                continue
            line = json.dumps(rec, separators=(",", ":"), sort_keys=True)
            lines.append(line)
            level = self.log.warning if rec.get("action") == "deny" else self.log.info
            dst = rec.get("dst")
            port = rec.get("dport")
            where = f"{dst}:{port}" if port is not None else str(dst)
            name = f" ({rec['name']})" if rec.get("name") else ""
            how = " (bypass)" if rec.get("bypass") else ""
            level(f"egress {rec.get('action')}{how}: {rec.get('proto')} {rec.get('src')} -> "
                  f"{where}{name} by {rec.get('rule_text', '?')}",
                  extra={"fields": dict(rec, event="egress")})
        if self.audit_fd >= 0 and lines:
            data = ("\n".join(lines) + "\n").encode()
            try:
                os.write(self.audit_fd, data)
            except OSError as e:
                self.audit_lost += len(lines)
                self.log.warning(f"--audit-log: write failed: {e.strerror}")

    def on_bypass_audit(self, records: list[dict[str, Any]]) -> None:
        """Records of `nsnet run --bypass`'s handler (nsnet/proto/bypass.py,
        already checked): connects it bypassed (allow) or refused itself
        (deny).  The deciding rule is the policy's for that destination; a
        refusal the policy did not decide (a host socket reconnected to an
        address the bypass does not serve) names no rule."""
        import ipaddress

        now = time.monotonic()
        self._bypass_tokens = min(float(BYPASS_AUDIT_BURST), self._bypass_tokens
                                  + (now - self._bypass_refill) * BYPASS_AUDIT_RATE)
        self._bypass_refill = now
        take = min(len(records), int(self._bypass_tokens))
        self._bypass_tokens -= take
        self.bypass_audit_capped += len(records) - take
        pol = self.policy or Policy()
        out = []
        for rec in records[:take]:
            d = pol.decide("tcp", ipaddress.ip_address(rec["dst"]), rec["dport"])
            if d.action == rec["action"]:
                rule = d.rule_index
                text = f"{d.rule.action} {d.rule.text()}" if d.rule is not None \
                    else f"default {d.action}"
            elif rec["action"] == "deny":
                rule, text = None, "bypass: a host socket cannot connect there"
            else:  # the policy changed since (set_policy with keep_established)
                rule, text = None, "bypass: allowed by the policy in force then"
            out.append(dict(rec, rule=rule, rule_text=text, bypass=True))
        if out:
            self.on_audit({"records": out})

    def close(self) -> None:
        if self.audit_fd >= 0:
            os.close(self.audit_fd)
            self.audit_fd = -1
