"""Protocol tests of DHCPServer with raw packets over loopback.

Each test runs an in-process DHCPServer on 127.0.0.1 with an ephemeral
port, never port 67 and never bound to a real interface.  Its interface
record is "lo" with the subnet 127.0.0.0/24, so every address a reply can
go to (the broadcast stand-in, ciaddr, giaddr) stays on loopback.  With a
documentation subnet such as 192.0.2.0/24, unicast replies would leave
through the default route.  As a second guard, the server's socket is
wrapped so that a send to any address outside 127.0.0.0/8 is blocked and
recorded, and each test fails if one was tried.

The test client is a UDP socket on 127.0.0.1, and the server sends its
"broadcasts" there.  Replies unicast to ciaddr arrive on a second socket
bound to that loopback address.  Replies to a relay agent arrive on a
socket whose port becomes the server's relay port.
"""

import errno
import ipaddress
import logging
import os
import select
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import unittest

from support import REPO_ROOT

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pxeserver  # noqa: E402  (needs REPO_ROOT on sys.path)

from test_dhcp_packet import OVMF_DISCOVER  # noqa: E402
from test_dhcp_packet import OVMF_MAC  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_DISCOVER  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_MAC  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_REQUEST  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_XID  # noqa: E402
from test_dhcp_packet import option_layout  # noqa: E402


# Upper bound on every wait: a reply, server start and stop, handler
# threads finishing.  A passing test waits far less.
WAIT_SECONDS = 5
# How often serve_forever checks for shutdown; the default of 0.5 s would
# add that much to every test.
SHUTDOWN_POLL_SECONDS = 0.02
# Interval of the bounded polls for handler threads to finish.
POLL_SECONDS = 0.005

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
SERVER_IP = ipaddress.IPv4Address("127.0.0.1")
NETWORK = ipaddress.IPv4Network("127.0.0.0/24")
OTHER_SERVER_IP = ipaddress.IPv4Address("127.0.0.2")
RELAY_IP = ipaddress.IPv4Address("127.0.0.3")
POOL_START = ipaddress.IPv4Address("127.0.0.50")
POOL_END = ipaddress.IPv4Address("127.0.0.59")
# Loopback addresses outside the pool, for clients that already have one.
INFORM_CLIENT_IP = ipaddress.IPv4Address("127.0.0.77")
LEASE_SECONDS = 3600

MAC_A = bytes.fromhex("52540000000a")
MAC_B = bytes.fromhex("52540000000b")
MARKER_MAC = bytes.fromhex("5254000000ff")
MARKER_XID = 0x4D41524B

MessageType = pxeserver.DHCPMessageType


def mac_text(mac):
    return pxeserver.format_mac(mac)


def build_request(message_type, mac=MAC_A, xid=0x1000, options=None,
                  **fields):
    """Return the wire bytes of a client request.

    ``options`` adds to option 53; ``fields`` sets header fields by their
    RFC 2131 names, addresses given as text.
    """
    all_options = {pxeserver.OPT_MESSAGE_TYPE: bytes((message_type,))}
    all_options.update(options or {})
    for name in ("ciaddr", "yiaddr", "siaddr", "giaddr"):
        if name in fields:
            fields[name] = ipaddress.IPv4Address(fields[name])
    packet = pxeserver.DHCPPacket(op=pxeserver.BOOTREQUEST, xid=xid,
                                  chaddr=mac, options=all_options, **fields)
    return pxeserver.build_dhcp_packet(packet)


def address_option(address):
    return ipaddress.IPv4Address(address).packed


def pxe_bios_options():
    """Return the PXE options of a BIOS PXE ROM that is not iPXE."""
    return {
        pxeserver.OPT_CLIENT_ARCH: b"\x00\x00",
        pxeserver.OPT_VENDOR_CLASS_IDENTIFIER:
            b"PXEClient:Arch:00000:UNDI:002001",
        pxeserver.OPT_CLIENT_UUID: b"\x00" + bytes(range(16)),
    }


class LoopbackOnlySocket:
    """Wraps the server socket so that replies can reach loopback only.

    A send to any other address is recorded in ``blocked`` and fails with
    EPERM, which the server logs as a failed send.
    """

    def __init__(self, sock, blocked):
        self._sock = sock
        self._blocked = blocked

    def sendto(self, data, destination):
        if ipaddress.IPv4Address(destination[0]) not in LOOPBACK:
            self._blocked.append(destination)
            raise OSError(errno.EPERM, "test guard: not a loopback address")
        return self._sock.sendto(data, destination)


