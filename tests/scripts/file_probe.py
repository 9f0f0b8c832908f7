#!/usr/bin/env python3
"""File, exec and self-protection probe run inside sandboxes by the tests.

Usage: file_probe.py OP ARG [OP ARG ...]
Two-path operations take "A|B" as ARG.

Files:
  read (open O_RDONLY), write (open O_WRONLY), creat (O_CREAT|O_EXCL of a new
  file), trunc (O_WRONLY|O_TRUNC), truncate (truncate(2) by path),
  opath-reopen (open O_PATH, then reopen /proc/self/fd/N for reading),
  unlink, mkdir, rmdir, mknod (a FIFO), chmod, chown, rename "A|B",
  link "A|B" (hard link B to A), symlink "TARGET|B",
  openat2 "RESOLVE|PATH" or "RESOLVE|DIR|REL" (read through openat2 with
  RESOLVE = no-symlinks, beneath, in-root, no-magiclinks or no-xdev; PATH
  relative to / for beneath/in-root, REL relative to a descriptor of DIR).
Exec:
  exec PATH (run PATH --version, or "PATH ARG..." split on spaces with
  "exec-args"), ldso PATH (run PATH through the dynamic loader),
  mprotect-exec PATH (map PATH readable, then mprotect it executable).
Coordination with the test:
  wait PATH (until PATH exists, at most 60 s; ETIMEDOUT after).
Mount tree (self-protection):
  mount-bind "A|B" (bind A on B), umount PATH, chroot PATH,
  move-mount "A|B" (open_tree clone of A attached on B by move_mount),
  open-tree-read "DIR|REL" (open_tree clone of DIR, detached, then read REL
  through it).
Self-protection:
  bpf (BPF_MAP_CREATE), kill-parent SIG, ptrace-parent, cgroup-write PATH
  (open for write), clone-into-cgroup DIR (clone3 CLONE_INTO_CGROUP),
  init-module, finit-module PATH, autoload FAMILY (socket of that family).

Prints one line per probe: "OP ARG RESULT", RESULT being OK, an errno name,
or EXIT<n> for a program that ran and exited with n != 0.
"""
import ctypes
import errno
import os
import signal
import struct
import subprocess
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

SYS_bpf = 321
SYS_init_module = 175
SYS_finit_module = 313
SYS_openat2 = 437
SYS_clone3 = 435
SYS_open_tree = 428
SYS_move_mount = 429
OPEN_TREE_CLONE = 1
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MS_BIND = 0x1000
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
CLONE_INTO_CGROUP = 0x200000000
RESOLVE = {
    "no-xdev": 0x01,
    "no-magiclinks": 0x02,
    "no-symlinks": 0x04,
    "beneath": 0x08,
    "in-root": 0x10,
}
LDSO = "/lib64/ld-linux-x86-64.so.2"


def check(rc):
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


def run(argv):
    try:
        p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    except PermissionError as e:
        raise OSError(e.errno, str(e))
    if p.returncode == 126:
        # The shell's "cannot execute" (e.g. an interpreter's exec denied).
        raise OSError(errno.EPERM, "exit 126")
    if p.returncode != 0:
        return "EXIT%d" % p.returncode
    return "OK"


