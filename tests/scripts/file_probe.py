#!/usr/bin/env python3
"""File probe run inside sandboxes by the integration tests.

Usage: file_probe.py OP PATH [OP PATH ...]
OP: read (open O_RDONLY), write (open O_WRONLY), creat (O_CREAT|O_WRONLY of a
new file), trunc (O_WRONLY|O_TRUNC), opath-reopen (open O_PATH, then reopen
/proc/self/fd/N for reading).
Prints one line per probe: "OP PATH RESULT", RESULT being OK or an errno name.
"""
import errno
import os
import sys


def probe(op, path):
    if op == "read":
        fd = os.open(path, os.O_RDONLY)
        os.read(fd, 1)
    elif op == "write":
        fd = os.open(path, os.O_WRONLY)
    elif op == "creat":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    elif op == "trunc":
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    elif op == "opath-reopen":
        p = os.open(path, os.O_PATH)
        fd = os.open(f"/proc/self/fd/{p}", os.O_RDONLY)
        os.close(p)
    else:
        raise SystemExit("unknown op " + op)
    os.close(fd)


def main():
    args = sys.argv[1:]
    if len(args) % 2:
        raise SystemExit(__doc__)
    for i in range(0, len(args), 2):
        op, path = args[i], args[i + 1]
        try:
            probe(op, path)
            res = "OK"
        except OSError as e:
            res = errno.errorcode.get(e.errno, str(e.errno))
        print(f"{op} {path} {res}", flush=True)


main()
