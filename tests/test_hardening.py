"""Hardening tests: fuzzed packets, request floods, crashes, amplification.

Fuzzing.  A seeded generator builds valid DHCP and TFTP packets of every
DHCP message type and TFTP opcode, plus unknown ones.  It mutates them with
bit flips, random bytes, truncation, appended garbage, option lengths that
point past the end, repeated options and long option lists.  The parsers
must return or raise PacketError for every packet.  A few thousand of the
same packets go to an in-process DHCPServer, ProxyDHCPServer, BootServer
and TFTPServer on loopback.  Afterwards no ERROR was logged, the thread
count is back to normal and each server still replies to a valid
request.
PXESERVER_FUZZ_SEED sets the seed and PXESERVER_FUZZ_COUNT the number of
packets given to the parsers; every failure message names the seed, so a
failing run can be replayed.

Packets sent to the DHCP servers get ciaddr and giaddr set to 0.0.0.0 or
127.0.0.1 after mutation, because the server sends its reply to those
addresses and every reply must stay on loopback.  The loopback harness of
test_dhcp_server.py blocks any other destination as a second guard.

Floods, on loopback: 1,000 RRQs against --max-transfers 50, and 10,000
DISCOVERs with random MACs against a pool of 10 addresses.

Crash consistency: pxeserver.py in full mode inside network namespaces
(tests/netns.py) is killed with SIGKILL while busybox udhcpc clients take
leases, and restarted on the same lease file, several times.  Every
address a client was ACKed must be in the lease file after each kill.  An
upload that stalls never appears under its final name.

Amplification: a client that never ACKs gets a bounded number of bytes.
"""

import functools
import ipaddress
import json
import logging
import os
import random
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import netns
import support
from support import REPO_ROOT

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pxeserver  # noqa: E402  (needs REPO_ROOT on sys.path)

import test_dhcp_server as dhcp_harness  # noqa: E402
import test_proxy_dhcp as proxy_harness  # noqa: E402
import test_tftp_server as tftp_harness  # noqa: E402
from test_dhcp_packet import OVMF_DISCOVER  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_DISCOVER  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_REQUEST  # noqa: E402


FUZZ_SEED = int(os.environ.get("PXESERVER_FUZZ_SEED", "1350"))
# Packets given to the parsers, half DHCP and half TFTP.
FUZZ_COUNT = int(os.environ.get("PXESERVER_FUZZ_COUNT", "100000"))
# Valid packets that each generator builds and then mutates.
BASE_PACKET_COUNT = 200
# Packets sent to each running server: a few thousand in all.
SERVER_FUZZ_COUNT = min(FUZZ_COUNT, 1500)
# Packets sent between two waits for the server to catch up, so that the
# socket's receive buffer rarely overflows and most packets are handled.
SERVER_FUZZ_BATCH = 100

# Upper bound on every wait of the helpers in this file.
WAIT_SECONDS = support.WAIT_SECONDS
POLL_SECONDS = 0.01

MessageType = pxeserver.DHCPMessageType
Opcode = pxeserver.TFTPOpcode

LOOPBACK_ADDRESS = ipaddress.IPv4Address("127.0.0.1").packed
ZERO_ADDRESS = bytes(4)
# Offsets of fields in the BOOTP header (RFC 2131 figure 1).
XID_OFFSET = 4
CIADDR_OFFSET = 12
GIADDR_OFFSET = 24
CHADDR_OFFSET = 28
OPTIONS_OFFSET = pxeserver.BOOTP_HEADER.size + len(pxeserver.MAGIC_COOKIE)
# Largest UDP payload over IPv4: 65535 minus the IP and UDP headers.
MAX_UDP_PAYLOAD = 65507


# ---------------------------------------------------------------------------
# Packet generators
# ---------------------------------------------------------------------------


def random_bytes(rng, size):
    if size <= 0:
        return b""
    return rng.getrandbits(8 * size).to_bytes(size, "little")


def random_mac(rng):
    # Locally administered, unicast.
    return bytes((rng.randrange(256) & 0xFC | 0x02,)) + random_bytes(rng, 5)


def build_dhcp_base(rng):
    """Return a valid DHCP request of a random message type, or a capture.

    Message types that pxeserver does not know (0, 9, 18 and 255) are
    included, so that the parser's rejection of them is exercised too.
    """
    choice = rng.randrange(10)
    if choice == 0:
        return rng.choice((SEABIOS_IPXE_DISCOVER, SEABIOS_IPXE_REQUEST,
                           OVMF_DISCOVER))
    if choice == 1:
        message_type = rng.choice((0, 9, 18, 255))
    else:
        message_type = rng.choice(list(MessageType))
    options = {}
    if rng.random() < 0.6:
        arch = rng.choice((0, 6, 7, 9, 10, 11, 16, 22, 0xFFFF))
        options[pxeserver.OPT_CLIENT_ARCH] = arch.to_bytes(2, "big")
        options[pxeserver.OPT_VENDOR_CLASS_IDENTIFIER] = (
            f"PXEClient:Arch:{arch:05d}:UNDI:002001".encode())
    if rng.random() < 0.3:
        options[pxeserver.OPT_USER_CLASS] = rng.choice(
            (b"iPXE", b"\x04iPXE", b"\x05iPXE", b"\xffiPXE"))
    if rng.random() < 0.3:
        options[pxeserver.OPT_REQUESTED_IP] = bytes(
            (127, 0, 0, rng.randrange(256)))
    if rng.random() < 0.3:
        options[pxeserver.OPT_SERVER_ID] = LOOPBACK_ADDRESS
    if rng.random() < 0.2:
        options[pxeserver.OPT_MAX_MESSAGE_SIZE] = rng.randrange(
            1 << 16).to_bytes(2, "big")
    if rng.random() < 0.2:
        options[pxeserver.OPT_PARAMETER_REQUEST_LIST] = random_bytes(
            rng, rng.randrange(1, 40))
    if rng.random() < 0.2:
        options[pxeserver.OPT_CLIENT_UUID] = b"\0" + random_bytes(rng, 16)
    packet = dhcp_harness.build_request(
        MessageType.DHCPDISCOVER, mac=random_mac(rng),
        xid=rng.getrandbits(32), options=options)
    # Option 53 is the first option: code, length 1, value.
    return (packet[:OPTIONS_OFFSET + 2] + bytes((message_type,))
            + packet[OPTIONS_OFFSET + 3:])