def probe(op, arg):
    if op == "read":
        fd = os.open(arg, os.O_RDONLY)
        os.read(fd, 1)
        os.close(fd)
    elif op == "write":
        os.close(os.open(arg, os.O_WRONLY))
    elif op == "creat":
        os.close(os.open(arg, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elif op == "trunc":
        os.close(os.open(arg, os.O_WRONLY | os.O_TRUNC))
    elif op == "truncate":
        os.truncate(arg, 0)
    elif op == "opath-reopen":
        p = os.open(arg, os.O_PATH)
        fd = os.open(f"/proc/self/fd/{p}", os.O_RDONLY)
        os.close(p)
        os.close(fd)
    elif op == "unlink":
        os.unlink(arg)
    elif op == "mkdir":
        os.mkdir(arg)
    elif op == "rmdir":
        os.rmdir(arg)
    elif op == "mknod":
        os.mkfifo(arg)
    elif op == "chmod":
        os.chmod(arg, 0o600)
    elif op == "chown":
        os.chown(arg, 0, 0)
    elif op == "rename":
        a, b = arg.split("|")
        os.rename(a, b)
    elif op == "link":
        a, b = arg.split("|")
        os.link(a, b)
    elif op == "symlink":
        a, b = arg.split("|")
        os.symlink(a, b)
    elif op == "openat2":
        parts = arg.split("|")
        how_name, path = parts[0], parts[-1]
        how = struct.pack("QQQ", os.O_RDONLY, 0, RESOLVE[how_name])
        dirfd = -100  # AT_FDCWD
        if len(parts) == 3:
            # "RESOLVE|DIR|REL": relative to a descriptor of DIR.
            dirfd = os.open(parts[1], os.O_PATH)
        elif how_name in ("beneath", "in-root"):
            dirfd = os.open("/", os.O_PATH)
            path = path.lstrip("/")
        buf = ctypes.create_string_buffer(how)
        fd = check(libc.syscall(SYS_openat2, dirfd, path.encode(), buf, len(how)))
        os.read(fd, 1)
        os.close(fd)
    elif op == "exec":
        return run([arg, "--version"])
    elif op == "exec-args":
        return run(arg.split(" "))
    elif op == "ldso":
        return run([LDSO, arg, "--version"])
    elif op == "mprotect-exec":
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        fd = os.open(arg, os.O_RDONLY)
        addr = libc.mmap(None, 4096, 1, 2, fd, 0)  # PROT_READ, MAP_PRIVATE
        os.close(fd)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), "mmap")
        check(libc.mprotect(ctypes.c_void_p(addr), 4096, 1 | 4))  # PROT_READ|PROT_EXEC
    elif op == "wait":
        import time

        deadline = time.monotonic() + 60
        while not os.path.exists(arg):
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "wait")
            time.sleep(0.01)
    elif op == "mount-bind":
        a, b = arg.split("|")
        check(libc.mount(a.encode(), b.encode(), None, MS_BIND, None))
    elif op == "umount":
        check(libc.umount2(arg.encode(), 0))
    elif op == "chroot":
        os.chroot(arg)
    elif op == "move-mount":
        a, b = arg.split("|")
        fd = check(libc.syscall(SYS_open_tree, -100, a.encode(), OPEN_TREE_CLONE | AT_RECURSIVE))
        try:
            check(libc.syscall(SYS_move_mount, fd, b"", -100, b.encode(), MOVE_MOUNT_F_EMPTY_PATH))
        finally:
            os.close(fd)
    elif op == "open-tree-read":
        d, rel = arg.split("|")
        tree = check(libc.syscall(SYS_open_tree, -100, d.encode(), OPEN_TREE_CLONE | AT_RECURSIVE))
        try:
            fd = os.open(rel, os.O_RDONLY, dir_fd=tree)
            os.read(fd, 1)
            os.close(fd)
        finally:
            os.close(tree)
    elif op == "bpf":
        # BPF_MAP_CREATE: an array map of one u32.
        attr = ctypes.create_string_buffer(struct.pack("IIIII", 2, 4, 4, 1, 0) + bytes(108))
        fd = check(libc.syscall(SYS_bpf, 0, attr, 128))
        os.close(fd)
    elif op == "kill-parent":
        os.kill(os.getppid(), int(arg))
    elif op == "ptrace-parent":
        check(libc.ptrace(PTRACE_ATTACH, os.getppid(), None, None))
        libc.ptrace(PTRACE_DETACH, os.getppid(), None, None)
    elif op == "cgroup-write":
        os.close(os.open(arg, os.O_WRONLY))
    elif op == "clone-into-cgroup":
        cg = os.open(arg, os.O_RDONLY | os.O_DIRECTORY)
        # struct clone_args: flags, pidfd, child_tid, parent_tid,
        # exit_signal, stack, stack_size, tls, set_tid, set_tid_size, cgroup.
        args = ctypes.create_string_buffer(
            struct.pack("QQQQQQQQQQQ", CLONE_INTO_CGROUP, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, 0, 0, cg)
        )
        pid = check(libc.syscall(SYS_clone3, args, 88))
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        os.close(cg)
    elif op == "init-module":
        image = ctypes.create_string_buffer(b"\x7fELF" + bytes(60))
        check(libc.syscall(SYS_init_module, image, 64, b""))
    elif op == "finit-module":
        fd = os.open(arg, os.O_RDONLY)
        try:
            check(libc.syscall(SYS_finit_module, fd, b"", 0))
        finally:
            os.close(fd)
    elif op == "autoload":
        import socket

        socket.socket(int(arg), socket.SOCK_DGRAM).close()
    else:
        raise SystemExit("unknown op " + op)
    return "OK"


def main():
    args = sys.argv[1:]
    if len(args) % 2:
        raise SystemExit(__doc__)
    for i in range(0, len(args), 2):
        op, arg = args[i], args[i + 1]
        try:
            res = probe(op, arg)
        except OSError as e:
            res = errno.errorcode.get(e.errno, str(e.errno))
        print(f"{op} {arg} {res}", flush=True)


main()
