"""Protocol tests of proxyDHCP, the PXE boot server and auto mode.

ProxyDHCPServer and BootServer run in-process on 127.0.0.1 with an
ephemeral port, on the loopback harness of test_dhcp_server.py.  Their
interface record is "lo" with the subnet 127.0.0.0/24, so every reply
destination (the broadcast stand-in, ciaddr, giaddr, the sender) stays on
loopback.  A send to any other address is blocked and fails the test.
A full-mode DHCPServer runs on the same harness for the Raspberry Pi
replies, which both modes send.

choose_mode is tested with probe_dhcp_server replaced by a stub, so no test
in this file broadcasts a DHCPDISCOVER; tests/test_proxy_boot.py runs the
real probe inside network namespaces.
"""

import ipaddress
import os
import shutil
import sys
import tempfile
import threading
import unittest
from unittest import mock

from support import REPO_ROOT

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pxeserver  # noqa: E402  (needs REPO_ROOT on sys.path)

import test_dhcp_server as harness  # noqa: E402
from test_dhcp_packet import MALFORMED_PACKETS  # noqa: E402
from test_dhcp_packet import OVMF_DISCOVER  # noqa: E402
from test_dhcp_packet import OVMF_MAC  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_DISCOVER  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_MAC  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_REQUEST  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_XID  # noqa: E402
from test_dhcp_packet import option_layout  # noqa: E402


MessageType = pxeserver.DHCPMessageType
build_request = harness.build_request

SERVER_IP = harness.SERVER_IP
ZERO_ADDRESS = ipaddress.IPv4Address(0)
# A client that already has an address, outside the full-mode pool.
CLIENT_IP = harness.INFORM_CLIENT_IP

MAC_A = harness.MAC_A
MAC_B = harness.MAC_B
MARKER_MAC = harness.MARKER_MAC
MARKER_XID = harness.MARKER_XID

OVMF_XID = pxeserver.parse_dhcp_packet(OVMF_DISCOVER).xid

# Option 43 that BIOS PXE ROMs and iPXE get in proxy mode: discovery
# control (6) = 8, "boot the file named in this reply", then END.
BIOS_VENDOR_OPTIONS = bytes.fromhex("060108ff")
# A PXE boot item (sub-option 71 of option 43): type 0x8000, layer 0.
BOOT_ITEM = bytes.fromhex("80000000")

# The vendor class of Raspberry Pi network boot ROMs, and the option 43
# they get in both modes: discovery control 3, menu prompt "PXE" with
# timeout 0, and one boot menu item named "Raspberry Pi Boot".
PI_MAC = bytes.fromhex("b827eb123456")  # Raspberry Pi Foundation OUI
PI4_MAC = bytes.fromhex("dca632123456")  # Raspberry Pi Trading OUI
PI_VENDOR_CLASS = b"PXEClient:Arch:00000:UNDI:002001"
PI_VENDOR_OPTIONS = bytes.fromhex(
    "0601030a0400505845091400001152617370626572727920506920426f6f74ff")


def pxe_options(arch=pxeserver.ClientArch.BIOS, vendor_class=None):
    """Return options 93, 60 and 97 of a PXE ROM that is not iPXE."""
    if vendor_class is None:
        vendor_class = f"PXEClient:Arch:{arch:05d}:UNDI:002001".encode()
    return {
        pxeserver.OPT_CLIENT_ARCH: arch.to_bytes(2, "big"),
        pxeserver.OPT_VENDOR_CLASS_IDENTIFIER: vendor_class,
        pxeserver.OPT_CLIENT_UUID: b"\x00" + bytes(range(16)),
    }


def vendor_suboptions(packet):
    """Return the PXE sub-options of a reply's option 43 as a dict."""
    return pxeserver.parse_dhcp_options(
        packet.options[pxeserver.OPT_VENDOR_SPECIFIC], "option 43")


# LoopbackDHCPServer's send guard comes first in the method resolution
# order, then the server class under test.
class LoopbackProxyDHCPServer(harness.LoopbackDHCPServer,
                              pxeserver.ProxyDHCPServer):
    """ProxyDHCPServer whose replies can reach loopback only."""


class LoopbackBootServer(harness.LoopbackDHCPServer, pxeserver.BootServer):
    """BootServer whose replies can reach loopback only."""


