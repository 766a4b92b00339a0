"""WebAssembly modules for the sandbox's tests and bench, written in WAT (no toolchain needed).

Each is compiled to a real wasm binary with ``wasmtime.wat2wasm``, so it is content-addressed by the
sha256 of those bytes like any module a task names. Every module is a WASI command (``_start``)
reading the task's input on stdin and writing its output on stdout.
"""

from __future__ import annotations

import wasmtime

_IMPORTS = """
 (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
"""

# Writes the bytes [ptr, ptr+len) to fd; the iovec at 0..8, nwritten at 8.
_WRITE = """
 (func $write (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
   (i32.store (i32.const 0) (local.get $ptr))
   (i32.store (i32.const 4) (local.get $len))
   (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
"""

# Reads all of stdin to 1024.. (at most 60 KiB); returns its length.
_READ_ALL = """
 (func $read_all (result i32) (local $total i32) (local $n i32)
   (block $done (loop $more
     (i32.store (i32.const 16) (i32.add (i32.const 1024) (local.get $total)))
     (i32.store (i32.const 20) (i32.sub (i32.const 61440) (local.get $total)))
     (drop (call $fd_read (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 24)))
     (local.set $n (i32.load (i32.const 24)))
     (br_if $done (i32.eqz (local.get $n)))
     (local.set $total (i32.add (local.get $total) (local.get $n)))
     (br $more)))
   (local.get $total))
"""


