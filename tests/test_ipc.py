"""The channel between the master and a worker (expertd.ipc): every message, sent and received over a real pair."""

import itertools
import os
import socket
import struct

import pytest

from expertd import ipc

from conftest import open_fds


@pytest.fixture
def client_pair():
    """A client connection: (the client's end, the end the master hands to a worker)."""
    client, served = socket.socketpair()
    yield client, served
    client.close()
    served.close()


def test_the_channel_keeps_message_boundaries(channel):
    master_end, worker_end = channel
    assert master_end.type == socket.SOCK_SEQPACKET and worker_end.family == socket.AF_UNIX
    ipc.send_ready(worker_end, 1)
    ipc.send_ready(worker_end, 2)
    assert [ipc.receive_report(master_end), ipc.receive_report(master_end)] == [(ipc.READY, 1), (ipc.READY, 2)]


# ---------------------------------------------------------------------------------------- SERVE
FRAMES = {
    "from the socket": None,
    "empty": b"",
    "small": b"XD\x01\x01" + bytes(8) + b"\x93\xa6square\x91\x03\x80",
    "inline at the limit": os.urandom(ipc.MAX_INLINE),
    "in a memfd": os.urandom(ipc.MAX_INLINE + 1),
    "large": os.urandom(8 * 1024 * 1024),
}


@pytest.mark.parametrize("speaks_http", [False, True])
@pytest.mark.parametrize("frame", list(FRAMES.values()), ids=list(FRAMES))
def test_a_connection_handed_to_a_worker_arrives_with_its_frame_and_protocol(channel, client_pair, frame,
                                                                             speaks_http):
    master_end, worker_end = channel
    client, served = client_pair
    ipc.send_serve(master_end, 4242, served.fileno(), frame, speaks_http)
    conn_id, fd, received, http_flag = ipc.receive_command(worker_end)
    try:
        assert conn_id == 4242 and http_flag is speaks_http
        assert fd != served.fileno()  # a descriptor of the worker's own for the same connection
        if frame is None:
            assert received is None
        else:
            assert isinstance(received, bytearray) and received == frame
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
        fd = -1
        conn.sendall(b"reply")
        assert client.recv(16) == b"reply"
        client.sendall(b"request")
        assert conn.recv(16) == b"request"
        conn.close()
    finally:
        if fd >= 0:
            os.close(fd)


@pytest.mark.parametrize("conn_id", [0, 1, 65536, 2**32 - 1])
def test_every_connection_id_goes_through(channel, client_pair, conn_id):
    master_end, worker_end = channel
    ipc.send_serve(master_end, conn_id, client_pair[1].fileno())
    got, fd, _frame, _http = ipc.receive_command(worker_end)
    os.close(fd)
    assert got == conn_id


@pytest.mark.parametrize("frame", [None, b"abc", os.urandom(ipc.MAX_INLINE + 1)], ids=["socket", "inline", "memfd"])
def test_handing_over_leaves_no_descriptor_open_but_the_connections(channel, client_pair, frame):
    master_end, worker_end = channel
    before = open_fds()
    ipc.send_serve(master_end, 1, client_pair[1].fileno(), frame)
    _conn_id, fd, _frame, _http = ipc.receive_command(worker_end)
    assert open_fds() - before == {fd}
    os.close(fd)
    assert open_fds() == before


def test_handed_ahead_connections_wait_in_the_channel_in_order(channel, client_pair):
    master_end, worker_end = channel
    for conn_id in (1, 2, 3):
        ipc.send_serve(master_end, conn_id, client_pair[1].fileno(), b"frame %d" % conn_id)
    received = []
    for _ in range(3):
        conn_id, fd, frame, _http = ipc.receive_command(worker_end)
        os.close(fd)
        received.append((conn_id, bytes(frame)))
    assert received == [(1, b"frame 1"), (2, b"frame 2"), (3, b"frame 3")]