class ProxyServerTestCase(harness.DHCPServerTestCase):
    """Runs ``server_class`` in ``mode`` on loopback for each test.

    The marker that settle() sends is a PXE request, because proxyDHCP
    and the boot server stay silent to anything else.
    """

    server_class = LoopbackProxyDHCPServer
    mode = "proxy"
    marker_type = MessageType.DHCPDISCOVER

    def start_server(self, extra_args=()):
        args = ["--iface", "lo", "--mode", self.mode, "--root", self.root,
                "--lease-file", self.lease_file,
                "--pool-start", str(harness.POOL_START),
                "--pool-end", str(harness.POOL_END), *extra_args]
        config = pxeserver.build_config(
            pxeserver.build_parser().parse_args(args))
        interface = pxeserver.InterfaceInfo(
            "lo", 1, SERVER_IP, harness.NETWORK, 1500,
            bytes.fromhex("020000000001"))
        self.server = self.server_class(
            config, interface, port=0, client_port=self.client_port,
            broadcast_address=str(SERVER_IP), bind_device=False,
            bind_address=str(SERVER_IP))
        self.server_thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": harness.SHUTDOWN_POLL_SECONDS},
            name="proxy-server-under-test")
        self.server_thread.start()
        self.addCleanup(self.stop_server)
        self.server_threads = threading.active_count()
        return self.server

    def settle(self):
        """Wait until every packet sent so far has been handled."""
        # The boot server replies to the sender, so ciaddr may be ours.
        self.send(build_request(self.marker_type, mac=MARKER_MAC,
                                xid=MARKER_XID, ciaddr=str(SERVER_IP),
                                options=pxe_options()))
        self.receive(MARKER_XID)
        self.wait_for_threads(self.server_threads)

    def send_from(self, sock, data):
        sock.sendto(data, self.server.server_address)


class TestProxyOffer(ProxyServerTestCase):
    """DHCPOFFERs of proxyDHCP to PXE DISCOVERs."""

    def setUp(self):
        super().setUp()
        self.start_server()

    def ipxe_offer(self):
        return self.exchange(SEABIOS_IPXE_DISCOVER, SEABIOS_IPXE_XID)

    def ovmf_offer(self):
        return self.exchange(OVMF_DISCOVER, OVMF_XID)

    def test_offer_is_dhcpoffer(self):
        self.assertEqual(self.ipxe_offer().message_type,
                         MessageType.DHCPOFFER)

    def test_offer_has_no_address(self):
        self.assertEqual(self.ipxe_offer().yiaddr, ZERO_ADDRESS)

    def test_offer_names_server_in_siaddr(self):
        self.assertEqual(self.ipxe_offer().siaddr, SERVER_IP)

    def test_offer_carries_server_identifier(self):
        offer = self.ipxe_offer()
        self.assertEqual(offer.options[pxeserver.OPT_SERVER_ID],
                         SERVER_IP.packed)

    def test_offer_vendor_class_is_pxeclient(self):
        offer = self.ipxe_offer()
        self.assertEqual(
            offer.options[pxeserver.OPT_VENDOR_CLASS_IDENTIFIER],
            b"PXEClient")

    def test_offer_echoes_client_uuid(self):
        request = pxeserver.parse_dhcp_packet(SEABIOS_IPXE_DISCOVER)
        self.assertEqual(self.ipxe_offer().options[pxeserver.OPT_CLIENT_UUID],
                         request.options[pxeserver.OPT_CLIENT_UUID])

    def test_offer_carries_no_lease_time(self):
        self.assertNotIn(pxeserver.OPT_LEASE_TIME,
                         self.ipxe_offer().options)

    def test_ipxe_offer_file_is_script(self):
        offer = self.ipxe_offer()
        self.assertEqual(offer.mac, SEABIOS_IPXE_MAC)
        self.assertEqual(offer.file, b"boot.ipxe")
        self.assertEqual(offer.options[pxeserver.OPT_BOOTFILE_NAME],
                         b"boot.ipxe")

    def test_ipxe_offer_sets_discovery_control(self):
        self.assertEqual(
            self.ipxe_offer().options[pxeserver.OPT_VENDOR_SPECIFIC],
            BIOS_VENDOR_OPTIONS)

    def test_bios_rom_offer_names_bios_file(self):
        offer = self.exchange(build_request(
            MessageType.DHCPDISCOVER, xid=0x101, options=pxe_options()),
            0x101)
        self.assertEqual(offer.file, b"undionly.kpxe")
        self.assertEqual(offer.options[pxeserver.OPT_BOOTFILE_NAME],
                         b"undionly.kpxe")
        self.assertEqual(offer.options[pxeserver.OPT_VENDOR_SPECIFIC],
                         BIOS_VENDOR_OPTIONS)

    def test_ovmf_offer_names_efi_file(self):
        offer = self.ovmf_offer()
        self.assertEqual(offer.mac, OVMF_MAC)
        self.assertEqual(offer.file, b"ipxe.efi")
        self.assertEqual(offer.options[pxeserver.OPT_BOOTFILE_NAME],
                         b"ipxe.efi")

    def test_ovmf_offer_has_no_option_43(self):
        # Without option 43, OVMF asks the boot server on port 4011.
        self.assertNotIn(pxeserver.OPT_VENDOR_SPECIFIC,
                         self.ovmf_offer().options)

    def test_ovmf_offer_is_pxe_offer(self):
        offer = self.ovmf_offer()
        self.assertEqual(offer.yiaddr, ZERO_ADDRESS)
        self.assertEqual(
            offer.options[pxeserver.OPT_VENDOR_CLASS_IDENTIFIER],
            b"PXEClient")
        self.assertEqual(offer.options[pxeserver.OPT_CLIENT_UUID],
                         pxeserver.parse_dhcp_packet(OVMF_DISCOVER)
                         .options[pxeserver.OPT_CLIENT_UUID])

    def test_ovmf_offer_has_no_repeated_options(self):
        self.send(OVMF_DISCOVER)
        _, data = self.receive(OVMF_XID)
        codes, _ = option_layout(data)
        self.assertEqual(len(codes), len(set(codes)), codes)

    def test_offer_logged_as_proxy(self):
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            self.ovmf_offer()
            self.wait_for_threads(self.server_threads)
        mac = harness.mac_text(OVMF_MAC)
        offers = [line for line in logs.output
                  if f"DHCPOFFER to {mac} proxy bootfile=ipxe.efi" in line]
        self.assertEqual(len(offers), 1, logs.output)


