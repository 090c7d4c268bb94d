#!/bin/sh
# What a sandboxing tool does with slirp4netns to run COMMAND with a
# network configured before it starts: unshare a user+net namespace whose
# first process waits, attach slirp4netns to its PID, wait for the ready
# byte, release the command, and stop slirp4netns when it exits.
set -eu
d=$(mktemp -d)
mkfifo "$d/ns" "$d/go" "$d/ready"
unshare --user --map-root-user --net sh -c 'echo >"$1/ns"; read _ <"$1/go"; shift; exec "$@"' \
    sh "$d" "$@" &
pid=$!
read _ <"$d/ns"            # the namespace exists
slirp4netns --configure --ready-fd=3 "$pid" tap0 3>"$d/ready" >/dev/null 2>&1 &
s4=$!
head -c1 "$d/ready" >/dev/null   # the network is configured
echo >"$d/go"
status=0
wait "$pid" || status=$?
kill "$s4"
wait "$s4" 2>/dev/null || true
rm -rf "$d"
exit "$status"
