"""Protocol tests of the TFTP server with a raw UDP client.

Each test runs a TFTPServer in this process on 127.0.0.1, port 0, serving
its own temporary root folder, and talks to it packet by packet: dropped,
repeated and foreign packets are sent on purpose.  The test client packs
and unpacks packets with struct itself instead of using pxeserver's packet
layer, so a fault there cannot hide on both ends.

After each test the number of threads must be back to its value before the
server started, because a leaked transfer thread is a resource bug.
"""

import collections
import errno
import logging
import os
import random
import re
import socket
import struct
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import pxeserver  # noqa: E402  (needs the path above)
from support import WAIT_SECONDS  # noqa: E402


LOCALHOST = "127.0.0.1"

# --tftp-timeout for every server here: the ceiling of the server's
# retransmission timeout, kept short so tests that wait out timeouts stay
# fast.  --tftp-retries bounds how long an abandoned transfer lives.
SERVER_TIMEOUT_SECONDS = 0.5
SERVER_RETRIES = 2

# Checks that nothing arrives wait this long: twice the server's longest
# retransmission timeout, so a server that keeps sending is seen.
QUIET_SECONDS = 2 * SERVER_TIMEOUT_SECONDS

# RFC 2349 timeout, in seconds, requested by tests that count packets, so
# the server never retransmits while a passing test runs.
NO_RETRANSMIT_TIMEOUT = "30"
# RFC 2349 timeout, in seconds, for tests that wait for a retransmission.
FIXED_TIMEOUT_SECONDS = 2

POLL_SECONDS = 0.01

# Tries of the race in test_final_ack_behind_port_error_completes; each
# has about a two in three chance of showing the fault it looks for.
PORT_ERROR_ATTEMPTS = 5
MAX_BLKSIZE = 1468

# Opcodes and error codes, spelled out here so the client does not depend
# on the module under test (RFC 1350 section 5, RFC 2347).
RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
NOT_DEFINED = 0
FILE_NOT_FOUND = 1
ACCESS_VIOLATION = 2
DISK_FULL = 3
ILLEGAL_OPERATION = 4
UNKNOWN_TRANSFER_ID = 5
FILE_ALREADY_EXISTS = 6
OPTION_NEGOTIATION = 8

OPCODE = struct.Struct("!H")
HEADER = struct.Struct("!HH")
BLOCK_MODULO = 65536
DEFAULT_BLKSIZE = 512

NESTED_NAME = "boot/nested.bin"
OUTSIDE_NAME = "outside.bin"
SECRET_NAME = "secret.bin"


Packet = collections.namedtuple("Packet", "opcode number body source")
Packet.__doc__ = """A received packet.

``number`` is the block number (DATA, ACK) or error code (ERROR); ``body``
is the DATA payload, the ERROR text, or a dict of OACK options.
"""

Download = collections.namedtuple("Download",
                                  "content oack received accepted sizes")
Download.__doc__ = """The result of a read.

``received`` lists the block number of every DATA packet that arrived,
repeats included; ``accepted`` lists those taken in order, and ``sizes``
their payload lengths.
"""


def decode(raw, source):
    """Unpack one packet from the server into a Packet."""
    opcode = OPCODE.unpack_from(raw)[0]
    if opcode == OACK:
        fields = raw[OPCODE.size:].split(b"\0")[:-1]
        body = {name.decode(): value.decode()
                for name, value in zip(fields[::2], fields[1::2])}
        return Packet(opcode, None, body, source)
    number = HEADER.unpack_from(raw)[1]
    body = raw[HEADER.size:]
    if opcode == ERROR:
        body = body.split(b"\0")[0].decode("utf-8", "replace")
    return Packet(opcode, number, body, source)


def request_packet(opcode, name, mode="octet", options=None):
    fields = [name.encode(), mode.encode()]
    for option, value in (options or {}).items():
        fields += [option.encode(), str(value).encode()]
    return OPCODE.pack(opcode) + b"\0".join(fields) + b"\0"


def ack_packet(block):
    return HEADER.pack(ACK, block % BLOCK_MODULO)


def data_packet(block, payload):
    return HEADER.pack(DATA, block % BLOCK_MODULO) + payload


def error_packet(code, text="stop"):
    return HEADER.pack(ERROR, code) + text.encode() + b"\0"


def random_bytes(size, seed=0):
    """Return ``size`` reproducible pseudo-random bytes."""
    if size == 0:
        return b""
    return random.Random(seed).getrandbits(8 * size).to_bytes(size, "big")