class TestProxyBootFiles(ProxyServerTestCase):
    """Boot file settings as proxyDHCP applies them."""

    def test_empty_boot_file_gets_no_offer(self):
        self.start_server(extra_args=("--efi64-file", ""))
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            self.send(OVMF_DISCOVER)
            self.assert_no_reply(OVMF_XID)
        self.assertTrue(any("gets no reply: no boot file" in line
                            for line in logs.output), logs.output)

    def test_empty_script_gives_ipxe_bios_file(self):
        self.start_server(extra_args=("--ipxe-script", ""))
        offer = self.exchange(SEABIOS_IPXE_DISCOVER, SEABIOS_IPXE_XID)
        self.assertEqual(offer.file, b"undionly.kpxe")

    def test_malformed_arch_gets_fallback_file(self):
        self.start_server(extra_args=("--fallback-file", "fallback.0"))
        options = pxe_options()
        options[pxeserver.OPT_CLIENT_ARCH] = b"\x00"
        with self.assertLogs("pxeserver.dhcp", "WARNING") as logs:
            offer = self.exchange(build_request(
                MessageType.DHCPDISCOVER, xid=0x111, options=options),
                0x111)
        self.assertEqual(offer.file, b"fallback.0")
        self.assertTrue(any("option 93 has length 1" in line
                            for line in logs.output), logs.output)