class LoopbackDHCPServer(pxeserver.DHCPServer):
    """DHCPServer that hands its handlers a LoopbackOnlySocket."""

    def __init__(self, *args, **kwargs):
        self.blocked_sends = []
        super().__init__(*args, **kwargs)

    def handle_packet(self, data, sock, source):
        guarded = LoopbackOnlySocket(sock, self.blocked_sends)
        super().handle_packet(data, guarded, source)


class DHCPServerTestCase(unittest.TestCase):
    """Runs a LoopbackDHCPServer and a client socket for each test."""

    def setUp(self):
        self.threads_before = threading.active_count()
        self.folder = tempfile.mkdtemp(prefix="pxeserver-dhcp-")
        self.addCleanup(shutil.rmtree, self.folder)
        self.root = os.path.join(self.folder, "root")
        os.mkdir(self.root)
        self.lease_file = os.path.join(self.folder, "leases.json")
        self.client = self.open_socket(str(SERVER_IP))
        self.client_port = self.client.getsockname()[1]
        self.other_replies = []
        self.server = None
        self.quiet_logs()

    def quiet_logs(self):
        """Keep the server's log lines off stderr; assertLogs still works."""
        logger = logging.getLogger("pxeserver")
        handler = logging.NullHandler()
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        self.addCleanup(setattr, logger, "propagate", logger.propagate)
        logger.propagate = False

    def open_socket(self, host, port=0):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind((host, port))
        return sock

    def start_server(self, extra_args=(), pool=(POOL_START, POOL_END)):
        """Start a server on the test's lease file; stopped at cleanup."""
        args = ["--iface", "lo", "--root", self.root,
                "--lease-file", self.lease_file,
                "--pool-start", str(pool[0]), "--pool-end", str(pool[1]),
                *extra_args]
        config = pxeserver.build_config(
            pxeserver.build_parser().parse_args(args))
        interface = pxeserver.InterfaceInfo(
            "lo", 1, SERVER_IP, NETWORK, 1500, bytes.fromhex("020000000001"))
        self.server = LoopbackDHCPServer(
            config, interface, port=0, client_port=self.client_port,
            broadcast_address=str(SERVER_IP), bind_device=False,
            bind_address=str(SERVER_IP))
        self.server_thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="dhcp-server-under-test")
        self.server_thread.start()
        self.addCleanup(self.stop_server)
        self.server_threads = threading.active_count()
        return self.server

    def stop_server(self):
        """Stop the server and check it left no thread and no stray send."""
        server, self.server = self.server, None
        if server is None:
            return
        server.shutdown()
        self.server_thread.join(WAIT_SECONDS)
        server.server_close()
        self.assertFalse(self.server_thread.is_alive(),
                         "server thread did not stop")
        self.wait_for_threads(self.threads_before)
        self.assertEqual(server.blocked_sends, [],
                         "the server tried to send off loopback")

    def restart_server(self, **kwargs):
        """Stop the running server and start a new one on the same files."""
        self.stop_server()
        return self.start_server(**kwargs)

    def wait_for_threads(self, count):
        """Wait until at most ``count`` threads run, or fail."""
        deadline = time.monotonic() + WAIT_SECONDS
        while threading.active_count() > count:
            if time.monotonic() > deadline:
                self.fail(f"{threading.active_count()} threads still "
                          f"running, expected {count}")
            time.sleep(POLL_SECONDS)

    # --- exchanging packets

    def send(self, data):
        self.client.sendto(data, self.server.server_address)

    def receive(self, xid, sock=None):
        """Return (packet, bytes) of the next reply with ``xid``.

        Replies with another xid are kept in ``other_replies``.
        """
        sock = sock or self.client
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail(f"no reply with xid 0x{xid:08x} within "
                          f"{WAIT_SECONDS} s")
            readable, _, _ = select.select([sock], [], [], remaining)
            if not readable:
                continue
            data = sock.recv(65536)
            packet = pxeserver.parse_dhcp_packet(data)
            if packet.xid == xid:
                return packet, data
            self.other_replies.append(packet)

    def exchange(self, data, xid, sock=None):
        self.send(data)
        return self.receive(xid, sock)[0]

    def settle(self):
        """Wait until every packet sent so far has been handled.

        The server reads datagrams in order and starts each handler
        thread before it reads the next one.  So when the reply to a
        marker INFORM arrives, every earlier packet has a handler thread.
        When the thread count is back to the server's own, those handlers
        are done and their replies are queued on the test's sockets.
        """
        self.send(build_request(MessageType.DHCPINFORM, mac=MARKER_MAC,
                                xid=MARKER_XID, ciaddr=str(SERVER_IP)))
        self.receive(MARKER_XID)
        self.wait_for_threads(self.server_threads)

    def assert_no_reply(self, xid, sock=None):
        """Fail if the server sent anything with ``xid`` so far."""
        self.settle()
        for candidate in (sock or self.client, self.client):
            while select.select([candidate], [], [], 0)[0]:
                self.other_replies.append(
                    pxeserver.parse_dhcp_packet(candidate.recv(65536)))
        sent = [packet.message_type.name for packet in self.other_replies
                if packet.xid == xid]
        self.assertEqual(sent, [], f"unexpected reply to xid 0x{xid:08x}")

    def lease(self, mac=MAC_A, xid=0x2000):
        """Run DISCOVER, OFFER, REQUEST, ACK and return the address."""
        offer = self.exchange(build_request(MessageType.DHCPDISCOVER,
                                            mac=mac, xid=xid), xid)
        ack = self.exchange(build_request(
            MessageType.DHCPREQUEST, mac=mac, xid=xid + 1, options={
                pxeserver.OPT_SERVER_ID: SERVER_IP.packed,
                pxeserver.OPT_REQUESTED_IP: offer.yiaddr.packed}), xid + 1)
        self.assertEqual(ack.message_type, MessageType.DHCPACK)
        return ack.yiaddr


