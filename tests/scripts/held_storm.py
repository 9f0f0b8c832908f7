#!/usr/bin/env python3
"""Starts a non-blocking TCP connect to one address every few ms, for the
tests of connects held while a PDP decides; counts how each one ended.

Usage: held_storm.py STOPFILE READYFILE HOST PORT EVERY_MS
Touches READYFILE once the first connect is under way, starts connects
until STOPFILE exists, then waits for every one to end (at most 20 s) and
prints one JSON object: {"OK": n, "ECONNABORTED": n, "ETIMEDOUT": n, ...}
("STILL_WAITING": connects not ended by then).
"""
import errno
import json
import os
import select
import socket
import sys
import time


def outcome(s):
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return "OK" if err == 0 else errno.errorcode.get(err, str(err))


def main():
    stop, ready, host, port, every_ms = sys.argv[1:6]
    addr = (host, int(port))
    every = int(every_ms) / 1000.0
    poller = select.poll()
    open_socks = {}
    counts = {}

    def count(r):
        counts[r] = counts.get(r, 0) + 1

    def reap(timeout_ms):
        for fd, _ in poller.poll(timeout_ms):
            s = open_socks.pop(fd)
            poller.unregister(fd)
            count(outcome(s))
            s.close()

    first = True
    while not os.path.exists(stop):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        rc = s.connect_ex(addr)
        if rc == errno.EINPROGRESS:
            open_socks[s.fileno()] = s
            poller.register(s, select.POLLOUT)
        else:
            count("OK" if rc == 0 else errno.errorcode.get(rc, str(rc)))
            s.close()
        if first:
            open(ready, "w").close()
            first = False
        end = time.monotonic() + every
        while time.monotonic() < end:
            reap(max(1, int((end - time.monotonic()) * 1000)))
    deadline = time.monotonic() + 20
    while open_socks and time.monotonic() < deadline:
        reap(100)
    if open_socks:
        counts["STILL_WAITING"] = len(open_socks)
    print(json.dumps(counts))


main()