class TestProxySilence(ProxyServerTestCase):
    """proxyDHCP never hands out, confirms or refuses an address."""

    def setUp(self):
        super().setUp()
        self.start_server()
        # Replies to a client with an address would go to ciaddr.
        self.addressed = self.open_socket(str(CLIENT_IP), self.client_port)

    def pxe_request(self, message_type, xid, options=(), **fields):
        all_options = pxe_options()
        all_options.update(options)
        return build_request(message_type, xid=xid, options=all_options,
                             **fields)

    def assert_silent(self, data, xid):
        """Send data and fail on any reply or any DHCPACK/DHCPNAK line."""
        with self.assertLogs("pxeserver.dhcp", "DEBUG") as logs:
            self.send(data)
            self.assert_no_reply(xid, sock=self.addressed)
        replies = [line for line in logs.output
                   if "DHCPACK" in line or "DHCPNAK" in line]
        self.assertEqual(replies, [])

    def test_non_pxe_discover_gets_nothing(self):
        self.assert_silent(build_request(MessageType.DHCPDISCOVER,
                                         xid=0x201), 0x201)

    def test_arch_without_vendor_class_gets_nothing(self):
        self.assert_silent(build_request(
            MessageType.DHCPDISCOVER, xid=0x202,
            options={pxeserver.OPT_CLIENT_ARCH: b"\x00\x07"}), 0x202)

    def test_selecting_request_gets_nothing(self):
        self.assert_silent(self.pxe_request(
            MessageType.DHCPREQUEST, 0x203, {
                pxeserver.OPT_SERVER_ID: SERVER_IP.packed,
                pxeserver.OPT_REQUESTED_IP: harness.POOL_START.packed}),
            0x203)

    def test_init_reboot_request_gets_nothing(self):
        # A full-mode server would NAK this address from another subnet.
        self.assert_silent(self.pxe_request(
            MessageType.DHCPREQUEST, 0x204, {
                pxeserver.OPT_REQUESTED_IP:
                    harness.address_option("198.51.100.9")}), 0x204)

    def test_renewing_request_gets_nothing(self):
        self.assert_silent(self.pxe_request(
            MessageType.DHCPREQUEST, 0x205, ciaddr=str(CLIENT_IP)), 0x205)

    def test_seabios_request_gets_nothing(self):
        self.assert_silent(SEABIOS_IPXE_REQUEST, SEABIOS_IPXE_XID)

    def test_decline_gets_nothing(self):
        self.assert_silent(self.pxe_request(
            MessageType.DHCPDECLINE, 0x206, {
                pxeserver.OPT_SERVER_ID: SERVER_IP.packed,
                pxeserver.OPT_REQUESTED_IP: harness.POOL_START.packed}),
            0x206)

    def test_release_gets_nothing(self):
        self.assert_silent(self.pxe_request(
            MessageType.DHCPRELEASE, 0x207,
            {pxeserver.OPT_SERVER_ID: SERVER_IP.packed},
            ciaddr=str(CLIENT_IP)), 0x207)

    def test_inform_gets_nothing(self):
        self.assert_silent(self.pxe_request(
            MessageType.DHCPINFORM, 0x208, ciaddr=str(CLIENT_IP)), 0x208)

    def test_exchange_creates_no_lease_file(self):
        offer = self.exchange(build_request(
            MessageType.DHCPDISCOVER, xid=0x209, options=pxe_options()),
            0x209)
        self.send(self.pxe_request(MessageType.DHCPREQUEST, 0x209, {
            pxeserver.OPT_SERVER_ID: offer.siaddr.packed,
            pxeserver.OPT_REQUESTED_IP: harness.POOL_START.packed}))
        self.settle()
        self.assertFalse(os.path.exists(self.lease_file),
                         f"{self.lease_file} exists")

    def test_server_keeps_no_lease_store(self):
        self.assertIsNone(self.server.leases)