def wait_until(predicate, timeout=WAIT_SECONDS):
    """Poll ``predicate`` until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def format_problem(packet):
    if packet.opcode == ERROR:
        return f"ERROR {packet.number} {packet.body!r}"
    return f"opcode {packet.opcode} number {packet.number}"


class RawClient:
    """A UDP socket on 127.0.0.1 that speaks TFTP one packet at a time.

    ``transfer_address`` is learned from the first packet that comes from
    a port other than the server's listening port.
    """

    def __init__(self, testcase, server_address):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        testcase.addCleanup(self.sock.close)
        # Room for whole windows of small blocks without loss.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((LOCALHOST, 0))
        self.server_address = server_address
        self.transfer_address = None

    @property
    def address_text(self):
        address, port = self.sock.getsockname()
        return f"{address}:{port}"

    def send_to_server(self, packet):
        self.sock.sendto(packet, self.server_address)

    def send_request(self, opcode, name, mode="octet", options=None):
        self.send_to_server(request_packet(opcode, name, mode, options))

    def send(self, packet):
        """Send to the transfer port of the running transfer."""
        self.sock.sendto(packet, self.transfer_address)

    def abort(self):
        """End the running transfer with an ERROR, as a client may."""
        self.send(error_packet(NOT_DEFINED, "test done"))

    def receive(self, timeout=WAIT_SECONDS):
        """Return the next packet; fail the test if none comes in time."""
        packet = self._receive_one(timeout)
        if packet is None:
            raise AssertionError(f"no packet within {timeout} s")
        return packet

    def receive_all(self, seconds):
        """Return every packet that arrives within ``seconds``."""
        packets = []
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return packets
            packet = self._receive_one(remaining)
            if packet is None:
                return packets
            packets.append(packet)

    def _receive_one(self, timeout):
        self.sock.settimeout(timeout)
        try:
            raw, source = self.sock.recvfrom(BLOCK_MODULO + HEADER.size)
        except socket.timeout:
            return None
        if self.transfer_address is None and source != self.server_address:
            self.transfer_address = source
        return decode(raw, source)

    def packets_after_stray(self, packet):
        """Send ``packet`` at 0.75 of FIXED_TIMEOUT_SECONDS after the last
        packet from the server; return what arrives by 1.25 of it, then
        end the transfer.

        A server that keeps its deadline resends within that time.  One
        that restarts its wait on ``packet`` resends at 1.75.
        """
        time.sleep(0.75 * FIXED_TIMEOUT_SECONDS)
        self.send(packet)
        packets = self.receive_all(0.5 * FIXED_TIMEOUT_SECONDS)
        self.abort()
        return packets

    def read(self, name, mode="octet", options=None, **receiver_flags):
        """Read a file by RRQ and return a Download.

        ``receiver_flags`` go to BlockReceiver: ``drop``, ``ack_twice``,
        ``ack_on_gap``, ``on_block``.
        """
        self.send_request(RRQ, name, mode, options)
        first = self.receive()
        oack = None
        blksize, windowsize = DEFAULT_BLKSIZE, 1
        if first.opcode == OACK:
            oack = first.body
            blksize = int(oack.get("blksize", DEFAULT_BLKSIZE))
            windowsize = int(oack.get("windowsize", 1))
            self.send(ack_packet(0))
            first = None
        receiver = BlockReceiver(self, blksize, windowsize, **receiver_flags)
        receiver.run(first)
        return Download(bytes(receiver.content), oack, receiver.received,
                        receiver.accepted, receiver.sizes)

    def write(self, name, content, mode="octet", options=None, on_ack=None):
        """Upload ``content`` by WRQ in lock-step; return the last reply.

        The last reply is the ACK of the final block, or the first ERROR.
        ``on_ack(block)`` runs after each ACK of a DATA block.
        """
        self.send_request(WRQ, name, mode, options)
        reply = self.receive()
        if reply.opcode == ERROR:
            return reply
        blksize = DEFAULT_BLKSIZE
        if reply.opcode == OACK:
            blksize = int(reply.body.get("blksize", DEFAULT_BLKSIZE))
        count = len(content) // blksize + 1
        for block in range(1, count + 1):
            payload = content[(block - 1) * blksize:block * blksize]
            self.send(data_packet(block, payload))
            reply = self._receive_ack(block)
            if reply.opcode == ERROR:
                return reply
            if on_ack is not None:
                on_ack(block)
        return reply

    def _receive_ack(self, block):
        while True:
            reply = self.receive()
            if reply.opcode == ERROR:
                return reply
            if reply.opcode == ACK and reply.number == block % BLOCK_MODULO:
                return reply


class BlockReceiver:
    """The receiving side of a read, after RFC 1350 and RFC 7440.

    ACKs every ``windowsize`` blocks in order and the final block.
    ``drop`` holds block numbers (not wrapped) whose first arrival is
    thrown away, as if lost.  ``ack_twice`` sends every ACK two times.
    With ``ack_on_gap``, the first block that arrives ahead of a missing
    one makes the receiver send an ACK of the last block in order, so the
    server resends from the missing block at once.  Without it the
    receiver waits for the server to time out.
    ``on_block(block)`` runs after each block taken, before its ACK.
    """

    def __init__(self, client, blksize, windowsize, drop=(),
                 ack_twice=False, ack_on_gap=False, on_block=None):
        self.client = client
        self.blksize = blksize
        self.windowsize = windowsize
        self.drop = set(drop)
        self.ack_twice = ack_twice
        self.ack_on_gap = ack_on_gap
        self.on_block = on_block
        self.content = bytearray()
        self.received = []
        self.accepted = []
        self.sizes = []

    def run(self, first=None):
        expected = 1  # next block, not wrapped
        since_ack = 0
        gap_answered = False
        packet = first
        while True:
            if packet is None:
                packet = self.client.receive()
            if packet.opcode != DATA:
                raise AssertionError(f"expected DATA {expected}, got "
                                     f"{format_problem(packet)}")
            self.received.append(packet.number)
            block, payload, packet = packet.number, packet.body, None
            if block != expected % BLOCK_MODULO:
                ahead = (block - expected) % BLOCK_MODULO < BLOCK_MODULO // 2
                if self.ack_on_gap and ahead and not gap_answered:
                    self._ack(expected - 1)
                    since_ack = 0
                    gap_answered = True
                continue
            if expected in self.drop:
                self.drop.discard(expected)
                continue
            self.content += payload
            self.accepted.append(block)
            self.sizes.append(len(payload))
            if self.on_block is not None:
                self.on_block(expected)
            expected += 1
            since_ack += 1
            gap_answered = False
            final = len(payload) < self.blksize
            if final or since_ack == self.windowsize:
                self._ack(block)
                since_ack = 0
            if final:
                return

    def _ack(self, block):
        self.client.send(ack_packet(block))
        if self.ack_twice:
            self.client.send(ack_packet(block))


_NULL_HANDLER = logging.NullHandler()


def setUpModule():
    # Warnings from the server would otherwise go to stderr through the
    # logging module's last-resort handler and clutter the test output.
    logging.getLogger("pxeserver").addHandler(_NULL_HANDLER)


def tearDownModule():
    logging.getLogger("pxeserver").removeHandler(_NULL_HANDLER)


class TFTPServerTestCase(unittest.TestCase):
    """Starts a server on a fresh root for each test and stops it after.

    After the test, the transfer threads must end by themselves before the
    server stops, and the listener thread must end when it stops.

    Subclasses add flags through ``server_flags``.  In the temporary
    folder, ``root/`` is served and ``upload/`` may receive uploads.
    """

    def setUp(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.base = os.path.realpath(folder.name)
        self.root = os.path.join(self.base, "root")
        self.upload_dir = os.path.join(self.base, "upload")
        os.mkdir(self.root)
        os.mkdir(self.upload_dir)
        self.addCleanup(self.assert_thread_count, threading.active_count(),
                        "threads left after the server stopped")
        self.server = self.start_server(self.server_flags())
        self.addCleanup(self.assert_thread_count, threading.active_count(),
                        "transfer threads still running after the test")

    def server_flags(self):
        return []

    def start_server(self, flags):
        argv = ["--tftp-only", "--root", self.root,
                "--tftp-address", LOCALHOST, "--tftp-port", "0",
                "--max-blksize", str(MAX_BLKSIZE),
                "--tftp-timeout", str(SERVER_TIMEOUT_SECONDS),
                "--tftp-retries", str(SERVER_RETRIES)] + flags
        args = pxeserver.build_parser().parse_args(argv)
        server = pxeserver.TFTPServer(pxeserver.build_config(args))
        server.bind()
        thread = threading.Thread(target=server.serve_forever,
                                  name="test-tftp-listener")
        thread.start()
        self.addCleanup(self.stop_server, server, thread)
        return server

    def stop_server(self, server, thread):
        server.shutdown()
        # The listener checks its stop flag between receives, which time
        # out after 0.5 s.  An ERROR packet, which gets no reply, ends the
        # wait at once and keeps the suite fast.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(error_packet(NOT_DEFINED), server.address)
        thread.join(WAIT_SECONDS)
        server.close()
        self.assertFalse(thread.is_alive(), "listener thread still running")

    def assert_thread_count(self, count, message):
        wait_until(lambda: threading.active_count() <= count)
        self.assertEqual(threading.active_count(), count,
                         f"{message}: {threading.enumerate()}")

    def client(self):
        return RawClient(self, self.server.address)

    def make_file(self, name, content, folder=None):
        path = os.path.join(folder or self.root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as stream:
            stream.write(content)
        return content

    def rejected_request(self, name):
        """Send an RRQ for ``name``; return the client, the server's reply
        and its warning that names the file."""
        client = self.client()
        with self.assertLogs("pxeserver.tftp", "WARNING") as logs:
            client.send_request(RRQ, name)
            reply = client.receive()
            line = self.wait_for_log(logs, re.escape(name))
        return client, reply, line

    def wait_for_transfers_to_end(self):
        ended = wait_until(lambda: not self.server.active_transfers())
        self.assertTrue(ended, "transfers still running")

    def wait_for_log(self, logs, pattern):
        """Wait for a captured log line matching ``pattern`` and return it."""
        def find():
            return next((line for line in list(logs.output)
                         if re.search(pattern, line)), None)
        wait_until(lambda: find() is not None)
        line = find()
        self.assertIsNotNone(line, f"no log line matches {pattern!r}; "
                                   f"got {logs.output}")
        return line

    def retransmits_logged(self, logs, name):
        line = self.wait_for_log(logs, rf"sent {re.escape(name)} to ")
        return int(re.search(r"retransmits=(\d+)", line).group(1))


class TestTFTPReadRequests(TFTPServerTestCase):

    def test_rrq_without_options_gets_data(self):
        content = self.make_file("boot.bin", random_bytes(2000))
        client = self.client()
        client.send_request(RRQ, "boot.bin")
        packet = client.receive()
        client.abort()
        self.assertEqual(packet.opcode, DATA)
        self.assertEqual(packet.number, 1)
        self.assertEqual(packet.body, content[:DEFAULT_BLKSIZE])
        self.assertNotEqual(packet.source, self.server.address)

    def test_rrq_reads_whole_file(self):
        content = self.make_file("boot.bin", random_bytes(5000))
        download = self.client().read("boot.bin")
        self.assertEqual(download.content, content)
        self.assertIsNone(download.oack)

    def test_rrq_with_options_gets_oack(self):
        content = self.make_file("boot.bin", random_bytes(3000))
        client = self.client()
        client.send_request(RRQ, "boot.bin",
                            options={"blksize": "1024", "tsize": "0"})
        packet = client.receive()
        client.abort()
        self.assertEqual(packet.opcode, OACK)
        self.assertEqual(packet.body, {"blksize": "1024",
                                       "tsize": str(len(content))})

    def test_oack_holds_only_asked_options(self):
        self.make_file("boot.bin", random_bytes(3000))
        client = self.client()
        client.send_request(RRQ, "boot.bin",
                            options={"tsize": "0", "x-vendor": "1"})
        packet = client.receive()
        client.abort()
        self.assertEqual(packet.opcode, OACK)
        self.assertEqual(sorted(packet.body), ["tsize"])

    def test_unknown_options_only_get_data(self):
        self.make_file("boot.bin", random_bytes(3000))
        client = self.client()
        client.send_request(RRQ, "boot.bin", options={"x-vendor": "1"})
        packet = client.receive()
        client.abort()
        self.assertEqual(packet.opcode, DATA)
        self.assertEqual(packet.number, 1)

    def test_multicast_option_ignored(self):
        self.make_file("boot.bin", random_bytes(3000))
        client = self.client()
        client.send_request(RRQ, "boot.bin", options={"multicast": ""})
        packet = client.receive()
        if packet.opcode == DATA:
            client.abort()
        self.assertEqual(packet.opcode, DATA)

    def test_blksize_capped_by_max_blksize(self):
        content = self.make_file("boot.bin", random_bytes(5000))
        download = self.client().read("boot.bin",
                                      options={"blksize": "9000"})
        self.assertEqual(download.oack, {"blksize": str(MAX_BLKSIZE)})
        self.assertEqual(download.sizes[0], MAX_BLKSIZE)
        self.assertEqual(download.content, content)

    def test_error_8_after_oack_ends_quietly(self):
        content = self.make_file("ipxe.efi", random_bytes(4000))
        client = self.client()
        with self.assertLogs("pxeserver.tftp", "INFO") as logs:
            client.send_request(RRQ, "ipxe.efi", options={"tsize": "0"})
            oack = client.receive()
            client.send(error_packet(OPTION_NEGOTIATION, "size only"))
            after = client.receive_all(QUIET_SECONDS)
            self.wait_for_transfers_to_end()
        self.assertEqual(oack.opcode, OACK)
        self.assertEqual(after, [])
        prefix = f"transfer of ipxe.efi to {client.address_text} "
        ended = [record for record in logs.records
                 if record.getMessage().startswith(prefix)]
        self.assertEqual(len(ended), 1, logs.output)
        self.assertEqual(ended[0].levelno, logging.INFO)
        download = self.client().read("ipxe.efi", options={"tsize": "0"})
        self.assertEqual(download.content, content)

    def test_repeated_rrq_starts_one_transfer(self):
        self.make_file("boot.bin", random_bytes(3000))
        client = self.client()
        client.send_request(RRQ, "boot.bin")
        client.send_request(RRQ, "boot.bin")
        packets = client.receive_all(QUIET_SECONDS)
        client.abort()
        self.assertTrue(packets, "no reply to the RRQ")
        self.assertEqual({packet.opcode for packet in packets}, {DATA})
        self.assertEqual({packet.number for packet in packets}, {1})
        self.assertEqual(len({packet.source for packet in packets}), 1)

    def test_transfer_start_and_end_logged(self):
        content = self.make_file("pxelinux.0", random_bytes(1500))
        client = self.client()
        with self.assertLogs("pxeserver.tftp", "INFO") as logs:
            client.read("pxelinux.0",
                        options={"timeout": NO_RETRANSMIT_TIMEOUT})
            end = self.wait_for_log(logs, r"^INFO:pxeserver.tftp:sent ")
        start = self.wait_for_log(logs, r"^INFO:pxeserver.tftp:RRQ ")
        self.assertIn(f"RRQ from {client.address_text} file=pxelinux.0 ",
                      start)
        self.assertIn(f"size={len(content)}", start)
        self.assertIn(f"sent pxelinux.0 to {client.address_text} "
                      f"bytes={len(content)} ", end)
        self.assertIn("retransmits=0", end)

    def test_failed_transfer_logged(self):
        self.make_file("boot.bin", random_bytes(3000))
        client = self.client()
        with self.assertLogs("pxeserver.tftp", "INFO") as logs:
            client.send_request(RRQ, "boot.bin")
            client.receive()
            client.abort()
            line = self.wait_for_log(logs, "failed")
        self.assertIn(f"transfer of boot.bin to {client.address_text} "
                      f"failed: ", line)

    def test_malformed_requests_get_error_4(self):
        malformed = {
            "one byte": b"\x01",
            "unknown opcode": b"\x00\x09boot.bin\x00octet\x00",
            "no terminating NUL": b"\x00\x01boot.bin\x00octet",
            "odd option list": b"\x00\x01boot.bin\x00octet\x00tsize\x00",
            "unsupported mode": b"\x00\x01boot.bin\x00mail\x00",
        }
        content = self.make_file("boot.bin", random_bytes(700))
        for label, packet in malformed.items():
            with self.subTest(label):
                client = self.client()
                client.send_to_server(packet)
                reply = client.receive()
                self.assertEqual(reply.opcode, ERROR)
                self.assertEqual(reply.number, ILLEGAL_OPERATION)
                self.assertEqual(reply.source, self.server.address)
        download = self.client().read("boot.bin")
        self.assertEqual(download.content, content)

    def test_transfer_packets_to_port_69_get_no_reply(self):
        # tftp-hpa sends an ACK to the port that sent it an ERROR.  It
        # would read a reply as the result of its next request.
        stray = {
            "ERROR": error_packet(NOT_DEFINED),
            "ACK": ack_packet(1),
            "DATA": HEADER.pack(DATA, 1) + b"data",
            "OACK": OPCODE.pack(OACK) + b"blksize\x001024\x00",
        }
        for label, packet in stray.items():
            with self.subTest(label):
                client = self.client()
                client.send_to_server(packet)
                self.assertEqual(client.receive_all(QUIET_SECONDS), [])

    def test_missing_file_gets_error_1(self):
        client, reply, line = self.rejected_request("no-such-file.bin")
        self.assertEqual(reply.opcode, ERROR)
        self.assertEqual(reply.number, FILE_NOT_FOUND)
        self.assertIn(client.address_text, line)


class TestTFTPTransfers(TFTPServerTestCase):

    def test_block_number_rolls_over_to_zero(self):
        # 65540 full blocks of 8 bytes and a short one: blocks 65536 and on
        # go out as 0, 1, 2, ...
        content = self.make_file("big.bin", random_bytes(8 * 65540 + 3))
        download = self.client().read(
            "big.bin", options={"blksize": "8", "windowsize": "64"})
        self.assertEqual(download.oack, {"blksize": "8",
                                         "windowsize": "64"})
        self.assertEqual(download.accepted[65534], 65535)
        self.assertEqual(download.accepted[65535], 0)
        self.assertEqual(download.accepted[-1], 5)
        self.assertEqual(download.content, content)

    def test_exact_multiple_ends_with_empty_data(self):
        content = self.make_file("exact.bin",
                                 random_bytes(3 * DEFAULT_BLKSIZE))
        download = self.client().read("exact.bin")
        self.assertEqual(download.accepted, [1, 2, 3, 4])
        self.assertEqual(download.sizes[-1], 0)
        self.assertEqual(download.content, content)

    def test_exact_multiple_of_blksize_option(self):
        content = self.make_file("exact.bin", random_bytes(2 * 1024))
        download = self.client().read("exact.bin",
                                      options={"blksize": "1024"})
        self.assertEqual(download.sizes, [1024, 1024, 0])
        self.assertEqual(download.content, content)

    def test_empty_file_sends_one_empty_block(self):
        self.make_file("empty.bin", b"")
        download = self.client().read("empty.bin")
        self.assertEqual(download.accepted, [1])
        self.assertEqual(download.content, b"")

    def test_lockstep_recovers_dropped_data(self):
        content = self.make_file("boot.bin", random_bytes(512 * 6 + 100))
        with self.assertLogs("pxeserver.tftp", "INFO") as logs:
            download = self.client().read("boot.bin", drop={3, 7})
            retransmits = self.retransmits_logged(logs, "boot.bin")
        self.assertEqual(download.content, content)
        self.assertGreater(retransmits, 0)

    def test_window_recovers_dropped_data(self):
        content = self.make_file("boot.bin", random_bytes(512 * 12 + 7))
        with self.assertLogs("pxeserver.tftp", "INFO") as logs:
            download = self.client().read(
                "boot.bin", options={"windowsize": "4"}, drop={6, 13})
            retransmits = self.retransmits_logged(logs, "boot.bin")
        self.assertEqual(download.oack, {"windowsize": "4"})
        self.assertEqual(download.content, content)
        self.assertGreater(retransmits, 0)

    def test_window_gap_ack_recovers_data(self):
        content = self.make_file("boot.bin", random_bytes(512 * 12 + 7))
        download = self.client().read(
            "boot.bin", drop={6}, ack_on_gap=True,
            options={"windowsize": "4", "timeout": NO_RETRANSMIT_TIMEOUT})
        self.assertEqual(download.content, content)

    def test_window_gap_ack_counts_retransmits(self):
        self.make_file("boot.bin", random_bytes(512 * 12 + 7))
        client = self.client()
        with self.assertLogs("pxeserver.tftp", "INFO") as logs:
            client.read("boot.bin", drop={6}, ack_on_gap=True,
                        options={"windowsize": "4",
                                 "timeout": NO_RETRANSMIT_TIMEOUT})
            retransmits = self.retransmits_logged(logs, "boot.bin")
        self.assertGreater(retransmits, 0)

    def test_duplicate_acks_never_duplicate_data(self):
        content = self.make_file("boot.bin", random_bytes(512 * 20 + 1))
        download = self.client().read(
            "boot.bin", options={"timeout": NO_RETRANSMIT_TIMEOUT},
            ack_twice=True)
        self.assertEqual(download.content, content)
        self.assertEqual(download.received, list(range(1, 22)))

    def test_repeated_ack_keeps_resend_deadline(self):
        # iPXE repeats its last ACK on a timer of its own while it waits
        # for the next block. The server must resend at its deadline all
        # the same. A wait restarted by the repeat ends at 1.75 timeouts.
        self.make_file("boot.bin", random_bytes(512 * 3 + 1))
        client = self.client()
        client.send_request(RRQ, "boot.bin",
                            options={"timeout": str(FIXED_TIMEOUT_SECONDS)})
        client.receive()  # the OACK
        client.send(ack_packet(0))
        client.receive()  # DATA 1
        client.send(ack_packet(1))
        client.receive()  # DATA 2, taken as lost
        resent = client.packets_after_stray(ack_packet(1))
        self.assertEqual([(packet.opcode, packet.number)
                          for packet in resent], [(DATA, 2)])

    def test_stray_packet_keeps_oack_deadline(self):
        self.make_file("boot.bin", random_bytes(100))
        client = self.client()
        client.send_request(RRQ, "boot.bin",
                            options={"timeout": str(FIXED_TIMEOUT_SECONDS)})
        client.receive()  # the OACK, taken as lost
        resent = client.packets_after_stray(ack_packet(7))
        self.assertEqual([packet.opcode for packet in resent], [OACK])

    def test_duplicate_window_acks_never_duplicate_data(self):
        content = self.make_file("boot.bin", random_bytes(512 * 20 + 1))
        download = self.client().read(
            "boot.bin", options={"timeout": NO_RETRANSMIT_TIMEOUT,
                                 "windowsize": "4"},
            ack_twice=True)
        self.assertEqual(download.content, content)
        self.assertEqual(download.received, list(range(1, 22)))

    def test_ack_inside_window_resumes_after_it(self):
        content = self.make_file("boot.bin", random_bytes(512 * 6 + 100))
        client = self.client()
        client.send_request(RRQ, "boot.bin", options={
            "windowsize": "4", "timeout": NO_RETRANSMIT_TIMEOUT})
        oack = client.receive()
        client.send(ack_packet(0))
        first_window = [client.receive() for _ in range(4)]
        client.send(ack_packet(2))
        second_window = [client.receive() for _ in range(4)]
        client.send(ack_packet(6))
        last = client.receive()
        client.send(ack_packet(7))
        self.assertEqual(oack.body["windowsize"], "4")
        self.assertEqual([packet.number for packet in first_window],
                         [1, 2, 3, 4])
        self.assertEqual([packet.number for packet in second_window],
                         [3, 4, 5, 6])
        self.assertEqual(last.number, 7)
        received = (first_window[:2] + second_window) + [last]
        self.assertEqual(b"".join(packet.body for packet in received),
                         content)

    def test_foreign_port_gets_error_5(self):
        content = self.make_file("boot.bin", random_bytes(512 * 4 + 9))
        client = self.client()
        stranger = self.client()
        seen = {}

        def interfere(block):
            if block != 1:
                return
            stranger.sock.sendto(ack_packet(1), client.transfer_address)
            seen["stranger"] = stranger.receive()
            seen["client"] = client.receive_all(QUIET_SECONDS)

        with self.assertLogs("pxeserver.tftp", "WARNING") as logs:
            download = client.read(
                "boot.bin", options={"timeout": NO_RETRANSMIT_TIMEOUT},
                on_block=interfere)
            line = self.wait_for_log(logs, "unknown transfer ID")
        self.assertEqual(seen["stranger"].opcode, ERROR)
        self.assertEqual(seen["stranger"].number, UNKNOWN_TRANSFER_ID)
        self.assertEqual(seen["stranger"].source, client.transfer_address)
        self.assertEqual(seen["client"], [])
        self.assertIn(stranger.address_text, line)
        self.assertEqual(download.content, content)


class TestTFTPFileAccess(TFTPServerTestCase):
    """Files that change during a read, and files that cannot be opened."""

    def test_file_shrunk_during_read_warned(self):
        path = os.path.join(self.root, "boot.bin")
        self.make_file("boot.bin", random_bytes(65536))

        def shrink(block):
            if block == 1:
                os.truncate(path, 1000)

        with self.assertLogs("pxeserver.tftp", "WARNING") as logs:
            download = self.client().read("boot.bin", on_block=shrink)
            line = self.wait_for_log(logs, "changed while it was sent")
        self.assertLess(len(download.content), 65536)
        self.assertIn("its size was 65536 bytes", line)
        self.assertIn(f"{len(download.content)} were sent", line)

    def test_descriptor_shortage_gets_server_busy(self):
        self.make_file("boot.bin", random_bytes(700))
        real_open = os.open

        def open_without_descriptors(path, *args, **kwargs):
            if str(path).endswith("boot.bin"):
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return real_open(path, *args, **kwargs)

        with mock.patch.object(pxeserver.os, "open",
                               open_without_descriptors):
            _, reply, line = self.rejected_request("boot.bin")
        self.assertEqual(reply.opcode, ERROR)
        self.assertEqual(reply.number, NOT_DEFINED)
        self.assertEqual(reply.body, "server busy, try again later")
        self.assertIn("raise the open file limit", line)


class TestTFTPTransferSockets(TFTPServerTestCase):
    """Each transfer's socket is connected to its client, with a guard
    socket beside it for other senders (see test_foreign_port_gets_error_5
    for the guard's reply)."""

    def test_late_packet_from_client_gets_no_reply(self):
        self.make_file("boot.bin", random_bytes(700))
        client = self.client()
        client.read("boot.bin")
        self.wait_for_transfers_to_end()
        client.send(ack_packet(2))
        self.assertEqual(client.receive_all(QUIET_SECONDS), [])

    def test_transfer_port_cannot_be_shared(self):
        self.make_file("boot.bin", random_bytes(5000))
        client = self.client()
        client.send_request(RRQ, "boot.bin")
        self.assertEqual(client.receive().opcode, DATA)
        intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(intruder.close)
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with self.assertRaises(OSError) as caught:
            intruder.bind(client.transfer_address)
        client.abort()
        self.assertEqual(caught.exception.errno, errno.EADDRINUSE)

    def closed_port_log_line(self, size):
        """Fetch a file of ``size`` bytes, close the client's socket after
        DATA 1 and return the server's log line about the failure."""
        self.make_file("boot.bin", random_bytes(size))
        client = self.client()
        with self.assertLogs("pxeserver.tftp", "INFO") as logs:
            client.send_request(RRQ, "boot.bin")
            self.assertEqual(client.receive().opcode, DATA)
            client.sock.close()
            # The first resend of DATA 1 draws an ICMP port unreachable,
            # which ends the transfer before its retries run out.
            return self.wait_for_log(logs, "transfer of boot.bin .* failed")

    def test_closed_client_port_ends_transfer_at_once(self):
        line = self.closed_port_log_line(5000)
        self.assertIn("port is closed", line)
        self.assertNotIn("timed out", line)
        self.assertNotIn("whole file", line)

    def test_closed_port_after_last_block_logged(self):
        line = self.closed_port_log_line(100)
        self.assertIn("port is closed", line)
        self.assertIn("may have the whole file", line)

    def test_failure_logged_after_warnings_run_out(self):
        # Another port of the client's address spends the address's
        # warnings on malformed requests. Each gets ERROR 4 there.
        spender = self.client()
        for _ in range(pxeserver.WARNINGS_PER_SOURCE_PER_MINUTE + 2):
            spender.send_to_server(b"\0\x09")
        line = self.closed_port_log_line(5000)
        self.assertTrue(line.startswith("INFO:"), line)
        self.assertIn("port is closed", line)

    def test_final_ack_behind_port_error_completes(self):
        self.make_file("boot.bin", random_bytes(600))
        # The client below races the server's thread, so the case where
        # the error arrives first is tried several times.
        for attempt in range(PORT_ERROR_ATTEMPTS):
            with self.subTest(attempt=attempt):
                self.check_final_ack_behind_port_error()

    def check_final_ack_behind_port_error(self):
        client = self.client()
        with self.assertLogs("pxeserver.tftp", "INFO") as logs:
            client.send_request(RRQ, "boot.bin", options={
                "windowsize": "2", "timeout": NO_RETRANSMIT_TIMEOUT})
            self.assertEqual(client.receive().opcode, OACK)
            client.send(ack_packet(0))
            window = [client.receive(), client.receive()]
            # ACK 1 makes the server resend block 2, which reaches the
            # closed port and draws an ICMP error; ACK 2 already waits in
            # the server's queue behind it.
            client.send(ack_packet(1))
            client.send(ack_packet(2))
            client.sock.close()
            line = self.wait_for_log(logs, "(sent|transfer of) boot.bin")
        self.assertEqual([packet.number for packet in window], [1, 2])
        self.assertTrue(line.startswith("INFO:"), line)
        self.assertIn("bytes=600", line)
        self.wait_for_transfers_to_end()

    def test_same_port_reads_again_at_once(self):
        content = self.make_file("boot.bin", random_bytes(700))
        client = self.client()
        logger = logging.getLogger("pxeserver.tftp")
        second_done = threading.Event()
        handler = HoldEndLine(second_done)
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        self.addCleanup(second_done.set)
        first = client.read("boot.bin")
        # The first transfer's thread now waits in its end line, as a slow
        # log might make it.  A new RRQ from the same port must be served.
        client.transfer_address = None
        second = client.read("boot.bin")
        second_done.set()
        self.assertEqual(first.content, content)
        self.assertEqual(second.content, content)

    def test_next_request_before_final_ack_served(self):
        content = self.make_file("boot.bin", random_bytes(700))
        client = self.client()
        client.send_request(RRQ, "boot.bin")
        self.assertEqual(client.receive().number, 1)
        client.send(ack_packet(1))
        last = client.receive()
        first_transfer = client.transfer_address
        # The next request reaches the listener before the final ACK
        # reaches the transfer, as it may when the two race.
        with self.assertLogs("pxeserver.tftp", "DEBUG") as logs:
            client.send_request(RRQ, "boot.bin")
            self.wait_for_log(logs, "deferred")
            client.send(ack_packet(2))
            client.transfer_address = None
            second = client.receive()
        self.assertEqual(last.number, 2)
        self.assertEqual(second.opcode, DATA)
        self.assertEqual(second.number, 1)
        self.assertNotEqual(second.source, first_transfer)
        client.send(ack_packet(1))
        rest = client.receive()
        client.send(ack_packet(2))
        self.assertEqual(second.body + rest.body, content)

    def test_shutdown_tells_waiting_client(self):
        self.make_file("boot.bin", random_bytes(5000))
        # A server of its own, because this one stops before the test ends.
        server = self.start_server(self.server_flags())
        client = RawClient(self, server.address)
        client.send_request(RRQ, "boot.bin", options={
            "timeout": NO_RETRANSMIT_TIMEOUT})
        self.assertEqual(client.receive().opcode, OACK)
        with self.assertLogs("pxeserver.tftp", "INFO") as logs:
            server.shutdown()
            reply = client.receive()
            line = self.wait_for_log(logs, "stopped")
        self.assertEqual(reply.opcode, ERROR)
        self.assertEqual(reply.number, NOT_DEFINED)
        self.assertEqual(reply.body, "server shutting down")
        self.assertIn(client.transfer_address[0], line)

    def test_sockets_closed_after_transfers(self):
        def open_descriptors():
            return len(os.listdir("/proc/self/fd"))

        self.make_file("boot.bin", random_bytes(3000))
        before = open_descriptors()
        for _ in range(5):
            self.client().read("boot.bin")
        self.wait_for_transfers_to_end()
        # Each client's own socket stays open until the test ends.
        settled = wait_until(lambda: open_descriptors() <= before + 5)
        self.assertTrue(settled, f"{open_descriptors() - before - 5} "
                                 f"descriptors left open by the server")


class HoldEndLine(logging.Handler):
    """Holds the first transfer end line ("sent ...") until ``release``
    is set, at most WAIT_SECONDS."""

    def __init__(self, release):
        super().__init__()
        self.release = release
        self.line_held = False

    def emit(self, record):
        if not self.line_held and record.getMessage().startswith("sent "):
            self.line_held = True
            self.release.wait(WAIT_SECONDS)


def free_port_pair():
    """Return a port number P such that P and P + 1 are free on loopback."""
    for _ in range(100):
        port = random.randrange(40000, 60000)
        probes = []
        try:
            for candidate in (port, port + 1):
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probes.append(probe)
                probe.bind((LOCALHOST, candidate))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return port
    raise AssertionError("no two free ports found on loopback")


class TestTFTPPortRange(TFTPServerTestCase):
    """Transfers take their ports from a range of two."""

    def server_flags(self):
        self.low = free_port_pair()
        return ["--tftp-port-range", f"{self.low}-{self.low + 1}"]

    def test_transfers_take_distinct_ports_in_range(self):
        self.make_file("boot.bin", random_bytes(2000))
        holders = [self.client(), self.client()]
        for holder in holders:
            holder.send_request(RRQ, "boot.bin")
            self.assertEqual(holder.receive().opcode, DATA)
        ports = sorted(holder.transfer_address[1] for holder in holders)
        third = self.client()
        third.send_request(RRQ, "boot.bin")
        reply = third.receive()
        for holder in holders:
            holder.abort()
        self.assertEqual(ports, [self.low, self.low + 1])
        self.assertEqual(reply.opcode, ERROR)
        self.assertEqual(reply.number, NOT_DEFINED)
        self.assertIn("no free transfer port", reply.body)
        self.assertEqual(reply.source, self.server.address)


class TestTFTPSinglePortRange(TFTPServerTestCase):
    """Every transfer takes the one port of the range."""

    def server_flags(self):
        port = free_port_pair()
        return ["--tftp-port-range", f"{port}-{port}"]

    def test_port_free_again_after_transfer(self):
        content = self.make_file("boot.bin", random_bytes(700))
        idle_threads = threading.active_count()
        for attempt in range(3):
            download = self.client().read("boot.bin")
            self.assertEqual(download.content, content, f"read {attempt}")
            # The port is free once the transfer's thread has ended.
            ended = wait_until(
                lambda: threading.active_count() <= idle_threads)
            self.assertTrue(ended, "transfer thread still running")


class TestTFTPPaths(TFTPServerTestCase):
    """File names, with targets beside the root that no request may reach:
    ``outside.bin``, ``root-private/secret.bin`` and symlinks to both."""

    def setUp(self):
        super().setUp()
        self.nested = self.make_file(NESTED_NAME, random_bytes(1300))
        self.make_file(OUTSIDE_NAME, b"outside the root\n", folder=self.base)
        private = os.path.join(self.base, "root-private")
        self.make_file(SECRET_NAME, b"private\n", folder=private)
        os.symlink(os.path.join(self.base, OUTSIDE_NAME),
                   os.path.join(self.root, "escape-link"))
        os.symlink(private, os.path.join(self.root, "private-link"))

    def test_traversal_forms_rejected(self):
        expected_codes = {
            "../outside.bin": ACCESS_VIOLATION,
            "/../outside.bin": ACCESS_VIOLATION,
            "..\\outside.bin": ACCESS_VIOLATION,
            "boot/../../outside.bin": ACCESS_VIOLATION,
            "../OUTSIDE.BIN": ACCESS_VIOLATION,
            "/etc/passwd": FILE_NOT_FOUND,
            "escape-link": ACCESS_VIOLATION,
            "../root-private/secret.bin": ACCESS_VIOLATION,
            "private-link/secret.bin": ACCESS_VIOLATION,
        }
        for name, code in expected_codes.items():
            with self.subTest(name):
                client = self.client()
                with self.assertLogs("pxeserver.tftp", "WARNING") as logs:
                    client.send_request(RRQ, name)
                    reply = client.receive()
                    line = self.wait_for_log(logs, "rejected")
                self.assertEqual(reply.opcode, ERROR)
                self.assertEqual(reply.number, code)
                self.assertIn(client.address_text, line)

    def test_leading_separators_served(self):
        for name in ("/boot/nested.bin", "\\boot\\nested.bin",
                     "//boot//nested.bin", "\\/boot/nested.bin"):
            with self.subTest(name):
                download = self.client().read(name)
                self.assertEqual(download.content, self.nested)

    def test_case_insensitive_fallback_served(self):
        download = self.client().read("BOOT/Nested.BIN")
        self.assertEqual(download.content, self.nested)

    def test_exact_case_wins_over_fallback(self):
        upper = self.make_file("boot/NESTED.BIN", b"upper case\n")
        download = self.client().read("boot/NESTED.BIN")
        self.assertEqual(download.content, upper)

    def test_symlink_inside_root_served(self):
        os.symlink("nested.bin", os.path.join(self.root, "boot", "link"))
        download = self.client().read("boot/link")
        self.assertEqual(download.content, self.nested)

    def test_directory_not_served(self):
        client = self.client()
        client.send_request(RRQ, "boot")
        reply = client.receive()
        self.assertEqual(reply.opcode, ERROR)
        self.assertIn(reply.number, (FILE_NOT_FOUND, ACCESS_VIOLATION))

    def test_root_itself_not_served(self):
        client = self.client()
        client.send_request(RRQ, "/")
        reply = client.receive()
        self.assertEqual(reply.opcode, ERROR)
        self.assertIn(reply.number, (FILE_NOT_FOUND, ACCESS_VIOLATION))

    def test_fifo_not_served(self):
        os.mkfifo(os.path.join(self.root, "pipe"))
        client = self.client()
        client.send_request(RRQ, "pipe")
        reply = client.receive()
        self.assertEqual(reply.opcode, ERROR)
        self.assertIn(reply.number, (FILE_NOT_FOUND, ACCESS_VIOLATION))
        download = self.client().read(NESTED_NAME)
        self.assertEqual(download.content, self.nested)

    def test_netascii_converts_line_ends(self):
        self.make_file("menu.txt", b"one\ntwo\r\nbare\rcr\n")
        download = self.client().read("menu.txt", mode="netascii")
        self.assertEqual(download.content,
                         b"one\r\ntwo\r\0\r\nbare\r\0cr\r\n")

    def test_netascii_tsize_counts_conversion(self):
        # 600 lines of 9 bytes: 5400 bytes on disk, 6000 after conversion.
        self.make_file("menu.txt", b"12345678\n" * 600)
        download = self.client().read("menu.txt", mode="netascii",
                                      options={"tsize": "0"})
        self.assertEqual(download.oack, {"tsize": "6000"})
        self.assertEqual(len(download.content), 6000)


class TestTFTPUploadsOff(TFTPServerTestCase):

    def test_wrq_without_upload_dir_rejected(self):
        client = self.client()
        reply = client.write("up.bin", b"data")
        self.assertEqual(reply.opcode, ERROR)
        self.assertEqual(reply.number, ACCESS_VIOLATION)
        self.assertEqual(os.listdir(self.upload_dir), [])
        self.assertFalse(os.path.exists(os.path.join(self.root, "up.bin")))


class TestTFTPUploads(TFTPServerTestCase):

    def server_flags(self):
        return ["--upload-dir", self.upload_dir]

    def upload_path(self, name):
        return os.path.join(self.upload_dir, name)

    def test_upload_appears_only_when_complete(self):
        content = random_bytes(512 * 3 + 40)
        final = self.upload_path("up.bin")
        seen = []  # whether the final name existed after each ACK

        def check_absent(block):
            seen.append(os.path.exists(final))

        client = self.client()
        with self.assertLogs("pxeserver.tftp", "INFO") as logs:
            reply = client.write("up.bin", content, on_ack=check_absent)
            line = self.wait_for_log(logs, "received up.bin")
        self.assertEqual(reply.opcode, ACK)
        # Blocks 1 to 3 are full; the file may appear after the 4th ACK.
        self.assertEqual(seen[:3], [False, False, False])
        self.assertTrue(wait_until(lambda: os.path.exists(final)))
        with open(final, "rb") as stream:
            self.assertEqual(stream.read(), content)
        self.assertIn(f"from {client.address_text} bytes={len(content)}",
                      line)
        self.wait_for_transfers_to_end()
        self.assertEqual(os.listdir(self.upload_dir), ["up.bin"])

    def test_window_after_gap_gets_one_ack(self):
        client = self.client()
        client.send_request(WRQ, "up.bin", options={"windowsize": "4"})
        self.assertEqual(client.receive().opcode, OACK)
        for block in (1, 2, 4):
            client.send(data_packet(block, random_bytes(512, block)))
        gap_reply = client.receive()
        # The client starts a new window of 4 after the ACK of block 2.
        for block in (3, 4, 5, 6):
            client.send(data_packet(block, random_bytes(512, block)))
        window_reply = client.receive()
        client.abort()
        self.assertEqual((gap_reply.opcode, gap_reply.number), (ACK, 2))
        self.assertEqual((window_reply.opcode, window_reply.number),
                         (ACK, 6))

    def test_upload_with_options(self):
        content = random_bytes(3000)
        client = self.client()
        reply = client.write("up.bin", content,
                             options={"blksize": "1024",
                                      "tsize": str(len(content))})
        self.assertEqual(reply.opcode, ACK)
        final = self.upload_path("up.bin")
        self.assertTrue(wait_until(lambda: os.path.exists(final)))
        with open(final, "rb") as stream:
            self.assertEqual(stream.read(), content)

    def test_stray_packet_keeps_ack_deadline(self):
        # An ACK from the uploading client is not DATA, so the server's
        # deadline for the next block stays where it was.
        client = self.client()
        client.send_request(WRQ, "up.bin",
                            options={"timeout": str(FIXED_TIMEOUT_SECONDS)})
        client.receive()  # the OACK
        client.send(data_packet(1, random_bytes(512)))
        client.receive()  # ACK 1, taken as lost
        resent = client.packets_after_stray(ack_packet(1))
        self.assertEqual([(packet.opcode, packet.number)
                          for packet in resent], [(ACK, 1)])

    def test_netascii_upload_converts_line_ends(self):
        # The CR LF pair straddles the first two blocks.
        wire = b"a" * 511 + b"\r\nb\r\0c\r\n"
        client = self.client()
        reply = client.write("up.txt", wire, mode="netascii")
        self.assertEqual(reply.opcode, ACK)
        final = self.upload_path("up.txt")
        self.assertTrue(wait_until(lambda: os.path.exists(final)))
        with open(final, "rb") as stream:
            self.assertEqual(stream.read(), b"a" * 511 + b"\nb\rc\n")

    def test_timed_out_upload_leaves_no_file(self):
        client = self.client()
        client.send_request(WRQ, "up.bin")
        first = client.receive()
        client.send(data_packet(1, random_bytes(DEFAULT_BLKSIZE)))
        second = client.receive()
        self.assertEqual((first.opcode, first.number), (ACK, 0))
        self.assertEqual((second.opcode, second.number), (ACK, 1))
        self.wait_for_transfers_to_end()
        self.assertEqual(os.listdir(self.upload_dir), [])

    def test_existing_file_gets_error_6(self):
        self.make_file("up.bin", b"old", folder=self.upload_dir)
        reply = self.client().write("up.bin", b"new")
        self.assertEqual(reply.opcode, ERROR)
        self.assertEqual(reply.number, FILE_ALREADY_EXISTS)
        with open(self.upload_path("up.bin"), "rb") as stream:
            self.assertEqual(stream.read(), b"old")

    def test_name_taken_during_upload_gets_error_6(self):
        final = self.upload_path("up.bin")

        def take_name(block):
            if block == 1:
                self.make_file("up.bin", b"other", folder=self.upload_dir)

        reply = self.client().write("up.bin", random_bytes(1000),
                                    on_ack=take_name)
        self.wait_for_transfers_to_end()
        with open(final, "rb") as stream:
            self.assertEqual(stream.read(), b"other")
        self.assertEqual(reply.opcode, ERROR)

    def test_upload_into_missing_folder_rejected(self):
        reply = self.client().write("no-dir/up.bin", b"data")
        self.assertEqual(reply.opcode, ERROR)
        self.assertEqual(reply.number, ACCESS_VIOLATION)
        self.assertEqual(os.listdir(self.upload_dir), [])

    def test_upload_outside_upload_dir_rejected(self):
        reply = self.client().write("../escape.bin", b"data")
        self.assertEqual(reply.opcode, ERROR)
        self.assertEqual(reply.number, ACCESS_VIOLATION)
        self.assertFalse(os.path.exists(os.path.join(self.base,
                                                     "escape.bin")))


class TestTFTPUploadOverwrite(TFTPServerTestCase):

    def server_flags(self):
        return ["--upload-dir", self.upload_dir, "--upload-overwrite"]

    def test_overwrite_replaces_existing_file(self):
        self.make_file("up.bin", b"old", folder=self.upload_dir)
        content = random_bytes(1500)
        reply = self.client().write("up.bin", content)
        self.assertEqual(reply.opcode, ACK)
        self.wait_for_transfers_to_end()
        with open(os.path.join(self.upload_dir, "up.bin"), "rb") as stream:
            self.assertEqual(stream.read(), content)


class TestTFTPUploadTimeout(TFTPServerTestCase):
    """The upload's retransmission timeout follows the round trip."""

    # Blocks sent in lock step before the client holds one back.
    GOOD_BLOCKS = 5

    def server_flags(self):
        # A ceiling well above the 1 s initial timeout, so that a timeout
        # that never learned the round trip shows.
        return ["--upload-dir", self.upload_dir, "--tftp-timeout", "5"]

    def test_lost_block_resent_after_short_wait(self):
        # Loopback round trips keep the timeout at its 0.2 s floor once
        # measured. Without a measurement it stays at 1 s.
        client = self.client()
        client.send_request(WRQ, "up.bin")
        self.assertEqual(client.receive().number, 0)
        for block in range(1, self.GOOD_BLOCKS + 1):
            client.send(data_packet(block, random_bytes(512, block)))
            self.assertEqual(client.receive().number, block)
        resent = client.receive_all(0.7)
        client.abort()
        self.assertTrue(resent, "no ACK resent within 0.7 s")
        self.assertEqual((resent[0].opcode, resent[0].number),
                         (ACK, self.GOOD_BLOCKS))


class TestTFTPUploadLimit(TFTPServerTestCase):

    LIMIT_BYTES = 1000

    def server_flags(self):
        return ["--upload-dir", self.upload_dir,
                "--upload-max-bytes", str(self.LIMIT_BYTES)]

    def test_upload_over_limit_gets_error_3(self):
        reply = self.client().write("up.bin",
                                    random_bytes(self.LIMIT_BYTES + 500))
        self.assertEqual(reply.opcode, ERROR)
        self.assertEqual(reply.number, DISK_FULL)
        self.wait_for_transfers_to_end()
        self.assertEqual(os.listdir(self.upload_dir), [])

    def test_announced_size_over_limit_rejected(self):
        client = self.client()
        client.send_request(WRQ, "up.bin",
                            options={"tsize": str(self.LIMIT_BYTES + 1)})
        reply = client.receive()
        self.assertEqual(reply.opcode, ERROR)
        self.assertEqual(reply.number, DISK_FULL)
        self.wait_for_transfers_to_end()
        self.assertEqual(os.listdir(self.upload_dir), [])

    def test_upload_at_limit_accepted(self):
        content = random_bytes(self.LIMIT_BYTES)
        reply = self.client().write("up.bin", content)
        self.assertEqual(reply.opcode, ACK)
        final = os.path.join(self.upload_dir, "up.bin")
        self.assertTrue(wait_until(lambda: os.path.exists(final)))
        with open(final, "rb") as stream:
            self.assertEqual(stream.read(), content)


class TestTFTPTransferLimit(TFTPServerTestCase):

    def server_flags(self):
        return ["--max-transfers", "2"]

    def test_third_transfer_gets_error(self):
        content = self.make_file("boot.bin", random_bytes(2000))
        holders = [self.client(), self.client()]
        for holder in holders:
            holder.send_request(RRQ, "boot.bin")
            self.assertEqual(holder.receive().opcode, DATA)
        third = self.client()
        third.send_request(RRQ, "boot.bin")
        reply = third.receive()
        for holder in holders:
            holder.abort()
        self.assertEqual(reply.opcode, ERROR)
        self.assertEqual(reply.source, self.server.address)
        self.wait_for_transfers_to_end()
        download = self.client().read("boot.bin")
        self.assertEqual(download.content, content)


class TestTFTPBusyPoll(TFTPServerTestCase):
    """Only a lone transfer polls for ACKs (tftp_busy_poll)."""

    def hold_transfer(self):
        """Start a transfer that waits for its first ACK; return its
        client."""
        holder = self.client()
        holder.send_request(RRQ, "boot.bin")
        self.assertEqual(holder.receive().opcode, DATA)
        return holder

    def test_lone_transfer_may_poll(self):
        self.make_file("boot.bin", random_bytes(2000))
        holder = self.hold_transfer()
        allowed = self.server.may_busy_poll()
        holder.abort()
        self.assertTrue(allowed)

    def test_second_transfer_stops_polling(self):
        self.make_file("boot.bin", random_bytes(2000))
        holders = [self.hold_transfer(), self.hold_transfer()]
        allowed = self.server.may_busy_poll()
        for holder in holders:
            holder.abort()
        self.assertFalse(allowed)


class TestTFTPBusyPollOff(TFTPServerTestCase):

    def server_flags(self):
        return ["--tftp-busy-poll", "0"]

    def test_zero_turns_polling_off(self):
        self.assertFalse(self.server.may_busy_poll())

    def test_read_without_polling(self):
        content = self.make_file("boot.bin", random_bytes(512 * 40 + 3))
        download = self.client().read("boot.bin")
        self.assertEqual(download.content, content)


class TestPollThenReceive(unittest.TestCase):
    """ReadTransfer._poll_then_receive on a socket pair."""

    def setUp(self):
        self.near, self.far = socket.socketpair(socket.AF_UNIX,
                                                socket.SOCK_DGRAM)
        self.addCleanup(self.near.close)
        self.addCleanup(self.far.close)
        self.transfer = pxeserver.ReadTransfer.__new__(pxeserver.ReadTransfer)
        self.transfer.sock = self.near
        self.buffer = bytearray(16)

    def send_later(self, seconds):
        sender = threading.Timer(seconds, self.far.send, [ack_packet(1)])
        sender.start()
        self.addCleanup(sender.join)

    def test_packet_during_poll_is_found(self):
        self.send_later(0.05)
        length, found = self.transfer._poll_then_receive(self.buffer,
                                                         WAIT_SECONDS)
        self.assertEqual(length, 4)
        self.assertTrue(found)

    def test_packet_after_poll_is_received(self):
        self.send_later(0.3)
        length, found = self.transfer._poll_then_receive(self.buffer, 0.01)
        self.assertEqual(length, 4)
        self.assertFalse(found)


if __name__ == "__main__":
    unittest.main()
