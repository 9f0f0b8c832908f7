#!/usr/bin/env python3
"""Probe for the PDP tests, run inside sandboxes.

Usage: pdp_probe.py CMD ARGS... [; CMD ARGS...]  (commands separated by ';')
  tcp HOST PORT      blocking connect (no timeout)
  tcpnb HOST PORT    non-blocking connect, then poll (5 s) and SO_ERROR
  tcpgone HOST PORT  non-blocking connect, closed 50 ms later (a held
                     connect given up before its answer): OK
  udp HOST PORT      sendto on an unconnected UDP socket
  metrics HOST PORT  GET /metrics of a `pdp serve`: prints the request count
  kill PID           SIGKILL a process
  sleep SECONDS
Prints one line per command: "CMD RESULT MS" (RESULT: OK, an errno name, or
the metric value; MS: elapsed milliseconds).
"""
import errno
import os
import select
import signal
import socket
import sys
import time


def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def run(cmd, args):
    if cmd == "tcp":
        s = socket.socket(fam(args[0]), socket.SOCK_STREAM)
        try:
            s.connect((args[0], int(args[1])))
        finally:
            s.close()
        return "OK"
    if cmd == "tcpnb":
        s = socket.socket(fam(args[0]), socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            rc = s.connect_ex((args[0], int(args[1])))
            if rc not in (0, errno.EINPROGRESS):
                raise OSError(rc, os.strerror(rc))
            if rc == errno.EINPROGRESS:
                p = select.poll()
                p.register(s, select.POLLOUT)
                if not p.poll(5000):
                    return "POLL_TIMEOUT"
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
        finally:
            s.close()
        return "INPROGRESS_OK"
    if cmd == "tcpgone":
        s = socket.socket(fam(args[0]), socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            rc = s.connect_ex((args[0], int(args[1])))
            if rc != errno.EINPROGRESS:
                return "NOT_HELD_" + errno.errorcode.get(rc, str(rc))
            time.sleep(0.05)
        finally:
            s.close()
        return "OK"
    if cmd == "udp":
        s = socket.socket(fam(args[0]), socket.SOCK_DGRAM)
        try:
            s.sendto(b"probe", (args[0], int(args[1])))
        finally:
            s.close()
        return "OK"
    if cmd == "metrics":
        s = socket.create_connection((args[0], int(args[1])), timeout=5)
        try:
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while True:
                b = s.recv(4096)
                if not b:
                    break
                data += b
        finally:
            s.close()
        for line in data.decode().splitlines():
            if line.startswith("pep_pdp_requests_total"):
                return line.split()[1]
        return "NO_METRIC"
    if cmd == "kill":
        os.kill(int(args[0]), signal.SIGKILL)
        return "OK"
    if cmd == "sleep":
        time.sleep(float(args[0]))
        return "OK"
    raise SystemExit("unknown command " + cmd)


def main():
    cmds = []
    cur = []
    for a in sys.argv[1:]:
        if a == ";":
            if cur:
                cmds.append(cur)
            cur = []
        else:
            cur.append(a)
    if cur:
        cmds.append(cur)
    for c in cmds:
        t = time.monotonic()
        try:
            res = run(c[0], c[1:])
        except OSError as e:
            res = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
        ms = int((time.monotonic() - t) * 1000)
        print(f"{c[0]} {res} {ms}", flush=True)


main()
