#!/usr/bin/env python3
"""Floods a sandbox's PDP with misses, for the tests of what the kernel does
when it cannot ask: every miss goes to a port of its own.

Usage: ask_flood.py HOST TCP_FROM TCP_N UDP_FROM UDP_N
Starts TCP_N non-blocking connects to HOST:TCP_FROM.. and keeps them open
(each one held is an entry in the kernel's table of held connects), then
sends one UDP datagram to each of HOST:UDP_FROM..+UDP_N, then closes
everything. Prints one JSON object: the outcome counts of the connects
("EINPROGRESS": held) and of the sends, and the ports whose connect failed
at once.
"""
import errno
import json
import resource
import socket
import sys


def name(rc):
    return "OK" if rc == 0 else errno.errorcode.get(rc, str(rc))


def main():
    host = sys.argv[1]
    tcp_from, tcp_n, udp_from, udp_n = (int(a) for a in sys.argv[2:6])
    want = tcp_n + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
    out = {"tcp": {}, "udp": {}, "tcp_failed_ports": []}
    held = []
    for port in range(tcp_from, tcp_from + tcp_n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        r = name(s.connect_ex((host, port)))
        out["tcp"][r] = out["tcp"].get(r, 0) + 1
        if r == "EINPROGRESS":
            held.append(s)
        else:
            out["tcp_failed_ports"].append(port)
            s.close()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for port in range(udp_from, udp_from + udp_n):
        try:
            u.sendto(b"x", (host, port))
            r = "OK"
        except OSError as e:
            r = name(e.errno)
        out["udp"][r] = out["udp"].get(r, 0) + 1
    u.close()
    for s in held:
        s.close()
    print(json.dumps(out))


main()
