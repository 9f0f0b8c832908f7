#!/usr/bin/env python3
"""DNS probes for host_dns tests, run inside a sandbox. Each probe prints one
line "OP ARG... RESULT" (RESULT last, no spaces).

  resolve NAME            getaddrinfo (any family): addresses joined by ',' | NXDOMAIN | EAI<n>
  resolve6 NAME           getaddrinfo AF_INET6 only
  connect NAME PORT       getaddrinfo then TCP connect to the first address: OK | EPERM | NXDOMAIN | ...
  connect6 NAME PORT      the same over IPv6
  connect-addr ADDR PORT  TCP connect to an address: OK | EPERM | ...
  tcpdns NAME             an A query over TCP to resolv.conf's first nameserver, port 53:
                          rcode=<n>,peer=<getpeername>,addrs=<a|b>
  sleep SECONDS
"""
import errno
import os
import socket
import struct
import sys
import time


def err_name(e):
    if isinstance(e, socket.gaierror):
        if e.errno == socket.EAI_NONAME:
            return "NXDOMAIN"
        return "EAI%d" % e.errno
    if isinstance(e, OSError) and e.errno is not None:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__


def resolve(name, family=0):
    infos = socket.getaddrinfo(name, 80, family, socket.SOCK_STREAM)
    seen = []
    for info in infos:
        a = info[4][0]
        if a not in seen:
            seen.append(a)
    return seen


def connect(addr, port):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((addr, port))
        return "OK"
    finally:
        s.close()


def nameserver():
    with open("/etc/resolv.conf") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    return "127.0.0.1"


def build_query(name, qtype=1):
    q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack("!HH", qtype, 1)


def skip_name(buf, off):
    while True:
        n = buf[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        off += 1 + n


def parse_answer(buf):
    _id, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", buf[:12])
    off = 12
    for _ in range(qd):
        off = skip_name(buf, off) + 4
    addrs = []
    for _ in range(an):
        off = skip_name(buf, off)
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", buf[off:off + 10])
        off += 10
        if rtype == 1 and rdlen == 4:
            addrs.append(socket.inet_ntop(socket.AF_INET, buf[off:off + 4]))
        elif rtype == 28 and rdlen == 16:
            addrs.append(socket.inet_ntop(socket.AF_INET6, buf[off:off + 16]))
        off += rdlen
    return flags & 0xF, addrs


def tcpdns(name):
    server = nameserver()
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect((server, 53))
    peer = s.getpeername()
    q = build_query(name)
    s.sendall(struct.pack("!H", len(q)) + q)
    n = struct.unpack("!H", recv_exact(s, 2))[0]
    rcode, addrs = parse_answer(recv_exact(s, n))
    s.close()
    return "rcode=%d,peer=%s:%d,addrs=%s" % (rcode, peer[0], peer[1], "|".join(addrs))


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("short read")
        out += chunk
    return out


def main(argv):
    i = 0
    while i < len(argv):
        op = argv[i]
        try:
            if op == "sleep":
                time.sleep(float(argv[i + 1]))
                i += 2
                continue
            if op in ("resolve", "resolve6"):
                name = argv[i + 1]
                args = [name]
                i += 2
                fam = socket.AF_INET6 if op == "resolve6" else 0
                res = ",".join(resolve(name, fam)) or "EMPTY"
            elif op in ("connect", "connect6"):
                name, port = argv[i + 1], int(argv[i + 2])
                args = [name, str(port)]
                i += 3
                fam = socket.AF_INET6 if op == "connect6" else socket.AF_INET
                res = connect(resolve(name, fam)[0], port)
            elif op == "connect-addr":
                addr, port = argv[i + 1], int(argv[i + 2])
                args = [addr, str(port)]
                i += 3
                res = connect(addr, port)
            elif op == "tcpdns":
                name = argv[i + 1]
                args = [name]
                i += 2
                res = tcpdns(name)
            else:
                print("unknown op %s" % op, file=sys.stderr)
                return 2
        except Exception as e:  # noqa: BLE001 - every failure is a result
            res = err_name(e)
        print(" ".join([op] + args + [res]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