class TestBootServer(ProxyServerTestCase):
    """DHCPACKs of the boot server (port 4011 in service) to PXE clients."""

    server_class = LoopbackBootServer
    marker_type = MessageType.DHCPINFORM

    def setUp(self):
        super().setUp()
        self.start_server()
        # The client that has an address, with a port of its own, so the
        # test can tell a reply to the sender from one to ciaddr:68.
        self.booting = self.open_socket(str(CLIENT_IP))

    def boot_request(self, message_type, xid, arch=pxeserver.ClientArch.BIOS,
                     vendor_options=None, **fields):
        options = pxe_options(arch)
        if vendor_options is not None:
            options[pxeserver.OPT_VENDOR_SPECIFIC] = vendor_options
        fields.setdefault("ciaddr", str(CLIENT_IP))
        return build_request(message_type, xid=xid, options=options,
                             **fields)

    def exchange_from_client(self, data, xid):
        self.send_from(self.booting, data)
        return self.receive(xid, sock=self.booting)[0]

    def test_request_gets_ack_at_sender(self):
        ack = self.exchange_from_client(
            self.boot_request(MessageType.DHCPREQUEST, 0x301), 0x301)
        self.assertEqual(ack.message_type, MessageType.DHCPACK)

    def test_inform_gets_ack_at_sender(self):
        ack = self.exchange_from_client(
            self.boot_request(MessageType.DHCPINFORM, 0x302), 0x302)
        self.assertEqual(ack.message_type, MessageType.DHCPACK)

    def test_ack_names_boot_file(self):
        ack = self.exchange_from_client(
            self.boot_request(MessageType.DHCPREQUEST, 0x303), 0x303)
        self.assertEqual(ack.file, b"undionly.kpxe")
        self.assertEqual(ack.options[pxeserver.OPT_BOOTFILE_NAME],
                         b"undionly.kpxe")
        self.assertEqual(ack.siaddr, SERVER_IP)

    def test_ack_hands_out_no_lease(self):
        ack = self.exchange_from_client(
            self.boot_request(MessageType.DHCPREQUEST, 0x304), 0x304)
        self.assertEqual(ack.yiaddr, ZERO_ADDRESS)
        self.assertNotIn(pxeserver.OPT_LEASE_TIME, ack.options)

    def test_efi_ack_names_efi_file(self):
        ack = self.exchange_from_client(self.boot_request(
            MessageType.DHCPREQUEST, 0x305,
            arch=pxeserver.ClientArch.EFI_X64), 0x305)
        self.assertEqual(ack.file, b"ipxe.efi")
        self.assertNotIn(pxeserver.OPT_VENDOR_SPECIFIC, ack.options)

    def test_boot_item_echoed(self):
        vendor = bytes((pxeserver.PXE_BOOT_ITEM, 4)) + BOOT_ITEM + b"\xff"
        ack = self.exchange_from_client(self.boot_request(
            MessageType.DHCPREQUEST, 0x306, vendor_options=vendor), 0x306)
        suboptions = vendor_suboptions(ack)
        self.assertEqual(suboptions[pxeserver.PXE_BOOT_ITEM], BOOT_ITEM)
        self.assertEqual(suboptions[pxeserver.PXE_DISCOVERY_CONTROL],
                         bytes((pxeserver.PXE_USE_BOOT_FILE,)))

    def test_efi_boot_item_echoed(self):
        vendor = bytes((pxeserver.PXE_BOOT_ITEM, 4)) + BOOT_ITEM + b"\xff"
        ack = self.exchange_from_client(self.boot_request(
            MessageType.DHCPREQUEST, 0x307,
            arch=pxeserver.ClientArch.EFI_X64, vendor_options=vendor),
            0x307)
        self.assertEqual(ack.options[pxeserver.OPT_VENDOR_SPECIFIC],
                         bytes((pxeserver.PXE_BOOT_ITEM, 4)) + BOOT_ITEM
                         + b"\xff")

    def test_short_boot_item_not_echoed(self):
        vendor = bytes((pxeserver.PXE_BOOT_ITEM, 3)) + BOOT_ITEM[:3]
        ack = self.exchange_from_client(self.boot_request(
            MessageType.DHCPREQUEST, 0x308, vendor_options=vendor), 0x308)
        self.assertNotIn(pxeserver.PXE_BOOT_ITEM, vendor_suboptions(ack))

    def test_malformed_option_43_still_answered(self):
        vendor = bytes((pxeserver.PXE_BOOT_ITEM, 9)) + BOOT_ITEM
        ack = self.exchange_from_client(self.boot_request(
            MessageType.DHCPREQUEST, 0x309, vendor_options=vendor), 0x309)
        self.assertEqual(ack.options[pxeserver.OPT_VENDOR_SPECIFIC],
                         BIOS_VENDOR_OPTIONS)

    def test_relayed_request_answered_to_relay(self):
        relay = self.open_socket(str(harness.RELAY_IP))
        self.server.relay_port = relay.getsockname()[1]
        self.send(self.boot_request(
            MessageType.DHCPREQUEST, 0x30A, giaddr=str(harness.RELAY_IP),
            hops=1))
        ack = self.receive(0x30A, sock=relay)[0]
        self.assertEqual(ack.message_type, MessageType.DHCPACK)
        self.assertEqual(ack.giaddr, harness.RELAY_IP)

    def test_discover_gets_nothing(self):
        self.send_from(self.booting, self.boot_request(
            MessageType.DHCPDISCOVER, 0x30B, ciaddr="0.0.0.0"))
        self.assert_no_reply(0x30B, sock=self.booting)

    def test_non_pxe_request_gets_nothing(self):
        self.send_from(self.booting, build_request(
            MessageType.DHCPREQUEST, xid=0x30C, ciaddr=str(CLIENT_IP)))
        self.assert_no_reply(0x30C, sock=self.booting)

    def test_request_and_ack_logged(self):
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            self.exchange_from_client(
                self.boot_request(MessageType.DHCPREQUEST, 0x30D), 0x30D)
            self.wait_for_threads(self.server_threads)
        mac = harness.mac_text(MAC_A)
        requests = [line for line in logs.output
                    if f"DHCPREQUEST from {mac} via lo:4011" in line]
        acks = [line for line in logs.output
                if f"DHCPACK to {mac} proxy" in line]
        self.assertEqual(len(requests), 1, logs.output)
        self.assertEqual(len(acks), 1, logs.output)

    def test_server_answers_after_malformed(self):
        with self.assertLogs("pxeserver.dhcp", "WARNING"):
            for _, data, _ in MALFORMED_PACKETS:
                self.send_from(self.booting, data)
            ack = self.exchange_from_client(
                self.boot_request(MessageType.DHCPREQUEST, 0x30E), 0x30E)
        self.assertEqual(ack.message_type, MessageType.DHCPACK)


