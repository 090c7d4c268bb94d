"""Command-line scanning with glibc's getopt_long rules, and its messages.

slirp4netns parses its command line with getopt_long(3); a drop-in has to
accept what it accepts and say what it says when it refuses.  The standard
library's getopt module follows nearly the same rules, but its messages
differ from glibc's, and importing it pulls in gettext and re (about 6 ms
on the path to ready).  This module is the part nsnet needs:

- options and operands may be mixed ("permutation"); "--" ends the options;
  a lone "-" is an operand; with POSIXLY_CORRECT set, the first operand ends
  the options, as glibc does;
- short options cluster ("-c6m1500"); an option that takes an argument
  takes the rest of its cluster or the next word;
- long options take "--name=value" or "--name value"; any unambiguous prefix
  of a name selects it, an exact name always wins;
- errors carry glibc's text (without the "PROG: " prefix glibc adds).
"""

from __future__ import annotations

import os


class GetoptError(Exception):
    """A word of the command line getopt_long would refuse; str() is
    glibc's message for it."""


def getopt_long(
    argv: list[str], shortopts: str, longopts: list[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """Scan argv (without the program name).

    shortopts is getopt's string ("ce:r:" : 'e' and 'r' take an argument;
    a leading "+" ends the options at the first operand, as in glibc);
    longopts are names, with a trailing "=" for those taking an argument.
    Returns ([(option, value)], operands); option is "-c" or the full
    "--name", value "" for options without an argument."""
    posix = "POSIXLY_CORRECT" in os.environ or shortopts.startswith("+")
    shortopts = shortopts.lstrip("+")
    short_arg = {}
    for i, ch in enumerate(shortopts):
        if ch != ":":
            short_arg[ch] = shortopts[i + 1:i + 2] == ":"
    longs = [(n[:-1], True) if n.endswith("=") else (n, False) for n in longopts]

    opts: list[tuple[str, str]] = []
    operands: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            operands.extend(argv[i:])
            break
        if not word.startswith("-") or word == "-":
            operands.append(word)
            if posix:
                operands.extend(argv[i:])
                break
            continue
        if word.startswith("--"):
            name, value, i = _long(word, argv, i, longs)
            opts.append((name, value))
            continue
        j = 1
        while j < len(word):  # a cluster of short options
            ch = word[j]
            j += 1
            if ch not in short_arg:
                raise GetoptError(f"invalid option -- '{ch}'")
            if not short_arg[ch]:
                opts.append((f"-{ch}", ""))
                continue
            if j < len(word):
                opts.append((f"-{ch}", word[j:]))
            elif i < len(argv):
                opts.append((f"-{ch}", argv[i]))
                i += 1
            else:
                raise GetoptError(f"option requires an argument -- '{ch}'")
            break
    return opts, operands


def _long(
    word: str, argv: list[str], i: int, longs: list[tuple[str, bool]]
) -> tuple[str, str, int]:
    text = word[2:]
    given, eq, value = text.partition("=")
    match = [(n, a) for n, a in longs if n == given]
    if not match:
        match = [(n, a) for n, a in longs if n.startswith(given)]
    if not match:
        raise GetoptError(f"unrecognized option '{word}'")
    if len(match) > 1:
        names = " ".join(f"'--{n}'" for n, _ in match)
        raise GetoptError(f"option '{word}' is ambiguous; possibilities: {names}")
    name, takes_arg = match[0]
    if not takes_arg:
        if eq:
            raise GetoptError(f"option '--{name}' doesn't allow an argument")
        return f"--{name}", "", i
    if eq:
        return f"--{name}", value, i
    if i < len(argv):
        return f"--{name}", argv[i], i + 1
    raise GetoptError(f"option '--{name}' requires an argument")
