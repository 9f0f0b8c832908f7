#!/usr/bin/env python3
"""Hammers actions in a loop for the daemon tests, counting each outcome.

Usage: daemon_hammer.py STOPFILE READYFILE PROBE [PROBE ...]
PROBE: tcp:HOST:PORT (connect) or open:PATH (open for reading).
Touches READYFILE after the first round, loops until STOPFILE exists, then
prints one JSON object: {"PROBE": {"OK": n, "EPERM": n, ...}, ...}.
"""
import errno
import json
import os
import socket
import sys


def once(p):
    kind, _, rest = p.partition(":")
    try:
        if kind == "tcp":
            host, _, port = rest.rpartition(":")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect((host, int(port)))
            finally:
                s.close()
        elif kind == "open":
            with open(rest, "rb") as f:
                f.read(1)
        else:
            raise SystemExit("unknown probe " + p)
        return "OK"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def main():
    stop, ready, probes = sys.argv[1], sys.argv[2], sys.argv[3:]
    counts = {p: {} for p in probes}
    first = True
    while True:
        for p in probes:
            r = once(p)
            counts[p][r] = counts[p].get(r, 0) + 1
        if first:
            open(ready, "w").close()
            first = False
        if os.path.exists(stop):
            break
    print(json.dumps(counts))


main()
