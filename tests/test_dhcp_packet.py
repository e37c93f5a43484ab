"""Tests of the DHCP packet layer: parse_dhcp_packet and build_dhcp_packet.

No sockets.  Malformed inputs are a table, each row checked for
PacketError and for the field its message names.  Real requests captured
from QEMU firmware are kept here as hex, and the server and boot-policy
tests import them from this module.
"""

import ipaddress
import struct
import sys
import unittest

from support import REPO_ROOT

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pxeserver  # noqa: E402  (needs REPO_ROOT on sys.path)


def _captured(header_hex, options_hex):
    """Rebuild a captured request from its 44 header bytes and options.

    The 192 bytes of sname and file between them were all zero in every
    capture, so they are not spelled out.
    """
    header = bytes.fromhex("".join(header_hex))
    options = bytes.fromhex("".join(options_hex))
    return header + bytes(192) + options


# Captured with QEMU 7.2 on Debian 12: qemu-system-x86_64 -boot n with an
# e1000 NIC (SeaBIOS runs the iPXE ROM of ipxe-qemu) and "-netdev user"
# with a filter-dump, inside a network namespace of its own.  The DISCOVER
# carries option 93 = 0, option 60 "PXEClient:Arch:00000:UNDI:002001",
# option 77 as the 4 raw bytes "iPXE", option 175, 61 and a zero UUID in
# option 97.  The REQUEST selects the QEMU user-mode server 10.0.2.2.
SEABIOS_IPXE_MAC = bytes.fromhex("525400123456")
SEABIOS_IPXE_XID = 0xEBC31910
SEABIOS_IPXE_DISCOVER = _captured(
    ("01010600ebc31910000400000000000000000000000000000000000052540012",
     "345600000000000000000000"),
    ("63825363350101390205c05d0200005e030102013c20505845436c69656e743a",
     "417263683a30303030303a554e44493a3030323030314d046950584537170103",
     "06070c0f111a2b3c4243778081828384858687afcbaf30b105018086100eeb03",
     "0100001701012201011301011101012701011901012901011001022101011501",
     "011801011201013d070152540012345661110000000000000000000000000000",
     "000000ff"))
SEABIOS_IPXE_REQUEST = _captured(
    ("01010600ebc31910001200000000000000000000000000000000000052540012",
     "345600000000000000000000"),
    ("63825363350103390205c05d0200005e030102013c20505845436c69656e743a",
     "417263683a30303030303a554e44493a3030323030314d046950584537170103",
     "06070c0f111a2b3c4243778081828384858687afcbaf30b105018086100eeb03",
     "0100001701012201011301011101012701011901012901011001022101011501",
     "011801011201013d070152540012345661110000000000000000000000000000",
     "00000036040a00020232040a00020fff"))
SEABIOS_IPXE_SERVER_ID = ipaddress.IPv4Address("10.0.2.2")

# Captured the same way from OVMF (Debian 12 package ovmf, OVMF_CODE_4M.fd,
# -machine q35, virtio-net-pci with romfile= so the firmware's own PXE
# runs).  It sets the broadcast flag, sends option 93 = 7, option 60
# "PXEClient:Arch:00007:UNDI:003000", option 97 and no option 61 or 77.
OVMF_MAC = bytes.fromhex("525400abcdef")
OVMF_XID = 0x8CBD8837
OVMF_DISCOVER = _captured(
    ("010106008cbd88370000800000000000000000000000000000000000525400ab",
     "cdef00000000000000000000"),
    ("63825363350101390205c037230102030405060c0d0f111216171c28292a2b32",
     "33363a3b3c424361808182838485868761110000000000000000000000000000",
     "0000005e030103005d0200073c20505845436c69656e743a417263683a303030",
     "30373a554e44493a303033303030ff"))

OPTIONS_OFFSET = pxeserver.BOOTP_HEADER.size + len(pxeserver.MAGIC_COOKIE)
DISCOVER_OPTION = bytes((pxeserver.OPT_MESSAGE_TYPE, 1,
                         pxeserver.DHCPMessageType.DHCPDISCOVER))


def raw_request(options_area, hlen=pxeserver.ETHERNET_ADDRESS_LENGTH,
                cookie=pxeserver.MAGIC_COOKIE, sname=b"", file=b""):
    """Return request bytes with a hand-made options area after the cookie.

    The options area is taken as given, so it can be malformed on purpose.
    """
    header = pxeserver.BOOTP_HEADER.pack(
        pxeserver.BOOTREQUEST, pxeserver.HTYPE_ETHERNET, hlen, 0,
        0x12345678, 0, 0, bytes(4), bytes(4), bytes(4), bytes(4),
        SEABIOS_IPXE_MAC, sname, file)
    return header + cookie + options_area