class RaspberryPiChecks:
    """Raspberry Pi replies, shared by the full-mode and proxy classes."""

    def setUp(self):
        super().setUp()
        self.start_server()

    def pi_offer(self, mac, xid, vendor_class=PI_VENDOR_CLASS):
        return self.exchange(build_request(
            MessageType.DHCPDISCOVER, mac=mac, xid=xid,
            options=pxe_options(vendor_class=vendor_class)), xid)

    def test_pi_gets_boot_menu(self):
        offer = self.pi_offer(PI_MAC, 0x401)
        self.assertEqual(offer.options[pxeserver.OPT_VENDOR_SPECIFIC],
                         PI_VENDOR_OPTIONS)

    def test_pi_gets_vendor_class_pxeclient(self):
        offer = self.pi_offer(PI_MAC, 0x402)
        self.assertEqual(
            offer.options[pxeserver.OPT_VENDOR_CLASS_IDENTIFIER],
            b"PXEClient")

    def test_pi_offer_names_boot_file(self):
        offer = self.pi_offer(PI_MAC, 0x403)
        self.assertEqual(offer.file, b"undionly.kpxe")
        self.assertEqual(offer.siaddr, SERVER_IP)

    def test_pi4_oui_gets_boot_menu(self):
        offer = self.pi_offer(PI4_MAC, 0x404)
        self.assertEqual(offer.options[pxeserver.OPT_VENDOR_SPECIFIC],
                         PI_VENDOR_OPTIONS)

    def test_other_mac_gets_no_pi_menu(self):
        offer = self.pi_offer(MAC_A, 0x405)
        self.assertNotEqual(
            offer.options.get(pxeserver.OPT_VENDOR_SPECIFIC),
            PI_VENDOR_OPTIONS)

    def test_other_vendor_class_gets_no_pi_menu(self):
        offer = self.pi_offer(PI_MAC, 0x406,
                              b"PXEClient:Arch:00000:UNDI:002000")
        self.assertNotEqual(
            offer.options.get(pxeserver.OPT_VENDOR_SPECIFIC),
            PI_VENDOR_OPTIONS)


class TestProxyRaspberryPi(RaspberryPiChecks, ProxyServerTestCase):

    def test_pi_offer_has_no_address(self):
        self.assertEqual(self.pi_offer(PI_MAC, 0x411).yiaddr, ZERO_ADDRESS)

    def test_other_mac_gets_bios_options(self):
        offer = self.pi_offer(MAC_A, 0x412)
        self.assertEqual(offer.options[pxeserver.OPT_VENDOR_SPECIFIC],
                         BIOS_VENDOR_OPTIONS)


class TestFullRaspberryPi(RaspberryPiChecks, ProxyServerTestCase):

    server_class = harness.LoopbackDHCPServer
    mode = "full"

    def test_pi_offer_has_pool_address(self):
        self.assertEqual(self.pi_offer(PI_MAC, 0x421).yiaddr,
                         harness.POOL_START)

    def test_other_mac_gets_no_option_43(self):
        # Full mode sends option 43 to Raspberry Pis only.
        offer = self.pi_offer(MAC_A, 0x422)
        self.assertNotIn(pxeserver.OPT_VENDOR_SPECIFIC, offer.options)

    def test_other_mac_gets_no_vendor_class(self):
        offer = self.pi_offer(MAC_A, 0x423)
        self.assertNotIn(pxeserver.OPT_VENDOR_CLASS_IDENTIFIER,
                         offer.options)


class KnownClientsChecks:
    """known_clients_only, shared by proxyDHCP and the boot server."""

    def setUp(self):
        super().setUp()
        ini = os.path.join(self.folder, "pxe.ini")
        with open(ini, "w", encoding="utf-8") as handle:
            handle.write(f"[dhcp]\nknown_clients_only = yes\n\n"
                         f"[host:{harness.mac_text(MAC_A)}]\n"
                         f"boot_file = special.efi\n\n"
                         f"[host:{harness.mac_text(MARKER_MAC)}]\n")
        self.start_server(extra_args=("--config", ini))

    def known_request(self, mac, xid):
        return build_request(self.marker_type, mac=mac, xid=xid,
                             ciaddr=str(SERVER_IP), options=pxe_options())

    def test_unknown_mac_gets_nothing(self):
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            self.send(self.known_request(MAC_B, 0x501))
            self.assert_no_reply(0x501)
        self.assertTrue(any("not a known client" in line
                            and harness.mac_text(MAC_B) in line
                            for line in logs.output), logs.output)

    def test_known_mac_gets_host_boot_file(self):
        reply = self.exchange(self.known_request(MAC_A, 0x502), 0x502)
        self.assertEqual(reply.file, b"special.efi")


