"""Programs for the ``native`` sandbox's tests and bench: ``#!`` scripts run from the read-only ``/usr``.

Each reads the task's input on stdin and writes its output on stdout, like a ``wasm`` module.
"""

from __future__ import annotations

UPPER = b"#!/bin/sh\ntr a-z A-Z\n"

# The compute kernel of the bench: FNV-1a rounds over the input, in the system's Python.
KERNEL = b"""#!/usr/bin/python3
import sys
data = sys.stdin.buffer.read()
h = 0x811C9DC5
for _ in range(200):
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
sys.stdout.write("%08x" % h)
"""

# -- the escape battery --

# Reads the path named by its input (the node's identity key), and anything under /root, /home, /etc.
READ_HOST_FILE = b"""#!/bin/sh
read path
cat "$path" 2>/dev/null && echo LEAKED
ls /root /home /etc /work 2>/dev/null && echo LISTED
echo done
"""

# Opens TCP connections to the host's loopback (the node's API port is its input) and the internet.
OPEN_SOCKET = b"""#!/usr/bin/python3
import socket, sys
port = int(sys.stdin.read().strip() or 80)
for host, p in (("127.0.0.1", port), ("1.1.1.1", 443)):
    try:
        socket.create_connection((host, p), timeout=1).close()
        print("CONNECTED", host)
    except OSError as error:
        print("refused", type(error).__name__, error.errno)
"""

FORK_BOMB = b"#!/bin/sh\nbomb() { bomb | bomb & }\nbomb\nsleep 30\n"

# Allocates 1 GiB (above any test cap): refused by the address-space limit.
ALLOCATE = b"""#!/usr/bin/python3
try:
    block = bytearray(1 << 30)
    print("ALLOCATED")
except MemoryError:
    print("refused")
"""

LOOP_FOREVER = b"#!/bin/sh\nwhile :; do :; done\n"

SLEEP_PAST_DEADLINE = b"#!/bin/sh\nsleep 3600\n"

HUGE_OUTPUT = b"#!/bin/sh\nexec cat /dev/zero\n"

# Writes outside its output: into /usr, into the directory named by its input (the node's data dir), into /tmp.
WRITE_OUTSIDE_OUTPUT = b"""#!/bin/sh
read dir
echo x > /usr/pwned 2>/dev/null && echo WROTE_USR
mkdir -p "$dir" 2>/dev/null; echo x > "$dir/pwned" 2>/dev/null && echo wrote_private_copy
echo x > /tmp/scratch && echo wrote_tmp
echo done
"""

# Reaches for the kernel's privileged surface: unshare(2) (seccomp kills it).
UNSHARE = b"""#!/usr/bin/python3
import ctypes
print("trying", flush=True)
ctypes.CDLL(None, use_errno=True).syscall(272, 0x10000000)
print("SURVIVED")
"""
