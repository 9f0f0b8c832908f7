#!/usr/bin/env python3
"""Network probe run inside sandboxes by the integration tests.

Usage: net_probe.py OP HOST PORT [OP HOST PORT ...]
OP: tcp (connect), udp-connect (connect a UDP socket), udp-send (sendto on an
unconnected UDP socket), tcp6only (IPv6 socket, for IPv4-mapped addresses).
Prints one line per probe: "OP HOST PORT RESULT" where RESULT is OK or an
errno name (EPERM, ECONNREFUSED, ...).
"""
import errno
import socket
import sys


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def probe(op, host, port):
    fam = family_of(host)
    if op == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect((host, port))
    elif op == "udp-connect":
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.connect((host, port))
    elif op == "udp-send":
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.sendto(b"probe", (host, port))
    else:
        raise SystemExit("unknown op " + op)
    s.close()


def main():
    args = sys.argv[1:]
    if len(args) % 3:
        raise SystemExit(__doc__)
    for i in range(0, len(args), 3):
        op, host, port = args[i], args[i + 1], int(args[i + 2])
        try:
            probe(op, host, port)
            res = "OK"
        except OSError as e:
            res = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
        print(f"{op} {host} {port} {res}", flush=True)


main()