def renew_dhcp_client(rng, data):
    """Give a DHCP packet a new xid and a new chaddr."""
    return (data[:XID_OFFSET] + random_bytes(rng, 4)
            + data[XID_OFFSET + 4:CHADDR_OFFSET] + random_mac(rng)
            + data[CHADDR_OFFSET + 6:])


def build_tftp_base(rng):
    """Return a valid TFTP packet of a random opcode, or an unknown one."""
    opcode = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 255, 0xFFFF))
    if opcode in (Opcode.RRQ, Opcode.WRQ):
        options = {}
        for name in rng.sample(("blksize", "tsize", "timeout",
                                "windowsize", "multicast", "x-unknown"),
                               rng.randrange(7)):
            options[name] = str(rng.choice((0, 1, 8, 512, 1468, 65464,
                                            65535, 1 << 32, -1)))
        name = rng.choice(("boot.bin", "missing.bin", "up.bin",
                           "../etc/passwd", "dir/boot.bin", "a" * 200))
        mode = rng.choice(("octet", "netascii", "mail", "OCTET"))
        return pxeserver.build_tftp_request(opcode, name, mode, options)
    if opcode == Opcode.DATA:
        return pxeserver.build_data(rng.randrange(1 << 16),
                                    random_bytes(rng, rng.randrange(600)))
    if opcode == Opcode.ACK:
        return pxeserver.build_ack(rng.randrange(1 << 16))
    if opcode == Opcode.ERROR:
        return pxeserver.build_error(rng.randrange(9), "stop")
    if opcode == Opcode.OACK:
        return pxeserver.build_oack({"blksize": 1468, "tsize": 9000})
    return struct.pack("!H", opcode) + random_bytes(rng, rng.randrange(40))


