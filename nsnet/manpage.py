"""The man page nsnet(1) and the bash completion, both from the option table
(nsnet/options.py).  The installed copies are generated files kept in the
tree (man/nsnet.1, completion/nsnet); tests/unit/test_option_table.py fails
when they fall behind the table.  Regenerate:

    python3 -m nsnet.manpage man > man/nsnet.1
    python3 -m nsnet.manpage bash > completion/nsnet
"""

from __future__ import annotations

import sys

from . import options as O


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln.startswith((".", "'")) else ln
                     for ln in text.split("\n"))


def _item(o: O.Opt, front: str) -> str:
    names = []
    if o.short:
        names.append(f"\\fB\\-{o.short}\\fR")
    for n in (o.name, *o.aliases):
        names.append(f"\\fB{_roff('--' + n)}\\fR" + (f"=\\fI{_roff(o.arg)}\\fR" if o.arg else ""))
    body = " ".join(o.help_for(front).split("\n"))
    return f".TP\n{', '.join(names)}\n{_roff(body)}\n"


def man() -> str:
    from . import __version__

    out = [f'.TH NSNET 1 "" "nsnet {__version__}" "User Commands"',
           ".SH NAME",
           "nsnet \\- user\\-mode networking for unprivileged network namespaces",
           ".SH SYNOPSIS",
           "\\fBnsnet\\fR [\\fIOPTION\\fR]... \\fIPID\\fR|\\fIPATH\\fR [\\fITAPNAME\\fR]",
           ".br",
           "\\fBnsnet run\\fR [\\fIOPTION\\fR]... [\\-\\-] \\fICOMMAND\\fR [\\fIARG\\fR]...",
           ".br",
           "\\fBnsnet ctl\\fR [\\fB\\-\\-socket\\fR \\fIPATH\\fR | \\fB\\-\\-instance\\fR "
           "\\fINAME\\fR] \\fICOMMAND\\fR [\\fIARG\\fR]... [\\fB\\-\\-json\\fR]",
           ".br",
           "\\fBnsnet ps\\fR [\\fB\\-\\-json\\fR]",
           ".SH DESCRIPTION",
           _roff("nsnet gives a network namespace user-mode networking (libslirp) through a "
                 "TAP device. The first form is a drop-in replacement for slirp4netns 1.2.0: "
                 "the same options, exit codes and JSON API. nsnet run runs a command in new "
                 "user, network and mount namespaces whose network is configured before the "
                 "command starts. nsnet ctl drives a running instance over its API socket; "
                 "nsnet ps lists the running instances of the user."),
           ".SH OPTIONS",
           _roff("Options of slirp4netns 1.2.0:")]
    rows = O.rows(O.ATTACH)
    out += [_item(o, O.ATTACH) for o in rows if o.s4n]
    out.append(".PP\n" + _roff("nsnet's own options:"))
    out += [_item(o, O.ATTACH) for o in rows if not o.s4n]
    out.append(".SH RUN OPTIONS")
    out.append(_roff("Options of nsnet run (they end at COMMAND):"))
    out += [_item(o, O.RUN) for o in O.rows(O.RUN)]
    out += [".SH CTL COMMANDS",
            ".TP\n\\fBadd\\-forward\\fR \\fISPEC\\fR [\\fB\\-\\-mode\\fR splice|slirp]\n"
            + _roff("publish a port: [HOST_IP:][HOST_PORT]:GUEST_PORT[/tcp|/udp], a range "
                    "(8000-8002:8000-8002), a bare port or HOST_IP::PORT for a port the "
                    "kernel picks"),
            ".TP\n\\fBlist\\-forwards\\fR\n" + _roff("the port forwards"),
            ".TP\n\\fBremove\\-forward\\fR \\fIID\\fR...\n" + _roff("remove forwards"),
            ".TP\n\\fBinfo\\fR, \\fBstats\\fR\n" + _roff("get_info, get_stats"),
            ".TP\n\\fBstart\\-capture\\fR \\fIPATH\\fR [\\fB\\-\\-max\\-bytes\\fR \\fIN\\fR]\n"
            + _roff("capture every frame between the namespace and nsnet to PATH (pcap; "
                    "created mode 0600 or truncated; at most N bytes, default 1 GiB, 0: no "
                    "limit)"),
            ".TP\n\\fBstop\\-capture\\fR\n" + _roff("stop the capture (--pcap's or "
                                                       "start-capture's)"),
            ".TP\n\\fBpolicy\\fR\n" + _roff("the egress policy in force"),
            ".TP\n\\fBset\\-policy\\fR [\\fIFILE\\fR] [\\fB\\-\\-egress\\fR allow|deny] "
            "[\\fB\\-\\-allow\\fR \\fIRULE\\fR]... [\\fB\\-\\-deny\\fR \\fIRULE\\fR]... "
            "[\\fB\\-\\-keep\\-established\\fR]\n"
            + _roff("replace the egress policy: FILE's rules (JSON, - for stdin), then --allow "
                    "and --deny in order; --egress replaces FILE's default"),
            ".TP\n\\fBcall\\fR \\fIEXECUTE\\fR [\\fIJSON\\fR]\n" + _roff("any API request"),
            ".SH EXIT STATUS",
            _roff("nsnet: 0 on an exit-fd event, SIGTERM, SIGINT, SIGHUP, the target's exit, "
                  "-h and -v; 1 on bad options and set-up failures. nsnet run: COMMAND's "
                  "status (128+N when killed by signal N), 125 when nsnet fails, 126 when "
                  "COMMAND cannot be executed, 127 when it is not found. nsnet ctl: 0, 1 when "
                  "the request fails, 2 for bad usage."),
            ".SH FILES",
            ".TP\n\\fI$XDG_RUNTIME_DIR/nsnet/\\fR, \\fI/run/nsnet/\\fR\n"
            + _roff("the instance registry of nsnet ps and nsnet ctl --instance: PID.json "
                    "per running instance, NAME.sock for a named instance without -a"),
            ".SH SEE ALSO",
            "\\fBslirp4netns\\fR(1), \\fBunshare\\fR(1), \\fBnsenter\\fR(1)"]
    return "\n".join(out) + "\n"