class TestDHCPDiscover(DHCPServerTestCase):

    def setUp(self):
        super().setUp()
        self.start_server()

    def test_discover_gets_offer_from_pool(self):
        offer = self.exchange(build_request(MessageType.DHCPDISCOVER,
                                            xid=0x11), 0x11)
        self.assertEqual(offer.op, pxeserver.BOOTREPLY)
        self.assertEqual(offer.message_type, MessageType.DHCPOFFER)
        self.assertEqual(offer.yiaddr, POOL_START)
        self.assertEqual(offer.mac, MAC_A)

    def test_offer_starts_with_options_53_54(self):
        self.send(build_request(MessageType.DHCPDISCOVER, xid=0x12))
        _, data = self.receive(0x12)
        codes, _ = option_layout(data)
        self.assertEqual(codes[0], pxeserver.OPT_MESSAGE_TYPE)
        self.assertEqual(codes[1], pxeserver.OPT_SERVER_ID)

    def test_offer_carries_lease_times_and_mask(self):
        offer = self.exchange(build_request(MessageType.DHCPDISCOVER,
                                            xid=0x13), 0x13)
        options = offer.options
        self.assertEqual(options[pxeserver.OPT_SERVER_ID], SERVER_IP.packed)
        self.assertEqual(options[pxeserver.OPT_LEASE_TIME],
                         struct.pack("!I", LEASE_SECONDS))
        self.assertEqual(options[pxeserver.OPT_RENEWAL_TIME],
                         struct.pack("!I", LEASE_SECONDS // 2))
        self.assertEqual(options[pxeserver.OPT_REBINDING_TIME],
                         struct.pack("!I", LEASE_SECONDS * 7 // 8))
        self.assertEqual(options[pxeserver.OPT_SUBNET_MASK],
                         NETWORK.netmask.packed)

    def test_offer_padded_and_terminated(self):
        self.send(build_request(MessageType.DHCPDISCOVER, xid=0x14))
        _, data = self.receive(0x14)
        codes, end = option_layout(data)
        self.assertGreaterEqual(len(data), pxeserver.BOOTP_MIN_PACKET_BYTES)
        self.assertNotIn(pxeserver.OPT_PAD, codes)
        self.assertEqual(data[end + 1:], bytes(len(data) - end - 1))

    def test_pxe_offer_names_boot_file(self):
        offer = self.exchange(build_request(
            MessageType.DHCPDISCOVER, xid=0x15,
            options=pxe_bios_options()), 0x15)
        self.assertEqual(offer.siaddr, SERVER_IP)
        self.assertEqual(offer.file, b"undionly.kpxe")
        self.assertEqual(offer.options[pxeserver.OPT_BOOTFILE_NAME],
                         b"undionly.kpxe")
        self.assertEqual(offer.options[pxeserver.OPT_TFTP_SERVER_NAME],
                         str(SERVER_IP).encode())

    def test_pxe_offer_echoes_uuid(self):
        options = pxe_bios_options()
        offer = self.exchange(build_request(
            MessageType.DHCPDISCOVER, xid=0x16, options=options), 0x16)
        self.assertEqual(offer.options[pxeserver.OPT_CLIENT_UUID],
                         options[pxeserver.OPT_CLIENT_UUID])

    def test_plain_client_gets_no_boot_file(self):
        offer = self.exchange(build_request(MessageType.DHCPDISCOVER,
                                            xid=0x17), 0x17)
        self.assertEqual(offer.siaddr, ipaddress.IPv4Address(0))
        self.assertEqual(offer.file, b"")
        self.assertNotIn(pxeserver.OPT_BOOTFILE_NAME, offer.options)

    def test_seabios_ipxe_capture_gets_script(self):
        offer = self.exchange(SEABIOS_IPXE_DISCOVER, SEABIOS_IPXE_XID)
        request = pxeserver.parse_dhcp_packet(SEABIOS_IPXE_DISCOVER)
        self.assertEqual(offer.mac, SEABIOS_IPXE_MAC)
        self.assertEqual(offer.file, b"boot.ipxe")
        self.assertEqual(offer.options[pxeserver.OPT_CLIENT_UUID],
                         request.options[pxeserver.OPT_CLIENT_UUID])

    def test_ovmf_capture_gets_efi_file(self):
        request = pxeserver.parse_dhcp_packet(OVMF_DISCOVER)
        offer = self.exchange(OVMF_DISCOVER, request.xid)
        self.assertEqual(offer.mac, OVMF_MAC)
        self.assertEqual(offer.file, b"ipxe.efi")
        self.assertEqual(offer.flags, pxeserver.FLAG_BROADCAST)

    def test_ovmf_offer_has_no_repeated_options(self):
        # OVMF lists options 1, 3, 6 and 54 in option 55, which the server
        # also puts first on its own; each must still appear once.
        request = pxeserver.parse_dhcp_packet(OVMF_DISCOVER)
        self.send(OVMF_DISCOVER)
        _, data = self.receive(request.xid)
        codes, _ = option_layout(data)
        self.assertEqual(len(codes), len(set(codes)), codes)

    def test_bootreply_ignored(self):
        packet = pxeserver.DHCPPacket(
            op=pxeserver.BOOTREPLY, xid=0x18, chaddr=MAC_A,
            options={pxeserver.OPT_MESSAGE_TYPE:
                     bytes((MessageType.DHCPOFFER,))})
        self.send(pxeserver.build_dhcp_packet(packet))
        self.assert_no_reply(0x18)

    def test_one_log_line_per_message(self):
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            self.exchange(build_request(MessageType.DHCPDISCOVER,
                                        xid=0x5E1C0A21), 0x5E1C0A21)
            self.wait_for_threads(self.server_threads)
        lines = [line for line in logs.output if "xid=0x5e1c0a21" in line]
        discover = [line for line in lines if "DHCPDISCOVER" in line]
        offer = [line for line in lines if "DHCPOFFER" in line]
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual(len(discover), 1, lines)
        self.assertEqual(len(offer), 1, lines)
        self.assertIn(f"from {mac_text(MAC_A)}", discover[0])
        self.assertIn(f"to {mac_text(MAC_A)}", offer[0])
        self.assertIn(f"yiaddr={POOL_START}", offer[0])


class TestDHCPRequest(DHCPServerTestCase):

    def setUp(self):
        super().setUp()
        self.start_server()

    def test_selecting_request_gets_ack(self):
        leased = self.lease(MAC_A)
        self.assertEqual(leased, POOL_START)
        self.assertEqual(
            self.server.leases.lease_for(mac_text(MAC_A)).address,
            POOL_START)

    def test_ack_written_to_lease_file(self):
        self.lease(MAC_A)
        with open(self.lease_file, encoding="utf-8") as handle:
            text = handle.read()
        self.assertIn(mac_text(MAC_A), text)
        self.assertIn(str(POOL_START), text)

    def test_init_reboot_right_address_acked(self):
        leased = self.lease(MAC_A)
        ack = self.exchange(build_request(
            MessageType.DHCPREQUEST, xid=0x21, options={
                pxeserver.OPT_REQUESTED_IP: leased.packed}), 0x21)
        self.assertEqual(ack.message_type, MessageType.DHCPACK)
        self.assertEqual(ack.yiaddr, leased)

    def test_init_reboot_wrong_address_naked(self):
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            nak = self.exchange(build_request(
                MessageType.DHCPREQUEST, xid=0x22, options={
                    pxeserver.OPT_REQUESTED_IP:
                        address_option("198.51.100.9")}), 0x22)
        self.assertEqual(nak.message_type, MessageType.DHCPNAK)
        self.assertEqual(nak.options[pxeserver.OPT_SERVER_ID],
                         SERVER_IP.packed)
        self.assertEqual(nak.yiaddr, ipaddress.IPv4Address(0))
        self.assertNotIn(pxeserver.OPT_LEASE_TIME, nak.options)
        self.assertTrue(any("DHCPNAK to" in line for line in logs.output))

    def test_request_for_address_of_other_client_naked(self):
        leased = self.lease(MAC_A)
        nak = self.exchange(build_request(
            MessageType.DHCPREQUEST, mac=MAC_B, xid=0x23, options={
                pxeserver.OPT_REQUESTED_IP: leased.packed}), 0x23)
        self.assertEqual(nak.message_type, MessageType.DHCPNAK)

    def test_renewing_request_unicast_to_ciaddr(self):
        leased = self.lease(MAC_A)
        renewing = self.open_socket(str(leased), self.client_port)
        ack = self.exchange(build_request(
            MessageType.DHCPREQUEST, xid=0x24, ciaddr=str(leased)), 0x24,
            sock=renewing)
        self.assertEqual(ack.message_type, MessageType.DHCPACK)
        self.assertEqual(ack.yiaddr, leased)
        self.assertEqual(ack.ciaddr, leased)

    def test_request_without_address_dropped(self):
        with self.assertLogs("pxeserver.dhcp", "WARNING") as logs:
            self.send(build_request(MessageType.DHCPREQUEST, xid=0x25))
            self.assert_no_reply(0x25)
        self.assertTrue(any("neither option 50 nor ciaddr" in line
                            for line in logs.output), logs.output)

    def test_seabios_request_for_other_server_ignored(self):
        self.exchange(SEABIOS_IPXE_DISCOVER, SEABIOS_IPXE_XID)
        self.send(SEABIOS_IPXE_REQUEST)
        self.assert_no_reply(SEABIOS_IPXE_XID)


class TestDHCPSmallPool(DHCPServerTestCase):
    """A pool of one address, so a held or freed address is observable."""

    def setUp(self):
        super().setUp()
        self.start_server(pool=(POOL_START, POOL_START))

    def discover_from_b(self, xid):
        self.send(build_request(MessageType.DHCPDISCOVER, mac=MAC_B,
                                xid=xid))

    def test_other_server_request_withdraws_offer(self):
        self.exchange(build_request(MessageType.DHCPDISCOVER, xid=0x31),
                      0x31)
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            self.send(build_request(
                MessageType.DHCPREQUEST, xid=0x31, options={
                    pxeserver.OPT_SERVER_ID: OTHER_SERVER_IP.packed,
                    pxeserver.OPT_REQUESTED_IP: POOL_START.packed}))
            self.assert_no_reply(0x31)
        self.assertTrue(any("offer withdrawn" in line
                            for line in logs.output), logs.output)
        self.discover_from_b(0x32)
        self.assertEqual(self.receive(0x32)[0].yiaddr, POOL_START)

    def test_offer_held_for_first_client(self):
        self.exchange(build_request(MessageType.DHCPDISCOVER, xid=0x33),
                      0x33)
        with self.assertLogs("pxeserver.dhcp", "WARNING") as logs:
            self.discover_from_b(0x34)
            self.assert_no_reply(0x34)
        self.assertTrue(any("no free address" in line
                            for line in logs.output), logs.output)

    def test_decline_quarantines_address(self):
        leased = self.lease(MAC_A)
        with self.assertLogs("pxeserver.dhcp", "WARNING") as logs:
            self.send(build_request(
                MessageType.DHCPDECLINE, xid=0x35, options={
                    pxeserver.OPT_REQUESTED_IP: leased.packed,
                    pxeserver.OPT_SERVER_ID: SERVER_IP.packed}))
            self.assert_no_reply(0x35)
        self.assertTrue(any("DHCPDECLINE" in line and "quarantined" in line
                            for line in logs.output), logs.output)
        self.discover_from_b(0x36)
        self.assert_no_reply(0x36)

    def test_release_frees_address(self):
        leased = self.lease(MAC_A)
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            self.send(build_request(
                MessageType.DHCPRELEASE, xid=0x37, ciaddr=str(leased),
                options={pxeserver.OPT_SERVER_ID: SERVER_IP.packed}))
            self.assert_no_reply(0x37)
        self.assertTrue(any(f"released {leased}" in line
                            for line in logs.output), logs.output)
        self.discover_from_b(0x38)
        self.assertEqual(self.receive(0x38)[0].yiaddr, leased)


class TestDHCPInform(DHCPServerTestCase):

    def setUp(self):
        super().setUp()
        self.start_server()
        self.informing = self.open_socket(str(INFORM_CLIENT_IP),
                                          self.client_port)

    def test_inform_ack_sent_to_ciaddr(self):
        ack = self.exchange(build_request(
            MessageType.DHCPINFORM, xid=0x41, ciaddr=str(INFORM_CLIENT_IP)),
            0x41, sock=self.informing)
        self.assertEqual(ack.message_type, MessageType.DHCPACK)
        self.assertEqual(ack.yiaddr, ipaddress.IPv4Address(0))

    def test_inform_ack_has_no_lease_time(self):
        ack = self.exchange(build_request(
            MessageType.DHCPINFORM, xid=0x42, ciaddr=str(INFORM_CLIENT_IP)),
            0x42, sock=self.informing)
        for code in (pxeserver.OPT_LEASE_TIME, pxeserver.OPT_RENEWAL_TIME,
                     pxeserver.OPT_REBINDING_TIME):
            with self.subTest(option=code):
                self.assertNotIn(code, ack.options)
        self.assertEqual(ack.options[pxeserver.OPT_SUBNET_MASK],
                         NETWORK.netmask.packed)

    def test_inform_creates_no_lease(self):
        self.exchange(build_request(
            MessageType.DHCPINFORM, xid=0x43, ciaddr=str(INFORM_CLIENT_IP)),
            0x43, sock=self.informing)
        self.assertEqual(self.server.leases.leases(), [])


class TestDHCPRelay(DHCPServerTestCase):

    RELAY_INFO = b"\x01\x04port\x02\x06remote"

    def setUp(self):
        super().setUp()
        self.start_server()
        self.relay = self.open_socket(str(RELAY_IP))
        self.server.relay_port = self.relay.getsockname()[1]

    def test_relayed_discover_answered_to_relay(self):
        offer = self.exchange(build_request(
            MessageType.DHCPDISCOVER, xid=0x51, hops=1,
            giaddr=str(RELAY_IP), options={
                pxeserver.OPT_RELAY_AGENT_INFORMATION: self.RELAY_INFO}),
            0x51, sock=self.relay)
        self.assertEqual(offer.message_type, MessageType.DHCPOFFER)
        self.assertEqual(offer.giaddr, RELAY_IP)
        self.assertEqual(
            offer.options[pxeserver.OPT_RELAY_AGENT_INFORMATION],
            self.RELAY_INFO)

    def test_relay_info_is_last_option(self):
        # RFC 3046: servers SHOULD copy option 82 as the last option of
        # the reply.
        self.send(build_request(
            MessageType.DHCPDISCOVER, xid=0x56, giaddr=str(RELAY_IP),
            options={pxeserver.OPT_RELAY_AGENT_INFORMATION: self.RELAY_INFO,
                     pxeserver.OPT_CLIENT_ARCH: b"\x00\x07"}))
        _, data = self.receive(0x56, sock=self.relay)
        codes, _ = option_layout(data)
        self.assertEqual(codes[-1], pxeserver.OPT_RELAY_AGENT_INFORMATION)

    def test_relayed_nak_sent_to_relay(self):
        nak = self.exchange(build_request(
            MessageType.DHCPREQUEST, xid=0x52, giaddr=str(RELAY_IP),
            options={pxeserver.OPT_REQUESTED_IP:
                     address_option("198.51.100.9"),
                     pxeserver.OPT_RELAY_AGENT_INFORMATION:
                     self.RELAY_INFO}), 0x52, sock=self.relay)
        self.assertEqual(nak.message_type, MessageType.DHCPNAK)
        self.assertEqual(
            nak.options[pxeserver.OPT_RELAY_AGENT_INFORMATION],
            self.RELAY_INFO)

    def test_relayed_nak_sets_broadcast_flag(self):
        nak = self.exchange(build_request(
            MessageType.DHCPREQUEST, xid=0x53, giaddr=str(RELAY_IP),
            options={pxeserver.OPT_REQUESTED_IP:
                     address_option("198.51.100.9")}), 0x53,
            sock=self.relay)
        self.assertEqual(nak.flags & pxeserver.FLAG_BROADCAST,
                         pxeserver.FLAG_BROADCAST)

    def test_relay_outside_subnet_dropped(self):
        with self.assertLogs("pxeserver.dhcp", "WARNING") as logs:
            self.send(build_request(MessageType.DHCPDISCOVER, xid=0x54,
                                    giaddr="198.51.100.1"))
            self.assert_no_reply(0x54, sock=self.relay)
        self.assertTrue(any("no pool for its subnet" in line
                            for line in logs.output), logs.output)

    def test_option_82_not_echoed_without_relay(self):
        offer = self.exchange(build_request(
            MessageType.DHCPDISCOVER, xid=0x55, options={
                pxeserver.OPT_RELAY_AGENT_INFORMATION: self.RELAY_INFO}),
            0x55)
        self.assertNotIn(pxeserver.OPT_RELAY_AGENT_INFORMATION,
                         offer.options)


class TestDHCPMessageSize(DHCPServerTestCase):
    """Option 57: a reply never exceeds the size the client accepts."""

    # 50 DNS servers (200 bytes) and a 200-byte domain name push an OFFER
    # well past 576 bytes.
    DNS_SERVERS = ",".join(f"127.0.1.{number}" for number in range(1, 51))
    DOMAIN_NAME = ("a" * 49 + ".") * 4

    def setUp(self):
        super().setUp()
        self.start_server(extra_args=(
            "--dns-servers", self.DNS_SERVERS,
            "--domain-name", self.DOMAIN_NAME,
            "--router", str(SERVER_IP)))

    def discover(self, xid, max_size):
        options = pxe_bios_options()
        options[pxeserver.OPT_MAX_MESSAGE_SIZE] = struct.pack("!H", max_size)
        options[pxeserver.OPT_PARAMETER_REQUEST_LIST] = bytes((
            pxeserver.OPT_SUBNET_MASK, pxeserver.OPT_ROUTER,
            pxeserver.OPT_DOMAIN_NAME_SERVER, pxeserver.OPT_DOMAIN_NAME))
        self.send(build_request(MessageType.DHCPDISCOVER, xid=xid,
                                options=options))
        return self.receive(xid)

    def test_reply_fits_minimum_message_size(self):
        offer, data = self.discover(0x61, 576)
        # The server counts the 28 bytes of IP and UDP headers against
        # option 57, as the 312-byte options field of RFC 2131 implies.
        self.assertLessEqual(len(data), 576 - 28)
        self.assertEqual(offer.message_type, MessageType.DHCPOFFER)
        self.assertIn(pxeserver.OPT_SERVER_ID, offer.options)

    def test_size_below_576_treated_as_576(self):
        small, _ = self.discover(0x62, 300)
        minimum, _ = self.discover(0x64, 576)
        self.assertEqual(sorted(small.options), sorted(minimum.options))

    def test_large_limit_keeps_every_option(self):
        offer, data = self.discover(0x63, 1500)
        self.assertGreater(len(data), 576 - 28)
        self.assertEqual(offer.options[pxeserver.OPT_DOMAIN_NAME],
                         self.DOMAIN_NAME.encode())
        self.assertEqual(
            len(offer.options[pxeserver.OPT_DOMAIN_NAME_SERVER]), 200)


class TestDHCPKnownClients(DHCPServerTestCase):

    def setUp(self):
        super().setUp()
        ini = os.path.join(self.folder, "pxe.ini")
        with open(ini, "w", encoding="utf-8") as handle:
            handle.write(f"[dhcp]\nknown_clients_only = yes\n\n"
                         f"[host:{mac_text(MAC_A)}]\n"
                         f"address = 127.0.0.55\nhostname = node-a\n"
                         f"boot_file = special.efi\n\n"
                         f"[host:{mac_text(MARKER_MAC)}]\n")
        self.start_server(extra_args=("--config", ini))

    def test_unknown_mac_ignored(self):
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            self.send(build_request(MessageType.DHCPDISCOVER, mac=MAC_B,
                                    xid=0x71))
            self.assert_no_reply(0x71)
        self.assertTrue(any("not a known client" in line
                            and mac_text(MAC_B) in line
                            for line in logs.output), logs.output)

    def test_known_mac_gets_reservation(self):
        offer = self.exchange(build_request(
            MessageType.DHCPDISCOVER, xid=0x72,
            options=pxe_bios_options()), 0x72)
        self.assertEqual(offer.yiaddr, ipaddress.IPv4Address("127.0.0.55"))
        self.assertEqual(offer.file, b"special.efi")
        self.assertEqual(offer.options[pxeserver.OPT_HOST_NAME], b"node-a")


class TestDHCPServerRobustness(DHCPServerTestCase):

    def test_malformed_packets_warned_rate_limited(self):
        self.start_server()
        bad = build_request(MessageType.DHCPDISCOVER, xid=0x81)
        bad = bad[:236] + b"\x00\x00\x00\x00" + bad[240:]
        count = pxeserver.WARNINGS_PER_SOURCE_PER_MINUTE + 5
        with self.assertLogs("pxeserver.dhcp", "WARNING") as logs:
            for _ in range(count):
                self.send(bad)
            self.settle()
        warnings = [line for line in logs.output
                    if "malformed DHCP packet" in line]
        self.assertEqual(len(warnings),
                         pxeserver.WARNINGS_PER_SOURCE_PER_MINUTE)
        self.assertIn("magic cookie", warnings[0])

    def test_server_answers_after_malformed(self):
        self.start_server()
        with self.assertLogs("pxeserver.dhcp", "WARNING"):
            self.send(b"\x01" * 10)
            self.send(build_request(MessageType.DHCPDISCOVER,
                                    xid=0x82)[:238])
            offer = self.exchange(build_request(MessageType.DHCPDISCOVER,
                                                xid=0x83), 0x83)
        self.assertEqual(offer.message_type, MessageType.DHCPOFFER)

    def test_empty_overload_option_warned(self):
        self.start_server()
        with self.assertLogs("pxeserver.dhcp", "WARNING") as logs:
            self.send(build_request(MessageType.DHCPDISCOVER, xid=0x87,
                                    options={pxeserver.OPT_OVERLOAD: b""}))
            self.settle()
        levels = [line.split(":", 1)[0] for line in logs.output]
        self.assertEqual(levels, ["WARNING"])

    def test_leases_survive_restart(self):
        self.start_server()
        leased = self.lease(MAC_A)
        self.restart_server()
        offer_a = self.exchange(build_request(MessageType.DHCPDISCOVER,
                                              mac=MAC_A, xid=0x84), 0x84)
        offer_b = self.exchange(build_request(MessageType.DHCPDISCOVER,
                                              mac=MAC_B, xid=0x85), 0x85)
        self.assertEqual(offer_a.yiaddr, leased)
        self.assertNotEqual(offer_b.yiaddr, leased)

    def test_damaged_lease_file_does_not_stop_start(self):
        with open(self.lease_file, "w", encoding="utf-8") as handle:
            handle.write("{damaged")
        with self.assertLogs("pxeserver.dhcp", "WARNING") as logs:
            self.start_server()
        self.assertIn("damaged", logs.output[0])
        offer = self.exchange(build_request(MessageType.DHCPDISCOVER,
                                            xid=0x86), 0x86)
        self.assertEqual(offer.yiaddr, POOL_START)


class TestReplyDestination(unittest.TestCase):
    """reply_destination against the rules of RFC 2131 section 4.1."""

    BROADCAST = "255.255.255.255"

    def destination(self, message_type, **fields):
        fields = {name: ipaddress.IPv4Address(value)
                  for name, value in fields.items() if name != "flags"}
        packet = pxeserver.DHCPPacket(op=pxeserver.BOOTREQUEST, **fields)
        return pxeserver.reply_destination(packet, message_type,
                                           self.BROADCAST)

    def test_relayed_reply_goes_to_relay_server_port(self):
        self.assertEqual(
            self.destination(MessageType.DHCPOFFER, giaddr="192.0.2.254",
                             ciaddr="192.0.2.60"),
            ("192.0.2.254", pxeserver.DHCP_SERVER_PORT))

    def test_relayed_nak_goes_to_relay(self):
        self.assertEqual(
            self.destination(MessageType.DHCPNAK, giaddr="192.0.2.254"),
            ("192.0.2.254", pxeserver.DHCP_SERVER_PORT))

    def test_nak_broadcast_even_with_ciaddr(self):
        self.assertEqual(
            self.destination(MessageType.DHCPNAK, ciaddr="192.0.2.60"),
            (self.BROADCAST, pxeserver.DHCP_CLIENT_PORT))

    def test_ack_unicast_to_ciaddr(self):
        self.assertEqual(
            self.destination(MessageType.DHCPACK, ciaddr="192.0.2.60"),
            ("192.0.2.60", pxeserver.DHCP_CLIENT_PORT))

    def test_offer_without_ciaddr_broadcast(self):
        self.assertEqual(
            self.destination(MessageType.DHCPOFFER, yiaddr="192.0.2.50"),
            (self.BROADCAST, pxeserver.DHCP_CLIENT_PORT))

    def test_broadcast_flag_reply_broadcast(self):
        packet = pxeserver.DHCPPacket(
            op=pxeserver.BOOTREQUEST, flags=pxeserver.FLAG_BROADCAST)
        self.assertEqual(
            pxeserver.reply_destination(packet, MessageType.DHCPOFFER,
                                        self.BROADCAST),
            (self.BROADCAST, pxeserver.DHCP_CLIENT_PORT))

    def test_ports_can_be_overridden(self):
        packet = pxeserver.DHCPPacket(
            op=pxeserver.BOOTREQUEST,
            giaddr=ipaddress.IPv4Address("192.0.2.254"))
        self.assertEqual(
            pxeserver.reply_destination(packet, MessageType.DHCPOFFER,
                                        self.BROADCAST, client_port=1068,
                                        server_port=1067),
            ("192.0.2.254", 1067))


if __name__ == "__main__":
    unittest.main()