def option_layout(data):
    """Walk the options area of a built packet.

    Returns (codes, end_offset): the option codes in wire order, PAD
    included as 0, and the offset of END, or None when END is missing.
    """
    codes = []
    offset = OPTIONS_OFFSET
    while offset < len(data):
        code = data[offset]
        if code == pxeserver.OPT_END:
            return codes, offset
        codes.append(code)
        if code == pxeserver.OPT_PAD:
            offset += 1
            continue
        offset += 2 + data[offset + 1]
    return codes, None


def option_lengths(data, target):
    """Return the length byte of each instance of option ``target``."""
    lengths = []
    offset = OPTIONS_OFFSET
    while offset < len(data) and data[offset] != pxeserver.OPT_END:
        code = data[offset]
        if code == pxeserver.OPT_PAD:
            offset += 1
            continue
        if code == target:
            lengths.append(data[offset + 1])
        offset += 2 + data[offset + 1]
    return lengths


# Malformed requests: (case, bytes, text the PacketError message contains).
MALFORMED_PACKETS = (
    ("truncated header", SEABIOS_IPXE_DISCOVER[:100], "too short"),
    ("header without cookie",
     SEABIOS_IPXE_DISCOVER[:pxeserver.BOOTP_HEADER.size], "too short"),
    ("bad magic cookie",
     raw_request(DISCOVER_OPTION + b"\xff", cookie=b"\x63\x82\x53\x64"),
     "magic cookie"),
    ("option past the end",
     raw_request(DISCOVER_OPTION + b"\x0c\x0aab"), "has length 10"),
    ("option without length byte",
     raw_request(DISCOVER_OPTION + b"\x0c"), "no length byte"),
    ("no option 53", raw_request(b"\x0c\x02ab\xff"), "option 53"),
    ("option 53 of length 2", raw_request(b"\x35\x02\x01\x01\xff"),
     "option 53 has length 2"),
    ("option 53 of length 0", raw_request(b"\x35\x00\xff"),
     "option 53 has length 0"),
    ("option 53 type 0", raw_request(b"\x35\x01\x00\xff"),
     "unknown message type 0"),
    ("option 53 type 9", raw_request(b"\x35\x01\x09\xff"),
     "unknown message type 9"),
    ("hlen 17", raw_request(DISCOVER_OPTION + b"\xff", hlen=17),
     "hlen 17"),
    ("overload into file past its end",
     raw_request(DISCOVER_OPTION + b"\x34\x01\x01\xff",
                 file=b"\x0c\x7f" + b"a" * 126), "in file"),
    ("overload into sname without length byte",
     raw_request(DISCOVER_OPTION + b"\x34\x01\x02\xff",
                 sname=b"\x00" * 63 + b"\x0c"), "in sname"),
)