def _words(front: str) -> str:
    words = []
    for o in O.rows(front):
        for n in (o.name, *o.aliases):
            words.append(f"--{n}" + ("=" if o.arg else ""))
        if o.short:
            words.append(f"-{o.short}")
    return " ".join(words)


def _arg_cases(front: str) -> str:
    cases = []
    for o in O.rows(front):
        if not o.arg:
            continue
        choices = getattr(o.conv, "choices", None)
        comp = o.complete or (" ".join(choices) if choices else None)
        if comp is None:
            continue
        names = "|".join([f"--{n}" for n in (o.name, *o.aliases)]
                         + ([f"-{o.short}"] if o.short else []))
        if comp == "file":
            action = 'COMPREPLY=($(compgen -f -- "$cur"))'
        else:
            action = f'COMPREPLY=($(compgen -W "{comp}" -- "$cur"))'
        cases.append(f"        {names}) {action}; return ;;")
    return "\n".join(cases)


def bash() -> str:
    return f"""\
# bash completion for nsnet (generated from nsnet/options.py by nsnet/manpage.py)
_nsnet_words() {{
    COMPREPLY=($(compgen -W "$1" -- "$cur"))
    [[ ${{#COMPREPLY[@]}} -eq 1 && ${{COMPREPLY[0]}} == *= ]] && compopt -o nospace
}}
_nsnet() {{
    local cur prev sub
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    sub="${{COMP_WORDS[1]}}"
    if [[ "$cur" == --*=* ]]; then
        prev="${{cur%%=*}}"
        cur="${{cur#*=}}"
    fi
    case "$sub" in
    ctl)
        case "$prev" in
        --socket|-s|start-capture) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        esac
        _nsnet_words "add-forward list-forwards remove-forward info stats start-capture \\
stop-capture policy set-policy call --socket= --instance= --json --help"
        return ;;
    ps)
        _nsnet_words "--json --help"
        return ;;
    run)
        case "$prev" in
{_arg_cases(O.RUN)}
        esac
        _nsnet_words "{_words(O.RUN)}"
        return ;;
    esac
    case "$prev" in
{_arg_cases(O.ATTACH)}
    esac
    if [[ $COMP_CWORD -eq 1 ]]; then
        _nsnet_words "run ctl ps {_words(O.ATTACH)}"
    else
        _nsnet_words "{_words(O.ATTACH)}"
    fi
}}
complete -F _nsnet nsnet
"""


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "man"
    sys.stdout.write(man() if what == "man" else bash())