def flip_bits(rng, data):
    data = bytearray(data)
    for _ in range(rng.randrange(1, 9)):
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def set_bytes(rng, data):
    data = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        if data:
            data[rng.randrange(len(data))] = rng.choice(
                (0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
    return bytes(data)


def truncate(rng, data):
    return data[:rng.randrange(len(data) + 1)]


def append_garbage(rng, data):
    return data + random_bytes(rng, rng.randrange(1, 64))


def length_past_end(rng, data):
    """Append an option or field whose length byte exceeds what follows."""
    code = rng.randrange(1, 255)
    length = rng.randrange(2, 256)
    return data + bytes((code, length)) + random_bytes(rng, length // 2)


def repeat_tail(rng, data):
    """Repeat a slice of the packet: repeated options or fields."""
    if len(data) < 2:
        return data + data
    start = rng.randrange(len(data) - 1)
    end = rng.randrange(start + 1, min(len(data), start + 40) + 1)
    return data + data[start:end] * rng.randrange(2, 20)


def long_option_list(rng, data):
    """Append hundreds of options, up to tens of kilobytes."""
    count = rng.choice((50, 300, 1000))
    codes = random_bytes(rng, count)
    filler = random_bytes(rng, 8)
    options = b"".join(bytes((code | 1, code & 7)) + filler[:code & 7]
                       for code in codes)
    return (data + options * rng.choice((1, 1, 1, 20)))[:MAX_UDP_PAYLOAD]


TFTP_OPTION_FIELDS = tuple(
    f"{name}\0{value}\0".encode()
    for name in ("blksize", "tsize", "timeout", "windowsize", "x")
    for value in (0, 8, 1468, 65535, 1 << 20))


def long_tftp_options(rng, data):
    """Append many NUL-terminated name and value pairs."""
    count = rng.choice((10, 100, 500))
    picks = random_bytes(rng, count)
    return data + b"".join(TFTP_OPTION_FIELDS[pick % len(TFTP_OPTION_FIELDS)]
                           for pick in picks)


GENERIC_MUTATIONS = (flip_bits, set_bytes, truncate, append_garbage,
                     length_past_end, repeat_tail)
DHCP_MUTATIONS = GENERIC_MUTATIONS + (long_option_list,)
TFTP_MUTATIONS = GENERIC_MUTATIONS + (long_tftp_options,)


def fuzz_packets(build_base, mutations, seed, count, renew=None):
    """Return ``count`` packets: valid ones, mutants and random bytes.

    Each packet starts from one of BASE_PACKET_COUNT valid packets made by
    ``build_base(rng)``, passed through ``renew(rng, data)`` when given.
    The same seed and count give the same packets on every run.
    """
    rng = random.Random(seed)
    bases = [build_base(rng) for _ in range(BASE_PACKET_COUNT)]
    packets = []
    for _ in range(count):
        kind = rng.randrange(20)
        if kind == 0:
            packets.append(random_bytes(rng, rng.randrange(600)))
            continue
        data = rng.choice(bases)
        if renew is not None:
            data = renew(rng, data)
        if kind > 2:
            for _ in range(rng.randrange(1, 4)):
                data = rng.choice(mutations)(rng, data)
        packets.append(data[:MAX_UDP_PAYLOAD])
    return packets


@functools.lru_cache(maxsize=None)
def dhcp_fuzz_packets(count):
    return fuzz_packets(build_dhcp_base, DHCP_MUTATIONS,
                        f"{FUZZ_SEED}-dhcp", count, renew_dhcp_client)


@functools.lru_cache(maxsize=None)
def tftp_fuzz_packets(count):
    return fuzz_packets(build_tftp_base, TFTP_MUTATIONS,
                        f"{FUZZ_SEED}-tftp", count)


def keep_replies_on_loopback(data):
    """Set ciaddr and giaddr to 0.0.0.0 or 127.0.0.1, the only reply
    destinations besides the broadcast stand-in that the test allows."""
    data = bytearray(data)
    for offset in (CIADDR_OFFSET, GIADDR_OFFSET):
        if len(data) >= offset + 4 and bytes(data[offset:offset + 4]) \
                not in (ZERO_ADDRESS, LOOPBACK_ADDRESS):
            data[offset:offset + 4] = (ZERO_ADDRESS if data[offset] & 1
                                       else LOOPBACK_ADDRESS)
    return bytes(data)


def replay_hint(index, data, error):
    return (f"packet {index} of PXESERVER_FUZZ_SEED={FUZZ_SEED} "
            f"PXESERVER_FUZZ_COUNT={FUZZ_COUNT}: {error!r}; "
            f"packet hex {data[:200].hex()}")


class LogCollector(logging.Handler):
    """Keeps every record that reaches it; attach with ``collect_logs``."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []
        self._records_lock = threading.Lock()

    def emit(self, record):
        with self._records_lock:
            self.records.append(record)

    def at_least(self, level):
        with self._records_lock:
            return [record for record in self.records
                    if record.levelno >= level]

    def lines(self, level):
        return [f"{record.levelname} {record.name} {record.getMessage()}"
                for record in self.at_least(level)]


def collect_logs(testcase, level=logging.WARNING):
    """Collect pxeserver log records at ``level`` and above for the test.

    Unlike assertLogs, this works when nothing is logged, and it leaves
    the logger's other handlers in place.
    """
    logger = logging.getLogger("pxeserver")
    collector = LogCollector()
    testcase.addCleanup(setattr, logger, "level", logger.level)
    testcase.addCleanup(logger.removeHandler, collector)
    logger.addHandler(collector)
    logger.setLevel(level)
    return collector


_NULL_HANDLER = logging.NullHandler()


def setUpModule():
    # Keeps warnings off stderr, where the last-resort handler would put
    # them when no other handler is attached.
    logging.getLogger("pxeserver").addHandler(_NULL_HANDLER)


def tearDownModule():
    logging.getLogger("pxeserver").removeHandler(_NULL_HANDLER)


# ---------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------


class TestParserFuzzing(unittest.TestCase):
    """Every parser returns or raises PacketError, for any input."""

    def check_parser(self, parse, packets):
        """Feed every packet to ``parse``; return the parsed results."""
        parsed = []
        for index, data in enumerate(packets):
            try:
                parsed.append(parse(data))
            except pxeserver.PacketError:
                continue
            except Exception as exc:  # the defect this test looks for
                self.fail(f"{parse.__name__} raised "
                          f"{replay_hint(index, data, exc)}")
        return parsed

    def test_fuzzed_dhcp_packets_parse_or_raise(self):
        parsed = self.check_parser(pxeserver.parse_dhcp_packet,
                                   dhcp_fuzz_packets(FUZZ_COUNT // 2))
        self.assertGreater(len(parsed), 0, "no fuzzed packet was valid")

    def test_describe_client_accepts_fuzzed_packets(self):
        packets = dhcp_fuzz_packets(FUZZ_COUNT // 2)
        for index, data in enumerate(packets):
            try:
                packet = pxeserver.parse_dhcp_packet(data)
            except pxeserver.PacketError:
                continue
            try:
                pxeserver.describe_client(packet)
            except Exception as exc:  # the defect this test looks for
                self.fail(f"describe_client raised "
                          f"{replay_hint(index, data, exc)}")

    def test_fuzzed_tftp_requests_parse_or_raise(self):
        parsed = self.check_parser(pxeserver.parse_tftp_request,
                                   tftp_fuzz_packets(FUZZ_COUNT // 2))
        self.assertGreater(len(parsed), 0, "no fuzzed request was valid")

    def test_fuzzed_tftp_replies_parse_or_raise(self):
        parsed = self.check_parser(pxeserver.parse_tftp_reply,
                                   tftp_fuzz_packets(FUZZ_COUNT // 2))
        self.assertGreater(len(parsed), 0, "no fuzzed reply was valid")

    def test_fuzzed_oacks_parse_or_raise(self):
        parsed = self.check_parser(pxeserver.parse_oack,
                                   tftp_fuzz_packets(FUZZ_COUNT // 2))
        self.assertGreater(len(parsed), 0, "no fuzzed OACK was valid")


# ---------------------------------------------------------------------------
# Fuzzing running servers
# ---------------------------------------------------------------------------


MARKER_XID_BYTES = struct.pack("!I", dhcp_harness.MARKER_XID)


class HandledCounter:
    """Wraps a DHCP server's handle_packet to count the packets handled,
    except the markers of settle_dhcp_server()."""

    def __init__(self, server):
        self.count = 0
        self._lock = threading.Lock()
        self._handle_packet = server.handle_packet
        server.handle_packet = self

    def __call__(self, data, sock, source):
        if data[XID_OFFSET:XID_OFFSET + 4] != MARKER_XID_BYTES:
            with self._lock:
                self.count += 1
        self._handle_packet(data, sock, source)


# How long a settle waits for the reply to its marker before sending it
# again: a burst can fill the server's receive buffer, and the kernel then
# drops the marker too.
MARKER_RETRY_SECONDS = 0.1


def settle_dhcp_server(testcase):
    """Wait until a DHCP test server has handled every packet sent so far.

    Works like the harness's settle(), but sends the marker again when its
    reply does not come.
    """
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        marker = dhcp_harness.build_request(
            getattr(testcase, "marker_type", MessageType.DHCPINFORM),
            mac=dhcp_harness.MARKER_MAC,
            xid=dhcp_harness.MARKER_XID, ciaddr=str(dhcp_harness.SERVER_IP),
            options=proxy_harness.pxe_options())
        testcase.send(marker)
        if wait_for_dhcp_reply(testcase.client, dhcp_harness.MARKER_XID):
            testcase.wait_for_threads(testcase.server_threads)
            return
    testcase.fail(f"no reply to the marker within {WAIT_SECONDS} s")


def wait_for_dhcp_reply(sock, xid, timeout=MARKER_RETRY_SECONDS):
    """Read replies from ``sock``; return whether one with ``xid`` came."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if not select.select([sock], [], [], remaining)[0]:
            return False
        data = sock.recv(65536)
        if pxeserver.parse_dhcp_packet(data).xid == xid:
            return True


class DHCPFuzzingMixin:
    """Sends fuzzed packets to the running server of a DHCP test case.

    Replies to a relay agent go to the test's client socket, like every
    other reply, so that settle() reads them.
    """

    def send_fuzzed(self, packets):
        """Send packets in batches, settling after each; return the count
        of packets the server handled, marker packets excluded."""
        self.server.relay_port = self.client_port
        counter = HandledCounter(self.server)
        for start in range(0, len(packets), SERVER_FUZZ_BATCH):
            for data in packets[start:start + SERVER_FUZZ_BATCH]:
                self.send(keep_replies_on_loopback(data))
            settle_dhcp_server(self)
        return counter.count

    def check_after_fuzzing(self, logs, handled):
        hint = f"PXESERVER_FUZZ_SEED={FUZZ_SEED}"
        self.assertEqual(logs.lines(logging.ERROR), [],
                         f"errors logged while fuzzing with {hint}")
        self.assertGreaterEqual(handled, SERVER_FUZZ_COUNT // 2,
                                f"most fuzzed packets were lost ({hint})")
        self.wait_for_threads(self.server_threads)
        self.assertEqual(threading.active_count(), self.server_threads,
                         f"handler threads left running ({hint})")
        self.assertEqual(self.server.blocked_sends, [],
                         f"a reply went off loopback ({hint})")


class TestDHCPServerFuzzing(DHCPFuzzingMixin,
                            dhcp_harness.DHCPServerTestCase):

    def test_fuzzed_packets_leave_server_working(self):
        self.start_server()
        leased = self.lease(dhcp_harness.MAC_A)
        logs = collect_logs(self)
        handled = self.send_fuzzed(dhcp_fuzz_packets(SERVER_FUZZ_COUNT))
        self.check_after_fuzzing(logs, handled)
        offer = self.exchange(dhcp_harness.build_request(
            MessageType.DHCPDISCOVER, mac=dhcp_harness.MAC_A, xid=0x4655),
            0x4655)
        self.assertEqual(offer.message_type, MessageType.DHCPOFFER)
        self.assertEqual(offer.yiaddr, leased)


class TestProxyDHCPFuzzing(DHCPFuzzingMixin,
                           proxy_harness.ProxyServerTestCase):

    def test_fuzzed_packets_leave_proxy_working(self):
        self.start_server()
        logs = collect_logs(self)
        handled = self.send_fuzzed(dhcp_fuzz_packets(SERVER_FUZZ_COUNT))
        self.check_after_fuzzing(logs, handled)
        offer = self.exchange(OVMF_DISCOVER, proxy_harness.OVMF_XID)
        self.assertEqual(offer.message_type, MessageType.DHCPOFFER)


class TestBootServerFuzzing(DHCPFuzzingMixin,
                            proxy_harness.ProxyServerTestCase):

    server_class = proxy_harness.LoopbackBootServer
    marker_type = MessageType.DHCPINFORM

    def test_fuzzed_packets_leave_boot_server_working(self):
        self.start_server()
        logs = collect_logs(self)
        handled = self.send_fuzzed(dhcp_fuzz_packets(SERVER_FUZZ_COUNT))
        self.check_after_fuzzing(logs, handled)
        request = dhcp_harness.build_request(
            MessageType.DHCPREQUEST, xid=0x4656,
            options=proxy_harness.pxe_options())
        ack = self.exchange(request, 0x4656)
        self.assertEqual(ack.message_type, MessageType.DHCPACK)


# A request that the TFTP listener rejects with ERROR 4 at once: it has a
# file name but no mode.  Its reply shows that every packet sent before
# it has been dispatched.
TFTP_MARKER = struct.pack("!H", Opcode.RRQ) + b"marker\0"
TFTP_FUZZ_SOCKETS = 16
TFTP_FUZZ_TRANSFERS = 100
TFTP_PACKETS_PER_TRANSFER = 5
SERVED_NAME = "boot.bin"
SERVED_SIZE = 3000


class TestTFTPServerFuzzing(tftp_harness.TFTPServerTestCase):
    """Fuzzed packets to the listener, then into running transfers."""

    def server_flags(self):
        return ["--upload-dir", self.upload_dir]

    def setUp(self):
        super().setUp()
        self.content = self.make_file(SERVED_NAME, tftp_harness.random_bytes(
            SERVED_SIZE))
        self.make_file(f"dir/{SERVED_NAME}", b"nested")
        self.marker = self.client()

    def settle(self):
        """Wait until the listener has dispatched every packet sent."""
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            self.marker.send_to_server(TFTP_MARKER)
            reply = self.marker._receive_one(MARKER_RETRY_SECONDS)
            if reply is not None:
                self.assertEqual(reply.opcode, tftp_harness.ERROR)
                return
        self.fail(f"no reply to the marker within {WAIT_SECONDS} s")

    def fuzz_listener(self, packets):
        senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                   for _ in range(TFTP_FUZZ_SOCKETS)]
        for sender in senders:
            self.addCleanup(sender.close)
            sender.bind((tftp_harness.LOCALHOST, 0))
        for index, data in enumerate(packets):
            senders[index % len(senders)].sendto(data, self.server.address)
            if index % SERVER_FUZZ_BATCH == SERVER_FUZZ_BATCH - 1:
                self.settle()
        self.settle()

    def fuzz_transfers(self, packets):
        """Start transfers and send fuzzed packets to their ports."""
        packets = iter(packets)
        for number in range(TFTP_FUZZ_TRANSFERS):
            client = self.client()
            options = {"blksize": "512"} if number % 2 else None
            client.send_request(tftp_harness.RRQ, SERVED_NAME,
                                options=options)
            client.receive()
            for _ in range(TFTP_PACKETS_PER_TRANSFER):
                client.send(next(packets))

    def test_fuzzed_packets_leave_tftp_working(self):
        logs = collect_logs(self)
        packets = tftp_fuzz_packets(SERVER_FUZZ_COUNT)
        self.fuzz_listener(packets)
        self.fuzz_transfers(reversed(packets))
        self.wait_for_transfers_to_end()
        hint = f"PXESERVER_FUZZ_SEED={FUZZ_SEED}"
        self.assertEqual(logs.lines(logging.ERROR), [],
                         f"errors logged while fuzzing with {hint}")
        download = self.client().read(SERVED_NAME)
        self.assertEqual(download.content, self.content)


# ---------------------------------------------------------------------------
# Floods
# ---------------------------------------------------------------------------


FLOOD_MAX_TRANSFERS = 50
FLOOD_RRQS = 1000
FLOOD_FILE_SIZE = 100000
# Rounds in which a client without a reply sends its RRQ again, as TFTP
# clients do, because a burst can overflow the listener's receive buffer.
FLOOD_RRQ_ROUNDS = 5
FLOOD_REPLY_SECONDS = 1.0
FLOOD_DISCOVERS = 10000
FLOOD_DISCOVER_BATCH = 100
FLOOD_BAD_ARCH_DISCOVERS = 500
SAMPLE_SECONDS = 0.001
BUSY_WARNING = "transfers running (max_transfers)"
POOL_WARNING = "no free address in the pool"


class ActiveTransferSampler(threading.Thread):
    """Samples len(server.active_transfers()) until stopped; keeps the
    maximum."""

    def __init__(self, server):
        super().__init__(name="transfer-sampler", daemon=True)
        self.server = server
        self.maximum = 0
        self.samples = 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            self.maximum = max(self.maximum,
                               len(self.server.active_transfers()))
            self.samples += 1
            time.sleep(SAMPLE_SECONDS)

    def stop(self):
        self.stopped.set()
        self.join(WAIT_SECONDS)


def raise_open_file_limit(needed):
    """Raise the soft limit on open files to ``needed`` if the hard limit
    allows it; return whether the limit is now high enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return True
    if hard != resource.RLIM_INFINITY and hard < needed:
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return True


class TestTFTPFlood(tftp_harness.TFTPServerTestCase):

    def server_flags(self):
        return ["--max-transfers", str(FLOOD_MAX_TRANSFERS)]

    def open_clients(self, count):
        needed = count + 1024
        if not raise_open_file_limit(needed):
            self.fail(f"{count} client sockets need an open file limit of "
                      f"{needed}; raise the hard limit (ulimit -Hn)")
        clients = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(sock.close)
            sock.bind((tftp_harness.LOCALHOST, 0))
            sock.setblocking(False)
            clients.append(sock)
        return clients

    def flood(self, clients, request):
        """Send ``request`` from every client; return the first reply of
        each as {socket: (data, source)}."""
        replies = {}
        for _ in range(FLOOD_RRQ_ROUNDS):
            waiting = [sock for sock in clients if sock not in replies]
            if not waiting:
                break
            for sock in waiting:
                sock.sendto(request, self.server.address)
            deadline = time.monotonic() + FLOOD_REPLY_SECONDS
            while waiting and time.monotonic() < deadline:
                readable, _, _ = select.select(waiting, [], [],
                                               POLL_SECONDS)
                for sock in readable:
                    replies[sock] = sock.recvfrom(65536)
                waiting = [sock for sock in waiting if sock not in replies]
        return replies

    def test_rrq_flood_bounded_by_max_transfers(self):
        content = self.make_file("big.bin", tftp_harness.random_bytes(
            FLOOD_FILE_SIZE))
        clients = self.open_clients(FLOOD_RRQS)
        logs = collect_logs(self)
        sampler = ActiveTransferSampler(self.server)
        sampler.start()
        self.addCleanup(sampler.stop)
        replies = self.flood(clients, tftp_harness.request_packet(
            tftp_harness.RRQ, "big.bin"))
        sampler.stop()

        accepted = [sock for sock, (data, source) in replies.items()
                    if source != self.server.address]
        rejected = [data for data, source in replies.values()
                    if source == self.server.address]
        for sock in accepted:
            sock.sendto(tftp_harness.error_packet(0, "flood over"),
                        replies[sock][1])
        self.wait_for_transfers_to_end()
        busy_warnings = [line for line in logs.lines(logging.WARNING)
                         if BUSY_WARNING in line]
        print(f"\nRRQ flood: {len(accepted)} transfers, {len(rejected)} "
              f"ERRORs, {FLOOD_RRQS - len(replies)} unanswered, "
              f"at most {sampler.maximum} at once in {sampler.samples} "
              f"samples, {len(busy_warnings)} busy warnings, "
              f"{len(logs.lines(logging.WARNING))} warnings in all",
              file=sys.stderr)
        self.assertEqual(len(replies), FLOOD_RRQS, "clients left unanswered")
        self.assertLessEqual(sampler.maximum, FLOOD_MAX_TRANSFERS)
        self.assertGreaterEqual(len(rejected),
                                FLOOD_RRQS - FLOOD_MAX_TRANSFERS
                                * FLOOD_RRQ_ROUNDS)
        opcodes = {struct.unpack_from("!H", data)[0] for data in rejected}
        self.assertEqual(opcodes, {tftp_harness.ERROR})
        self.assertLessEqual(len(busy_warnings),
                             pxeserver.WARNINGS_PER_SOURCE_PER_MINUTE)
        self.assertEqual(logs.lines(logging.ERROR), [])
        download = self.client().read("big.bin")
        self.assertEqual(download.content, content)


class TestDHCPFlood(dhcp_harness.DHCPServerTestCase):
    """DISCOVERs from many random MACs against a pool of 10 addresses."""

    def flood(self, packets):
        counter = HandledCounter(self.server)
        for start in range(0, len(packets), FLOOD_DISCOVER_BATCH):
            for data in packets[start:start + FLOOD_DISCOVER_BATCH]:
                self.send(data)
            settle_dhcp_server(self)
        return counter.count

    def discovers(self, count, options=None):
        rng = random.Random(f"{FUZZ_SEED}-flood")
        base = dhcp_harness.build_request(MessageType.DHCPDISCOVER,
                                          options=options)
        return [renew_dhcp_client(rng, base) for _ in range(count)]

    def test_discover_flood_keeps_offers_bounded(self):
        self.start_server()
        pool_size = self.server.leases.pool_size()
        logs = collect_logs(self)
        handled = self.flood(self.discovers(FLOOD_DISCOVERS))
        pool_warnings = [line for line in logs.lines(logging.WARNING)
                         if POOL_WARNING in line]
        print(f"\nDISCOVER flood: {handled} of {FLOOD_DISCOVERS} handled, "
              f"{len(self.server.leases._offers)} offers held, "
              f"{len(pool_warnings)} pool warnings", file=sys.stderr)
        self.assertGreaterEqual(handled, FLOOD_DISCOVERS // 2)
        self.assertLessEqual(len(self.server.leases._offers), pool_size)
        self.assertLessEqual(len(pool_warnings),
                             pxeserver.WARNINGS_PER_SOURCE_PER_MINUTE)
        self.assertEqual(logs.lines(logging.ERROR), [])
        self.wait_for_threads(self.server_threads)
        ack = self.exchange(dhcp_harness.build_request(
            MessageType.DHCPINFORM, xid=0x464C,
            ciaddr=str(dhcp_harness.SERVER_IP)), 0x464C)
        self.assertEqual(ack.message_type, MessageType.DHCPACK)

    def test_bad_arch_flood_warnings_rate_limited(self):
        self.start_server(pool=(dhcp_harness.POOL_START,
                                dhcp_harness.POOL_START))
        logs = collect_logs(self)
        packets = self.discovers(FLOOD_BAD_ARCH_DISCOVERS, options={
            pxeserver.OPT_CLIENT_ARCH: b"\x00\x07\x00"})
        self.flood(packets)
        warnings = [line for line in logs.lines(logging.WARNING)
                    if "option 93 has length 3" in line]
        self.assertLessEqual(len(warnings),
                             pxeserver.WARNINGS_PER_SOURCE_PER_MINUTE)


# ---------------------------------------------------------------------------
# Amplification
# ---------------------------------------------------------------------------


# Above TFTP_UNPROVEN_RETRIES, so the tests below show that the cap before
# the first ACK, not this setting, bounds a spoofed request.
AMPLIFICATION_RETRIES = 4
AMPLIFICATION_TIMEOUT_SECONDS = 1
AMPLIFICATION_FILE_SIZE = 1 << 20
AMPLIFICATION_OPTIONS = {"blksize": "1468", "windowsize": "16"}


class TestTFTPAmplification(tftp_harness.TFTPServerTestCase):
    """What a TFTP server sends for one RRQ that is never acknowledged.

    A client that never ACKs is what a spoofed RRQ looks like to the
    server: the real owner of the source address ignores the DATA.  Until
    the first ACK, a packet is sent at most TFTP_UNPROVEN_RETRIES + 1
    times; after it, at most tftp_retries + 1 times.
    """

    def server_flags(self):
        return ["--tftp-retries", str(AMPLIFICATION_RETRIES),
                "--tftp-timeout", str(AMPLIFICATION_TIMEOUT_SECONDS)]

    def setUp(self):
        super().setUp()
        self.make_file("big.bin", tftp_harness.random_bytes(
            AMPLIFICATION_FILE_SIZE))

    def spoofed_client(self):
        client = self.client()
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        return client

    def bytes_sent_to(self, clients):
        """Wait for every transfer to end; return the bytes and packets
        that reached each client, in order."""
        self.wait_for_transfers_to_end()
        totals = []
        for client in clients:
            packets = []
            while True:
                try:
                    client.sock.setblocking(False)
                    packets.append(client.sock.recv(65536))
                except BlockingIOError:
                    break
            totals.append((sum(len(packet) for packet in packets),
                           len(packets)))
        return totals

    def report(self, case, request, sent, packets):
        print(f"\namplification, {case}: RRQ {len(request)} bytes, "
              f"server sent {sent} bytes in {packets} packets, ratio "
              f"{sent / len(request):.0f}", file=sys.stderr)

    def test_unacknowledged_transfers_send_bounded_bytes(self):
        tries = AMPLIFICATION_RETRIES + 1
        blksize = int(AMPLIFICATION_OPTIONS["blksize"])
        windowsize = int(AMPLIFICATION_OPTIONS["windowsize"])
        plain = tftp_harness.request_packet(tftp_harness.RRQ, "big.bin")
        with_options = tftp_harness.request_packet(
            tftp_harness.RRQ, "big.bin", options=AMPLIFICATION_OPTIONS)
        silent, oack_only, window = (self.spoofed_client()
                                     for _ in range(3))
        silent.send_to_server(plain)
        oack_only.send_to_server(with_options)
        # This client ACKs the OACK, so the server sends whole windows.
        window.send_to_server(with_options)
        oack = window.receive()
        self.assertEqual(oack.opcode, tftp_harness.OACK)
        self.assertEqual(oack.body["windowsize"], str(windowsize))
        window.send(tftp_harness.ack_packet(0))
        oack_bytes = len(pxeserver.build_oack(oack.body))

        (silent_sent, silent_packets), (oack_sent, oack_packets), (
            window_sent, window_packets) = self.bytes_sent_to(
                [silent, oack_only, window])
        self.report("no options", plain, silent_sent, silent_packets)
        self.report("options, OACK never ACKed", with_options, oack_sent,
                    oack_packets)
        self.report("OACK ACKed, then silent", with_options,
                    window_sent + oack_bytes, window_packets + 1)
        data_header = tftp_harness.HEADER.size
        unproven_tries = pxeserver.TFTP_UNPROVEN_RETRIES + 1
        self.assertLessEqual(silent_sent,
                             unproven_tries * (tftp_harness.DEFAULT_BLKSIZE
                                               + data_header))
        self.assertLessEqual(silent_packets, unproven_tries)
        self.assertLessEqual(oack_packets, unproven_tries)
        self.assertLessEqual(window_sent + oack_bytes,
                             tries * windowsize * (blksize + data_header)
                             + oack_bytes)


# ---------------------------------------------------------------------------
# Crash consistency
# ---------------------------------------------------------------------------


class TestInterruptedUpload(tftp_harness.TFTPServerTestCase):
    """An upload whose client stops sending never gets its final name."""

    def server_flags(self):
        return ["--upload-dir", self.upload_dir]

    def test_stalled_upload_never_gets_final_name(self):
        client = self.client()
        client.send_request(tftp_harness.WRQ, "up.bin")
        self.assertEqual(client.receive().opcode, tftp_harness.ACK)
        client.send(tftp_harness.data_packet(1, tftp_harness.random_bytes(
            tftp_harness.DEFAULT_BLKSIZE)))
        self.assertEqual(client.receive().number, 1)
        during = os.listdir(self.upload_dir)
        self.wait_for_transfers_to_end()
        self.assertNotIn("up.bin", during)
        self.assertEqual([name for name in during
                          if not name.endswith(".part")], [])
        self.assertEqual(os.listdir(self.upload_dir), [])


class TestKilledUpload(unittest.TestCase):
    """pxeserver.py killed with SIGKILL in the middle of an upload."""

    def setUp(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.root = os.path.join(folder.name, "root")
        self.upload_dir = os.path.join(folder.name, "upload")
        os.mkdir(self.root)
        os.mkdir(self.upload_dir)

    def test_killed_upload_never_gets_final_name(self):
        server = support.PXEServerProcess([
            "--mode", "off", "--root", self.root,
            "--upload-dir", self.upload_dir, "--tftp-address", "127.0.0.1",
            "--tftp-port", "0"])
        self.addCleanup(server.stop)
        server.start()
        client = tftp_harness.RawClient(
            self, (server.tftp_address, server.tftp_port))
        client.send_request(tftp_harness.WRQ, "up.bin")
        self.assertEqual(client.receive().opcode, tftp_harness.ACK)
        client.send(tftp_harness.data_packet(1, tftp_harness.random_bytes(
            tftp_harness.DEFAULT_BLKSIZE)))
        self.assertEqual(client.receive().number, 1)
        server.process.send_signal(signal.SIGKILL)
        server.wait_for_exit()
        left = os.listdir(self.upload_dir)
        self.assertNotIn("up.bin", left)
        self.assertEqual([name for name in left
                          if not name.endswith(".part")], [])


CRASH_ROUNDS = 5
CRASH_CLIENTS_PER_ROUND = 3
# The server is killed this long after its clients start: the delays of
# the rounds are spread from 0 to this bound, so that some kills land
# before and some during the clients' exchanges.  In the last round the
# server is killed only after its clients have exited.
CRASH_MAX_DELAY_SECONDS = 0.15
CRASH_POOL_START = "192.0.2.100"
CRASH_POOL_END = "192.0.2.150"
# udhcpc sends this many DISCOVERs, this many seconds apart, then exits.
UDHCPC_DISCOVERS = 3
UDHCPC_DISCOVER_SECONDS = 1
# The hook script records each bound lease as "INTERFACE ADDRESS" in a file
# named after the interface.  It configures nothing, because the test only
# needs to know which addresses were ACKed.
UDHCPC_SCRIPT = """\
#!/bin/sh
if [ "$1" = bound ]; then
    echo "$interface $ip" >> "{folder}/$interface"
fi
exit 0
"""


class TestLeaseFileCrashes(unittest.TestCase):
    """pxeserver.py killed with SIGKILL while udhcpc clients take leases."""

    def setUp(self):
        support.require_root(self)
        support.require_tool(self, "ip", "bridge", "busybox")
        netns.require_lab(self)
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        self.root = os.path.join(folder.name, "root")
        self.bound_dir = os.path.join(folder.name, "bound")
        os.mkdir(self.root)
        os.mkdir(self.bound_dir)
        self.lease_file = os.path.join(folder.name, "leases.json")
        self.script = os.path.join(folder.name, "udhcpc.sh")
        with open(self.script, "w", encoding="utf-8") as stream:
            stream.write(UDHCPC_SCRIPT.format(folder=self.bound_dir))
        os.chmod(self.script, 0o700)
        self.lab = netns.Lab()
        self.addCleanup(self.lab.close)
        self.ifaces = [self.lab.add_veth() for _ in range(
            CRASH_ROUNDS * CRASH_CLIENTS_PER_ROUND)]
        self.wait_for_bridge_forwarding()

    def wait_for_bridge_forwarding(self):
        """Wait until the new bridge ports forward, so that no DISCOVER
        is lost to a port that is still coming up."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            result = self.lab.run(self.lab.client_ns,
                                  ["bridge", "-json", "link", "show"],
                                  universal_newlines=True)
            states = {port["ifname"]: port.get("state")
                      for port in json.loads(result.stdout or "[]")}
            if states and set(states.values()) == {"forwarding"}:
                return
            if time.monotonic() > deadline:
                self.fail(f"bridge ports not forwarding after "
                          f"{WAIT_SECONDS} s: {states}")
            time.sleep(POLL_SECONDS)

    def start_server(self):
        server = support.PXEServerProcess(
            ["--iface", self.lab.server_iface, "--mode", "full",
             "--root", self.root, "--lease-file", self.lease_file,
             "--pool-start", CRASH_POOL_START, "--pool-end", CRASH_POOL_END],
            prefix=self.lab.exec_prefix(self.lab.server_ns))
        self.addCleanup(server.stop)
        server.start()
        return server

    def start_clients(self, ifaces):
        return [self.lab.popen(
            self.lab.client_ns,
            ["busybox", "udhcpc", "-f", "-q", "-n", "-i", iface,
             "-s", self.script, "-t", str(UDHCPC_DISCOVERS),
             "-T", str(UDHCPC_DISCOVER_SECONDS)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL) for iface in ifaces]

    def stop_clients(self, clients):
        for client in clients:
            if client.poll() is None:
                os.killpg(client.pid, signal.SIGKILL)
            client.wait(WAIT_SECONDS)

    def bound_addresses(self):
        """Return every address a client recorded as bound."""
        addresses = set()
        for name in os.listdir(self.bound_dir):
            path = os.path.join(self.bound_dir, name)
            with open(path, encoding="utf-8") as stream:
                for line in stream:
                    fields = line.split()
                    if len(fields) == 2:
                        addresses.add(fields[1])
        return addresses

    def leased_addresses(self):
        """Parse the lease file, failing the test if it is not JSON."""
        if not os.path.exists(self.lease_file):
            return set()
        with open(self.lease_file, encoding="utf-8") as stream:
            text = stream.read()
        try:
            document = json.loads(text)
        except ValueError as exc:
            self.fail(f"lease file is not JSON after SIGKILL: {exc}; "
                      f"content {text[:500]!r}")
        return {lease["address"] for lease in document["leases"]}

    def test_acked_leases_survive_sigkill(self):
        for number in range(CRASH_ROUNDS):
            server = self.start_server()
            first = number * CRASH_CLIENTS_PER_ROUND
            clients = self.start_clients(
                self.ifaces[first:first + CRASH_CLIENTS_PER_ROUND])
            if number < CRASH_ROUNDS - 1:
                time.sleep(CRASH_MAX_DELAY_SECONDS * number
                           / (CRASH_ROUNDS - 2))
            else:
                for client in clients:
                    client.wait(WAIT_SECONDS)
            server.process.kill()
            server.wait_for_exit()
            self.stop_clients(clients)
            bound = self.bound_addresses()
            leased = self.leased_addresses()
            self.assertEqual(bound - leased, set(),
                             f"ACKed addresses missing from the lease file "
                             f"after kill {number + 1}; log:\n"
                             f"{server.log_text()}")
        print(f"\nlease file crashes: {len(bound)} leases ACKed in "
              f"{CRASH_ROUNDS} rounds, {len(leased)} in the file",
              file=sys.stderr)
        self.assertGreater(len(bound), 0, "no client got a lease")
        server = self.start_server()
        line = server.wait_for_log("loaded ")
        self.assertIn(f"loaded {len(leased)} leases", line)


if __name__ == "__main__":
    unittest.main()
