#!/usr/bin/env python3
"""Lookup latency, interleaved: one A query through the agent's resolver
(sent to resolv.conf's nameserver, port 53, which the kernel steers to the
agent) then one straight to the upstream (ADDR PORT, not steered), N rounds.
Prints one line per round: "<agent ns> <direct ns>"."""
import socket
import struct
import sys
import time


def query(name, qid):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack("!HH", 1, 1)


def nameserver():
    with open("/etc/resolv.conf") as f:
        for line in f:
            p = line.split()
            if len(p) >= 2 and p[0] == "nameserver":
                return p[1]
    return "127.0.0.1"


def timed(dest, name, qid):
    fam = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(2)
    t = time.perf_counter_ns()
    s.connect(dest)
    s.send(query(name, qid))
    while True:
        buf = s.recv(1500)
        if struct.unpack("!H", buf[:2])[0] == qid:
            break
    dt = time.perf_counter_ns() - t
    s.close()
    return dt


def main():
    name, addr, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    agent = (nameserver(), 53)
    direct = (addr, port)
    for i in range(n):
        a = timed(agent, name, (2 * i) & 0xFFFF)
        d = timed(direct, name, (2 * i + 1) & 0xFFFF)
        print(a, d, flush=True)


if __name__ == "__main__":
    main()