def wasm(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


# The honest task: the input upper-cased (ASCII), then "!" and the input's length as one byte.
UPPER = wasm(f"""(module {_IMPORTS}
 (memory (export "memory") 2) {_WRITE} {_READ_ALL}
 (func (export "_start") (local $len i32) (local $i i32) (local $c i32)
   (local.set $len (call $read_all))
   (block $end (loop $each
     (br_if $end (i32.ge_u (local.get $i) (local.get $len)))
     (local.set $c (i32.load8_u (i32.add (i32.const 1024) (local.get $i))))
     (if (i32.and (i32.ge_u (local.get $c) (i32.const 97)) (i32.le_u (local.get $c) (i32.const 122)))
       (then (i32.store8 (i32.add (i32.const 1024) (local.get $i)) (i32.sub (local.get $c) (i32.const 32)))))
     (local.set $i (i32.add (local.get $i) (i32.const 1)))
     (br $each)))
   (i32.store8 (i32.add (i32.const 1024) (local.get $len)) (i32.const 33))
   (i32.store8 (i32.add (i32.const 1025) (local.get $len)) (local.get $len))
   (drop (call $write (i32.const 1) (i32.const 1024) (i32.add (local.get $len) (i32.const 2))))))
""")

# A compute kernel: FNV-1a over the input, 2000 rounds, with float work (NaNs canonicalised); writes 8 bytes.
KERNEL = wasm(f"""(module {_IMPORTS}
 (memory (export "memory") 2) {_WRITE} {_READ_ALL}
 (func (export "_start") (local $len i32) (local $r i32) (local $i i32) (local $h i32) (local $f f64)
   (local.set $len (call $read_all))
   (local.set $h (i32.const 0x811c9dc5))
   (local.set $f (f64.const 1.0))
   (block $rounds_done (loop $round
     (br_if $rounds_done (i32.ge_u (local.get $r) (i32.const 2000)))
     (local.set $i (i32.const 0))
     (block $end (loop $each
       (br_if $end (i32.ge_u (local.get $i) (local.get $len)))
       (local.set $h (i32.mul (i32.xor (local.get $h) (i32.load8_u (i32.add (i32.const 1024) (local.get $i))))
                              (i32.const 16777619)))
       (local.set $i (i32.add (local.get $i) (i32.const 1)))
       (br $each)))
     (local.set $f (f64.add (f64.mul (local.get $f) (f64.const 1.0000001)) (f64.div (f64.const 0) (f64.const 0))))
     (local.set $r (i32.add (local.get $r) (i32.const 1)))
     (br $round)))
   (i32.store (i32.const 512) (local.get $h))
   (i32.store (i32.const 516) (i32.wrap_i64 (i64.reinterpret_f64 (local.get $f))))
   (drop (call $write (i32.const 1) (i32.const 512) (i32.const 8)))))
""")

# -- the escape battery --

# Tries to open a host file (the path is its input) through every preopen a WASI runtime might
# grant (fds 3..9), then to read those fds directly; writes what it got (errnos, any bytes read).
READ_HOST_FILE = wasm(f"""(module {_IMPORTS}
 (import "wasi_snapshot_preview1" "path_open"
   (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
 (memory (export "memory") 2) {_WRITE} {_READ_ALL}
 (func (export "_start") (local $len i32) (local $fd i32) (local $err i32)
   (local.set $len (call $read_all))
   (local.set $fd (i32.const 3))
   (block $end (loop $each
     (br_if $end (i32.ge_u (local.get $fd) (i32.const 10)))
     (local.set $err (call $path_open (local.get $fd) (i32.const 0) (i32.const 1024) (local.get $len)
                        (i32.const 0) (i64.const -1) (i64.const -1) (i32.const 0) (i32.const 32)))
     (i32.store8 (i32.const 40) (local.get $err))
     (drop (call $write (i32.const 1) (i32.const 40) (i32.const 1)))
     (i32.store (i32.const 16) (i32.const 8192))
     (i32.store (i32.const 20) (i32.const 4096))
     (local.set $err (call $fd_read (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24)))
     (i32.store8 (i32.const 40) (local.get $err))
     (drop (call $write (i32.const 1) (i32.const 40) (i32.const 1)))
     (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
     (br $each)))))
""")

# Tries the network: WASI sockets on every fd a runtime might have handed it.
OPEN_SOCKET = wasm(f"""(module {_IMPORTS}
 (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "sock_send" (func $send (param i32 i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 1) {_WRITE}
 (func (export "_start") (local $fd i32)
   (local.set $fd (i32.const 3))
   (block $end (loop $each
     (br_if $end (i32.ge_u (local.get $fd) (i32.const 6)))
     (i32.store8 (i32.const 40) (call $accept (local.get $fd) (i32.const 0) (i32.const 32)))
     (drop (call $write (i32.const 1) (i32.const 40) (i32.const 1)))
     (i32.store8 (i32.const 40) (call $send (local.get $fd) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 32)))
     (drop (call $write (i32.const 1) (i32.const 40) (i32.const 1)))
     (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
     (br $each)))))
""")

# Asks the host for a socket outside WASI: refused before it runs.
HOST_SOCKET_IMPORT = wasm("""(module
 (import "env" "socket" (func $socket (param i32 i32 i32) (result i32)))
 (memory (export "memory") 1)
 (func (export "_start") (drop (call $socket (i32.const 2) (i32.const 1) (i32.const 0)))))
""")

LOOP_FOREVER = wasm("""(module (memory (export "memory") 1)
 (func (export "_start") (loop $forever (br $forever))))
""")

# Grows its memory a page at a time until refused, then traps (as a failed malloc would).
ALLOCATE_FOREVER = wasm("""(module (memory (export "memory") 1)
 (func (export "_start")
   (loop $more
     (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
     (br $more))))
""")

# Declares more memory than any cap: refused when instantiated.
HUGE_MEMORY = wasm("""(module (memory (export "memory") 16384) (func (export "_start")))""")

# Writes 32 KiB chunks to stdout forever.
HUGE_OUTPUT = wasm(f"""(module {_IMPORTS}
 (memory (export "memory") 2) {_WRITE}
 (func (export "_start") (loop $more (drop (call $write (i32.const 1) (i32.const 1024) (i32.const 32768))) (br $more))))
""")

# Asks to sleep 1 hour (poll_oneoff on a relative clock), then spins: the wall clock stops it.
SLEEP_PAST_DEADLINE = wasm(f"""(module {_IMPORTS}
 (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
 (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
 (memory (export "memory") 1)
 (func (export "_start")
   (i64.store (i32.const 64) (i64.const 1))
   (i32.store8 (i32.const 72) (i32.const 0))
   (i64.store (i32.const 88) (i64.const 3600000000000))
   (drop (call $poll (i32.const 64) (i32.const 256) (i32.const 1) (i32.const 512)))
   (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 520)))
   (loop $spin (br $spin))))
""")

# Writes to fds other than stdout/stderr and tries to create a file.
WRITE_OUTSIDE_OUTPUT = wasm(f"""(module {_IMPORTS}
 (import "wasi_snapshot_preview1" "path_open"
   (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
 (memory (export "memory") 1) {_WRITE}
 (data (i32.const 1024) "pwned")
 (func (export "_start")
   (i32.store8 (i32.const 40) (call $write (i32.const 3) (i32.const 1024) (i32.const 5)))
   (i32.store8 (i32.const 41) (call $write (i32.const 0) (i32.const 1024) (i32.const 5)))
   (i32.store8 (i32.const 42) (call $path_open (i32.const 3) (i32.const 0) (i32.const 1024) (i32.const 5)
                                 (i32.const 9) (i64.const -1) (i64.const -1) (i32.const 0) (i32.const 32)))
   (drop (call $write (i32.const 1) (i32.const 40) (i32.const 3)))))
""")