class TestDHCPPacketParse(unittest.TestCase):

    def test_malformed_packets_raise_packet_error(self):
        for case, data, expected_text in MALFORMED_PACKETS:
            with self.subTest(case=case):
                with self.assertRaisesRegex(pxeserver.PacketError,
                                            expected_text):
                    pxeserver.parse_dhcp_packet(data)

    def test_empty_overload_option_raises_packet_error(self):
        data = raw_request(DISCOVER_OPTION + b"\x34\x00\xff")
        with self.assertRaises(pxeserver.PacketError):
            pxeserver.parse_dhcp_packet(data)

    def test_seabios_ipxe_discover_fields(self):
        packet = pxeserver.parse_dhcp_packet(SEABIOS_IPXE_DISCOVER)
        self.assertEqual(packet.op, pxeserver.BOOTREQUEST)
        self.assertEqual(packet.xid, SEABIOS_IPXE_XID)
        self.assertEqual(packet.secs, 4)
        self.assertEqual(packet.flags, 0)
        self.assertEqual(packet.mac, SEABIOS_IPXE_MAC)
        self.assertEqual(packet.message_type,
                         pxeserver.DHCPMessageType.DHCPDISCOVER)
        self.assertEqual(packet.options[pxeserver.OPT_CLIENT_ARCH],
                         b"\x00\x00")
        self.assertEqual(packet.options[pxeserver.OPT_USER_CLASS], b"iPXE")
        self.assertIn(pxeserver.OPT_IPXE_ENCAPSULATED, packet.options)
        self.assertEqual(len(packet.options[pxeserver.OPT_CLIENT_UUID]), 17)
        self.assertEqual(
            pxeserver.option_uint16(packet.options,
                                    pxeserver.OPT_MAX_MESSAGE_SIZE), 1472)

    def test_ovmf_discover_fields(self):
        packet = pxeserver.parse_dhcp_packet(OVMF_DISCOVER)
        self.assertEqual(packet.xid, OVMF_XID)
        self.assertEqual(packet.flags, pxeserver.FLAG_BROADCAST)
        self.assertEqual(packet.mac, OVMF_MAC)
        self.assertEqual(packet.options[pxeserver.OPT_CLIENT_ARCH],
                         b"\x00\x07")
        self.assertEqual(
            packet.options[pxeserver.OPT_VENDOR_CLASS_IDENTIFIER],
            b"PXEClient:Arch:00007:UNDI:003000")
        self.assertNotIn(pxeserver.OPT_USER_CLASS, packet.options)

    def test_seabios_ipxe_request_names_server(self):
        packet = pxeserver.parse_dhcp_packet(SEABIOS_IPXE_REQUEST)
        self.assertEqual(packet.message_type,
                         pxeserver.DHCPMessageType.DHCPREQUEST)
        self.assertEqual(
            pxeserver.option_address(packet.options,
                                     pxeserver.OPT_SERVER_ID),
            SEABIOS_IPXE_SERVER_ID)
        self.assertEqual(
            pxeserver.option_address(packet.options,
                                     pxeserver.OPT_REQUESTED_IP),
            ipaddress.IPv4Address("10.0.2.15"))

    def test_captured_requests_rebuild_byte_for_byte(self):
        for name, data in (("seabios discover", SEABIOS_IPXE_DISCOVER),
                           ("seabios request", SEABIOS_IPXE_REQUEST),
                           ("ovmf discover", OVMF_DISCOVER)):
            with self.subTest(capture=name):
                packet = pxeserver.parse_dhcp_packet(data)
                self.assertEqual(pxeserver.build_dhcp_packet(packet), data)

    def test_repeated_options_are_concatenated(self):
        data = raw_request(DISCOVER_OPTION + b"\x2b\x03abc\x2b\x02de"
                           + b"\x2b\x00\x2b\x01f\xff")
        packet = pxeserver.parse_dhcp_packet(data)
        self.assertEqual(packet.options[pxeserver.OPT_VENDOR_SPECIFIC],
                         b"abcdef")

    def test_overload_reads_file_and_sname(self):
        data = raw_request(DISCOVER_OPTION + b"\x34\x01\x03\xff",
                           file=b"\x43\x04boot\xff",
                           sname=b"\x42\x03tft\xff")
        packet = pxeserver.parse_dhcp_packet(data)
        self.assertEqual(packet.options[pxeserver.OPT_BOOTFILE_NAME],
                         b"boot")
        self.assertEqual(packet.options[pxeserver.OPT_TFTP_SERVER_NAME],
                         b"tft")

    def test_overload_file_only_skips_sname(self):
        data = raw_request(DISCOVER_OPTION + b"\x34\x01\x01\xff",
                           file=b"\x43\x04boot\xff",
                           sname=b"\x42\x03tft\xff")
        packet = pxeserver.parse_dhcp_packet(data)
        self.assertIn(pxeserver.OPT_BOOTFILE_NAME, packet.options)
        self.assertNotIn(pxeserver.OPT_TFTP_SERVER_NAME, packet.options)

    def test_overload_joins_parts_in_order(self):
        # RFC 3396 joins the parts in the order options field, file
        # field, sname field.
        data = raw_request(DISCOVER_OPTION + b"\x2b\x02ab\x34\x01\x03\xff",
                           file=b"\x2b\x02cd\xff", sname=b"\x2b\x02ef\xff")
        packet = pxeserver.parse_dhcp_packet(data)
        self.assertEqual(packet.options[pxeserver.OPT_VENDOR_SPECIFIC],
                         b"abcdef")

    def test_missing_end_option_is_accepted(self):
        packet = pxeserver.parse_dhcp_packet(raw_request(DISCOVER_OPTION))
        self.assertEqual(packet.message_type,
                         pxeserver.DHCPMessageType.DHCPDISCOVER)

    def test_pad_bytes_between_options_skipped(self):
        data = raw_request(b"\x00\x00" + DISCOVER_OPTION + b"\x00\x0c\x01h")
        packet = pxeserver.parse_dhcp_packet(data)
        self.assertEqual(packet.options[pxeserver.OPT_HOST_NAME], b"h")

    def test_option_decoders_reject_wrong_lengths(self):
        options = {pxeserver.OPT_SERVER_ID: b"\x7f\x00\x01",
                   pxeserver.OPT_MAX_MESSAGE_SIZE: b"\x05\xc0\x00"}
        self.assertIsNone(
            pxeserver.option_address(options, pxeserver.OPT_SERVER_ID))
        self.assertIsNone(
            pxeserver.option_uint16(options, pxeserver.OPT_MAX_MESSAGE_SIZE))
        self.assertIsNone(
            pxeserver.option_address(options, pxeserver.OPT_REQUESTED_IP))