def test_a_worker_whose_master_closed_the_channel_is_told_to_go(channel):
    master_end, worker_end = channel
    master_end.close()
    assert ipc.receive_command(worker_end) is None


@pytest.mark.parametrize("message", [ipc.READY + b"\x00\x00\x00\x01", b"?garbage", ipc.DONE])
def test_a_message_other_than_serve_from_the_master_is_an_error(channel, client_pair, message):
    master_end, worker_end = channel
    before = open_fds()
    socket.send_fds(master_end, [message], [client_pair[1].fileno()])
    with pytest.raises(RuntimeError, match="unexpected message from the master"):
        ipc.receive_command(worker_end)
    assert open_fds() == before  # the descriptor that came with it is closed


def test_a_serve_without_its_connection_is_an_error(channel):
    master_end, worker_end = channel
    master_end.send(ipc.SERVE + struct.pack("!IB", 1, 0))
    with pytest.raises(RuntimeError, match="unexpected message from the master"):
        ipc.receive_command(worker_end)


# ---------------------------------------------------------------------------------------- DONE
UNSENT = {"none": None, "empty": b"", "some": b"the rest of a reply", "large": os.urandom(300_000)}
UNREAD = {"none": None, "empty": b"", "some": b"XD\x01\x10" + bytes(8)}


@pytest.mark.parametrize("unread", list(UNREAD.values()), ids=[f"unread-{k}" for k in UNREAD])
@pytest.mark.parametrize("unsent", list(UNSENT.values()), ids=[f"unsent-{k}" for k in UNSENT])
@pytest.mark.parametrize("close, retiring, linger", list(itertools.product([False, True], repeat=3)))
def test_a_done_report_carries_every_flag_and_the_bytes_handed_back(channel, close, retiring, linger, unsent,
                                                                     unread):
    master_end, worker_end = channel
    before = open_fds()
    served = 1 + close + 2 * retiring + 4 * linger
    ipc.send_done(worker_end, 99, close, retiring=retiring, unsent=unsent, linger=linger, served=served,
                  unread=unread)
    op, value = ipc.receive_report(master_end)
    assert op == ipc.DONE
    assert value == (99, close, retiring, linger, served, unsent or None, unread or None)
    if unread:
        assert type(value[6]) is bytes
    assert open_fds() == before  # the memfds are read and closed
    assert ipc.receive_report(master_end) is None


@pytest.mark.parametrize("served", [0, 1, 1000, 2**32 - 1])
def test_a_done_report_counts_every_request_served(channel, served):
    master_end, worker_end = channel
    ipc.send_done(worker_end, 5, False, served=served)
    assert ipc.receive_report(master_end) == (ipc.DONE, (5, False, False, False, served, None, None))


def test_unsent_bytes_may_be_a_view_of_the_reply(channel):
    master_end, worker_end = channel
    reply = b"0123456789" * 1000
    ipc.send_done(worker_end, 1, False, unsent=memoryview(reply)[1234:])
    _op, value = ipc.receive_report(master_end)
    assert value[5] == reply[1234:]


def test_descriptors_a_done_report_does_not_announce_are_closed(channel, client_pair):
    master_end, worker_end = channel
    before = open_fds()
    socket.send_fds(worker_end, [ipc.DONE + struct.pack("!IBI", 6, 0, 1)], [client_pair[0].fileno()])
    assert ipc.receive_report(master_end) == (ipc.DONE, (6, False, False, False, 1, None, None))
    assert open_fds() == before


@pytest.mark.parametrize("flag, index", [("_UNSENT", 5), ("_UNREAD", 6)])
def test_bytes_announced_but_not_passed_close_the_connection_rather_than_leave_a_gap(channel, flag, index):
    master_end, worker_end = channel
    worker_end.send(ipc.DONE + struct.pack("!IBI", 8, getattr(ipc, flag), 1))  # (the memfd was lost on the way)
    _op, value = ipc.receive_report(master_end)
    assert value[0] == 8 and value[1] is True and value[index] is None


