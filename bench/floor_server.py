"""The transport floor: a minimal Unix-socket, 4-byte-length-prefixed msgpack server.

    python floor_server.py SOCKET

One process, one thread, one connection at a time; it decodes the call,
squares the argument and replies.  Any design pays at least this per round
trip; bench/compare.py quotes expertd's round trip against it.
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
                header = conn.recv(4, socket.MSG_WAITALL)
                if len(header) < 4:
                    break
                (length,) = struct.unpack("!I", header)
                _name, args, _kwargs = msgpack.unpackb(conn.recv(length, socket.MSG_WAITALL))
                body = msgpack.packb(args[0] * args[0])
                conn.sendall(struct.pack("!I", len(body)) + body)
        except OSError:
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    sys.exit(main())