class TestDHCPPacketBuild(unittest.TestCase):

    def make_reply(self, extra_options=None):
        """Return an OFFER with every header field set and option 53."""
        options = {pxeserver.OPT_MESSAGE_TYPE:
                   bytes((pxeserver.DHCPMessageType.DHCPOFFER,))}
        options.update(extra_options or {})
        return pxeserver.DHCPPacket(
            op=pxeserver.BOOTREPLY, xid=0x01020304, secs=3,
            flags=pxeserver.FLAG_BROADCAST,
            ciaddr=ipaddress.IPv4Address("192.0.2.7"),
            yiaddr=ipaddress.IPv4Address("192.0.2.50"),
            siaddr=ipaddress.IPv4Address("192.0.2.1"),
            giaddr=ipaddress.IPv4Address("192.0.2.254"),
            chaddr=SEABIOS_IPXE_MAC + bytes(10), sname=b"server",
            file=b"undionly.kpxe", options=options)

    def test_parse_of_build_round_trips(self):
        packet = self.make_reply({
            pxeserver.OPT_SERVER_ID: bytes((192, 0, 2, 1)),
            pxeserver.OPT_LEASE_TIME: struct.pack("!I", 3600),
            pxeserver.OPT_HOST_NAME: b"",
            pxeserver.OPT_BOOTFILE_NAME: b"undionly.kpxe"})
        data = pxeserver.build_dhcp_packet(packet)
        self.assertEqual(pxeserver.parse_dhcp_packet(data), packet)

    def test_long_option_split_into_instances(self):
        value = bytes(range(256)) * 2 + b"tail"
        packet = self.make_reply({pxeserver.OPT_VENDOR_SPECIFIC: value})
        data = pxeserver.build_dhcp_packet(packet)
        self.assertEqual(
            option_lengths(data, pxeserver.OPT_VENDOR_SPECIFIC),
            [255, 255, 6])
        self.assertEqual(
            pxeserver.parse_dhcp_packet(data).options[
                pxeserver.OPT_VENDOR_SPECIFIC], value)

    def test_option_of_exactly_255_bytes_stays_whole(self):
        packet = self.make_reply(
            {pxeserver.OPT_VENDOR_SPECIFIC: b"x" * 255})
        data = pxeserver.build_dhcp_packet(packet)
        self.assertEqual(
            option_lengths(data, pxeserver.OPT_VENDOR_SPECIFIC), [255])

    def test_order_puts_listed_codes_first(self):
        packet = self.make_reply({pxeserver.OPT_SUBNET_MASK: bytes(4),
                                  pxeserver.OPT_SERVER_ID: bytes(4)})
        data = pxeserver.build_dhcp_packet(
            packet, order=(pxeserver.OPT_MESSAGE_TYPE,
                           pxeserver.OPT_SERVER_ID))
        codes, _ = option_layout(data)
        self.assertEqual(codes, [pxeserver.OPT_MESSAGE_TYPE,
                                 pxeserver.OPT_SERVER_ID,
                                 pxeserver.OPT_SUBNET_MASK])

    def test_order_with_repeated_codes_encodes_once(self):
        packet = self.make_reply({pxeserver.OPT_SUBNET_MASK: bytes(4)})
        data = pxeserver.build_dhcp_packet(
            packet, order=(pxeserver.OPT_MESSAGE_TYPE,
                           pxeserver.OPT_SUBNET_MASK,
                           pxeserver.OPT_SUBNET_MASK))
        codes, _ = option_layout(data)
        self.assertEqual(codes, [pxeserver.OPT_MESSAGE_TYPE,
                                 pxeserver.OPT_SUBNET_MASK])

    def test_short_reply_padded_to_300_bytes(self):
        data = pxeserver.build_dhcp_packet(self.make_reply())
        self.assertEqual(len(data), pxeserver.BOOTP_MIN_PACKET_BYTES)

    def test_padding_follows_end_option(self):
        data = pxeserver.build_dhcp_packet(
            self.make_reply({pxeserver.OPT_HOST_NAME: b"host"}))
        codes, end = option_layout(data)
        self.assertIsNotNone(end)
        self.assertNotIn(pxeserver.OPT_PAD, codes)
        self.assertEqual(data[end + 1:], bytes(len(data) - end - 1))

    def test_long_reply_not_padded(self):
        packet = self.make_reply(
            {pxeserver.OPT_VENDOR_SPECIFIC: b"x" * 200})
        data = pxeserver.build_dhcp_packet(packet)
        codes, end = option_layout(data)
        self.assertGreater(len(data), pxeserver.BOOTP_MIN_PACKET_BYTES)
        self.assertEqual(end, len(data) - 1)


if __name__ == "__main__":
    unittest.main()