class TestProxyKnownClients(KnownClientsChecks, ProxyServerTestCase):
    pass


class TestBootServerKnownClients(KnownClientsChecks, ProxyServerTestCase):

    server_class = LoopbackBootServer
    marker_type = MessageType.DHCPINFORM


class TestProxyRobustness(ProxyServerTestCase):

    def setUp(self):
        super().setUp()
        self.start_server()

    def test_server_answers_after_malformed(self):
        with self.assertLogs("pxeserver.dhcp", "WARNING"):
            for _, data, _ in MALFORMED_PACKETS:
                self.send(data)
            offer = self.exchange(build_request(
                MessageType.DHCPDISCOVER, xid=0x601, options=pxe_options()),
                0x601)
        self.assertEqual(offer.message_type, MessageType.DHCPOFFER)

    def test_malformed_packet_warned(self):
        with self.assertLogs("pxeserver.dhcp", "WARNING") as logs:
            self.send(b"\x01" * 10)
            self.settle()
        self.assertTrue(any("malformed DHCP packet" in line
                            for line in logs.output), logs.output)

    def test_bootreply_ignored(self):
        packet = pxeserver.DHCPPacket(
            op=pxeserver.BOOTREPLY, xid=0x602, chaddr=MAC_A,
            options={pxeserver.OPT_MESSAGE_TYPE:
                     bytes((MessageType.DHCPOFFER,)),
                     **pxe_options()})
        self.send(pxeserver.build_dhcp_packet(packet))
        self.assert_no_reply(0x602)

    def test_non_ethernet_hlen_dropped(self):
        self.send(build_request(MessageType.DHCPDISCOVER, xid=0x603,
                                hlen=8, options=pxe_options()))
        self.assert_no_reply(0x603)

    def test_malformed_option_43_still_offered(self):
        options = pxe_options()
        options[pxeserver.OPT_VENDOR_SPECIFIC] = b"\x47\x09"
        offer = self.exchange(build_request(
            MessageType.DHCPDISCOVER, xid=0x604, options=options), 0x604)
        self.assertEqual(offer.options[pxeserver.OPT_VENDOR_SPECIFIC],
                         BIOS_VENDOR_OPTIONS)


# An interface record for the probe helpers; nothing is sent on it.
PROBE_INTERFACE = pxeserver.InterfaceInfo(
    "lo", 1, ipaddress.IPv4Address("192.0.2.1"),
    ipaddress.IPv4Network("192.0.2.0/24"), 1500,
    bytes.fromhex("020000000042"))
OTHER_SERVER = ipaddress.IPv4Address("192.0.2.2")


def server_reply(op=pxeserver.BOOTREPLY, yiaddr="192.0.2.60",
                 siaddr="0.0.0.0", server_id=OTHER_SERVER.packed):
    """Return the bytes of an OFFER as another DHCP server sends it."""
    options = {pxeserver.OPT_MESSAGE_TYPE: bytes((MessageType.DHCPOFFER,))}
    if server_id is not None:
        options[pxeserver.OPT_SERVER_ID] = server_id
    packet = pxeserver.DHCPPacket(
        op=op, xid=0x700, yiaddr=ipaddress.IPv4Address(yiaddr),
        siaddr=ipaddress.IPv4Address(siaddr), chaddr=PROBE_INTERFACE.mac,
        options=options)
    return pxeserver.build_dhcp_packet(packet)