# ---------------------------------------------------------------------------------------- READY, MEMORY, FAILED
@pytest.mark.parametrize("pid", [1, 4242, 2**31 - 1])
def test_ready_carries_the_workers_pid(channel, pid):
    master_end, worker_end = channel
    ipc.send_ready(worker_end, pid)
    assert ipc.receive_report(master_end) == (ipc.READY, pid)


@pytest.mark.parametrize("figures", [(0, 0, 0), (10 << 20, 30 << 20, 80 << 20), (2**63, 2**40, 2**64 - 1)])
def test_memory_carries_uss_pss_and_rss(channel, figures):
    master_end, worker_end = channel
    ipc.send_memory(worker_end, *figures)
    assert ipc.receive_report(master_end) == (ipc.MEMORY, figures)


@pytest.mark.parametrize("text", ["", "after_fork hook failed: RuntimeError: no GPU", "caf\u00e9 \u2603 \U0001f600"])
def test_failed_carries_the_reason(channel, text):
    master_end, worker_end = channel
    ipc.send_failed(worker_end, text)
    assert ipc.receive_report(master_end) == (ipc.FAILED, text)


def test_a_long_failure_is_cut_to_fit_one_message(channel):
    master_end, worker_end = channel
    ipc.send_failed(worker_end, "x" * 100_000)
    op, text = ipc.receive_report(master_end)
    assert op == ipc.FAILED and text == "x" * 4095


def test_reports_are_read_in_the_order_sent(channel):
    master_end, worker_end = channel
    ipc.send_ready(worker_end, 10)
    ipc.send_done(worker_end, 1, False, unread=b"next")
    ipc.send_memory(worker_end, 1, 2, 3)
    ipc.send_failed(worker_end, "bye")
    reports = [ipc.receive_report(master_end) for _ in range(5)]
    assert reports == [(ipc.READY, 10), (ipc.DONE, (1, False, False, False, 1, None, b"next")),
                       (ipc.MEMORY, (1, 2, 3)), (ipc.FAILED, "bye"), None]


# ---------------------------------------------------------------------------------------- the end, and garbage
def test_nothing_waiting_is_none(channel):
    assert ipc.receive_report(channel[0]) is None


def test_a_worker_gone_is_the_end_of_its_channel(channel):
    master_end, worker_end = channel
    ipc.send_ready(worker_end, 7)
    worker_end.close()
    assert ipc.receive_report(master_end) == (ipc.READY, 7)  # its last words first
    assert ipc.receive_report(master_end) == (b"", None)
    assert ipc.receive_report(master_end) == (b"", None)


@pytest.mark.parametrize("message", [b"Z", b"?garbage", b"\x00\x00\x00\x00", ipc.SERVE + bytes(5)])
def test_an_unknown_report_is_an_error(channel, message):
    master_end, worker_end = channel
    worker_end.send(message)
    with pytest.raises(RuntimeError, match="unexpected report from a worker"):
        ipc.receive_report(master_end)


def test_descriptors_sent_with_an_unknown_report_are_closed(channel, client_pair):
    master_end, worker_end = channel
    before = open_fds()
    socket.send_fds(worker_end, [b"Zzz"], [client_pair[0].fileno()])
    with pytest.raises(RuntimeError):
        ipc.receive_report(master_end)
    assert open_fds() == before


@pytest.mark.parametrize(
    "message", [ipc.DONE, ipc.DONE + b"\x00\x00\x00\x01", ipc.READY + b"\x00", ipc.MEMORY + bytes(8)],
)
def test_a_truncated_report_is_an_error_the_master_handles(channel, message):
    # The dispatcher catches RuntimeError from receive_report (it kills the worker that sent it); anything
    # else escapes the master's loop.
    master_end, worker_end = channel
    worker_end.send(message)
    with pytest.raises(RuntimeError):
        ipc.receive_report(master_end)
