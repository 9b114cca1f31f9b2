"""The transport floor: a minimal Unix-socket, 4-byte-length-prefixed msgpack server.

    python floor_server.py SOCKET

One process, one thread, one connection at a time; it decodes the call,
squares the argument and replies, in as few system calls as a blocking loop
can: one read for a request that arrives whole, one write.  Any design pays at
least this per round trip; bench/compare.py quotes expertd's round trip
against it.
"""

import os
import socket
import struct
import sys

import msgpack


def main() -> int:
    path = sys.argv[1]
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            while True:
                data = conn.recv(65536)
                if len(data) < 4:
                    break
                (length,) = struct.unpack_from("!I", data)
                if len(data) < 4 + length:
                    data += conn.recv(4 + length - len(data), socket.MSG_WAITALL)
                _name, args, _kwargs = msgpack.unpackb(data[4:])
                body = msgpack.packb(args[0] * args[0])
                conn.sendall(struct.pack("!I", len(body)) + body)
        except OSError:
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    sys.exit(main())