class TestProbeDiscover(unittest.TestCase):
    """build_probe_discover: the DHCPDISCOVER of auto mode."""

    def setUp(self):
        self.data = pxeserver.build_probe_discover(PROBE_INTERFACE,
                                                   0x12345678)
        self.packet = pxeserver.parse_dhcp_packet(self.data)

    def test_probe_is_discover(self):
        self.assertEqual(self.packet.op, pxeserver.BOOTREQUEST)
        self.assertEqual(self.packet.message_type, MessageType.DHCPDISCOVER)

    def test_probe_carries_xid(self):
        self.assertEqual(self.packet.xid, 0x12345678)

    def test_probe_uses_interface_mac(self):
        self.assertEqual(self.packet.mac, PROBE_INTERFACE.mac)

    def test_probe_asks_for_broadcast_reply(self):
        self.assertEqual(self.packet.flags, pxeserver.FLAG_BROADCAST)

    def test_probe_is_not_pxe_request(self):
        # A PXE vendor class would draw offers from proxyDHCP servers,
        # which hand out no address and so reveal no DHCP server.
        self.assertNotIn(pxeserver.OPT_VENDOR_CLASS_IDENTIFIER,
                         self.packet.options)

    def test_probe_requests_no_address(self):
        self.assertNotIn(pxeserver.OPT_REQUESTED_IP, self.packet.options)

    def test_probe_padded_to_bootp_minimum(self):
        self.assertGreaterEqual(len(self.data),
                                pxeserver.BOOTP_MIN_PACKET_BYTES)


class TestReadServerReply(unittest.TestCase):
    """read_server_reply: which replies reveal another DHCP server."""

    OWN_ADDRESS = PROBE_INTERFACE.address

    def read(self, data):
        return pxeserver.read_server_reply(data, self.OWN_ADDRESS)

    def test_offer_names_server_identifier(self):
        self.assertEqual(self.read(server_reply()), OTHER_SERVER)

    def test_siaddr_used_without_identifier(self):
        self.assertEqual(
            self.read(server_reply(siaddr="192.0.2.3", server_id=None)),
            ipaddress.IPv4Address("192.0.2.3"))

    def test_siaddr_used_for_short_identifier(self):
        self.assertEqual(
            self.read(server_reply(siaddr="192.0.2.3", server_id=b"\xc0")),
            ipaddress.IPv4Address("192.0.2.3"))

    def test_own_reply_ignored(self):
        self.assertIsNone(self.read(server_reply(
            server_id=self.OWN_ADDRESS.packed)))

    def test_reply_without_server_ignored(self):
        self.assertIsNone(self.read(server_reply(server_id=None)))

    def test_proxy_offer_ignored(self):
        self.assertIsNone(self.read(server_reply(yiaddr="0.0.0.0")))

    def test_request_ignored(self):
        self.assertIsNone(self.read(server_reply(op=pxeserver.BOOTREQUEST)))

    def test_malformed_packets_ignored(self):
        for case, data, _ in MALFORMED_PACKETS:
            with self.subTest(case=case):
                self.assertIsNone(self.read(data))


class TestChooseMode(unittest.TestCase):
    """choose_mode, with the probe replaced so that nothing is sent."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="pxeserver-mode-")
        self.addCleanup(shutil.rmtree, self.root)
        patcher = mock.patch.object(pxeserver, "probe_dhcp_server")
        self.probe = patcher.start()
        self.addCleanup(patcher.stop)

    def choose(self, mode):
        config = pxeserver.build_config(pxeserver.build_parser().parse_args(
            ["--iface", "lo", "--root", self.root, "--mode", mode]))
        return pxeserver.choose_mode(config, PROBE_INTERFACE,
                                     PROBE_INTERFACE.address)

    def test_configured_mode_returned_unchanged(self):
        for mode in ("full", "proxy", "off"):
            with self.subTest(mode=mode):
                self.assertEqual(self.choose(mode), mode)

    def test_configured_mode_sends_no_probe(self):
        for mode in ("full", "proxy", "off"):
            self.choose(mode)
        self.probe.assert_not_called()

    def test_auto_without_server_chooses_full(self):
        self.probe.return_value = None
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            self.assertEqual(self.choose("auto"), "full")
        self.assertIn("choosing full mode", logs.output[0])

    def test_auto_with_server_chooses_proxy(self):
        self.probe.return_value = OTHER_SERVER
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            self.assertEqual(self.choose("auto"), "proxy")
        self.assertIn(f"DHCP server {OTHER_SERVER} answered", logs.output[0])
        self.assertIn("choosing proxy mode", logs.output[0])

    def test_auto_probes_with_own_address(self):
        self.probe.return_value = None
        with self.assertLogs("pxeserver.dhcp", "INFO"):
            self.choose("auto")
        self.probe.assert_called_once_with(PROBE_INTERFACE,
                                           PROBE_INTERFACE.address)

    def test_auto_probe_failure_chooses_proxy(self):
        self.probe.side_effect = OSError(98, "Address already in use")
        with self.assertLogs("pxeserver.dhcp", "WARNING") as logs:
            self.assertEqual(self.choose("auto"), "proxy")
        self.assertIn("cannot probe lo", logs.output[0])


if __name__ == "__main__":
    unittest.main()
