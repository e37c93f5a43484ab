"""Unit tests of the TFTP packet layer and the transfer rules of pxeserver.

No sockets: these tests call the parsers, builders, option negotiation,
netascii conversion and the retransmission timer directly.
"""

import io
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import pxeserver  # noqa: E402  (needs the path above)
from pxeserver import PacketError  # noqa: E402
from pxeserver import TFTPOpcode  # noqa: E402
from pxeserver import TFTPRequest  # noqa: E402
from pxeserver import TransferOptions  # noqa: E402


RRQ = b"\x00\x01"
WRQ = b"\x00\x02"

# Requests that parse_tftp_request must reject, each with a PacketError.
MALFORMED_REQUESTS = {
    "empty packet": b"",
    "one byte": b"\x00",
    "unknown opcode 9": b"\x00\x09boot.bin\x00octet\x00",
    "DATA opcode": b"\x00\x03boot.bin\x00octet\x00",
    "ACK opcode": b"\x00\x04\x00\x01",
    "opcode only": RRQ,
    "no terminating NUL": RRQ + b"boot.bin\x00octet",
    "name without NUL": RRQ + b"boot.bin",
    "no mode": RRQ + b"boot.bin\x00",
    "empty file name": RRQ + b"\x00octet\x00",
    "mode not ASCII": RRQ + b"boot.bin\x00oct\xe9t\x00",
    "odd option list": RRQ + b"boot.bin\x00octet\x00blksize\x00",
    "NULs before an option": (
        RRQ + b"boot.bin\x00octet\x00\x00\x00tsize\x000\x00"),
    "empty option name": RRQ + b"boot.bin\x00octet\x00\x001468\x00",
    "option value too long": (
        RRQ + b"boot.bin\x00octet\x00blksize\x00"
        + b"1" * (pxeserver.TFTP_MAX_OPTION_VALUE_BYTES + 1) + b"\x00"),
    "too long packet": (
        RRQ + b"a" * (pxeserver.TFTP_MAX_REQUEST_BYTES - 8)
        + b"\x00octet\x00"),
}

# Replies that parse_tftp_reply must reject inside a transfer.
MALFORMED_REPLIES = {
    "empty packet": b"",
    "ACK without block": b"\x00\x04\x00",
    "DATA without block": b"\x00\x03\x00",
    "ERROR without code": b"\x00\x05\x00",
    "RRQ inside a transfer": RRQ + b"boot.bin\x00octet\x00",
    "OACK inside a transfer": b"\x00\x06blksize\x001468\x00",
    "unknown opcode 7": b"\x00\x07\x00\x01",
}

# OACKs that parse_oack must reject.
MALFORMED_OACKS = {
    "not an OACK": b"\x00\x04\x00\x00",
    "no terminating NUL": b"\x00\x06blksize\x001468",
    "option without value": b"\x00\x06blksize\x00",
}


def make_request(options, opcode=TFTPOpcode.RRQ):
    return TFTPRequest(opcode, "boot.bin", "octet", options)


def negotiate(options, max_blksize=1468, max_windowsize=64,
              file_size=1000, opcode=TFTPOpcode.RRQ):
    return pxeserver.negotiate_options(make_request(options, opcode),
                                       max_blksize, max_windowsize,
                                       file_size)


class TestTFTPRequestParsing(unittest.TestCase):

    def test_malformed_requests_raise_packet_error(self):
        for label, packet in MALFORMED_REQUESTS.items():
            with self.subTest(label):
                with self.assertRaises(PacketError):
                    pxeserver.parse_tftp_request(packet)

    def test_plain_rrq_parses_fields(self):
        packet = RRQ + b"pxelinux.0\x00octet\x00"
        request = pxeserver.parse_tftp_request(packet)
        self.assertEqual(request, TFTPRequest(TFTPOpcode.RRQ, "pxelinux.0",
                                              "octet", {}))

    def test_wrq_opcode_parsed(self):
        request = pxeserver.parse_tftp_request(WRQ + b"up.bin\x00octet\x00")
        self.assertEqual(request.opcode, TFTPOpcode.WRQ)

    def test_request_round_trip_with_options(self):
        request = TFTPRequest(TFTPOpcode.RRQ, "boot/ipxe.efi", "octet",
                              {"blksize": "1468", "tsize": "0",
                               "windowsize": "4"})
        packet = pxeserver.build_tftp_request(
            request.opcode, request.filename, request.mode, request.options)
        self.assertEqual(pxeserver.parse_tftp_request(packet), request)

    def test_request_round_trip_undecodable_name(self):
        # A name that is not UTF-8 survives as surrogate escapes.
        request = TFTPRequest(TFTPOpcode.WRQ, "boot/\udcff\udcfe.bin",
                              "netascii", {})
        packet = pxeserver.build_tftp_request(
            request.opcode, request.filename, request.mode)
        self.assertIn(b"boot/\xff\xfe.bin\x00", packet)
        self.assertEqual(pxeserver.parse_tftp_request(packet), request)

    def test_padding_nuls_after_options_accepted(self):
        packet = RRQ + b"boot.bin\x00octet\x00tsize\x000\x00\x00\x00\x00"
        request = pxeserver.parse_tftp_request(packet)
        self.assertEqual(request.options, {"tsize": "0"})

    def test_padding_nuls_after_mode_accepted(self):
        packet = RRQ + b"boot.bin\x00octet\x00\x00\x00"
        request = pxeserver.parse_tftp_request(packet)
        self.assertEqual(request.options, {})

    def test_empty_value_of_last_option_parsed(self):
        packet = RRQ + b"boot.bin\x00octet\x00multicast\x00\x00"
        request = pxeserver.parse_tftp_request(packet)
        self.assertEqual(request.options, {"multicast": ""})

    def test_empty_value_before_other_options_parsed(self):
        packet = (RRQ + b"boot.bin\x00octet\x00multicast\x00\x00"
                  b"tsize\x000\x00")
        request = pxeserver.parse_tftp_request(packet)
        self.assertEqual(request.options, {"multicast": "", "tsize": "0"})

    def test_option_names_case_insensitive(self):
        packet = (RRQ + b"boot.bin\x00octet\x00BlkSize\x001024\x00"
                  b"TSIZE\x000\x00")
        request = pxeserver.parse_tftp_request(packet)
        self.assertEqual(request.options, {"blksize": "1024", "tsize": "0"})

    def test_mode_case_insensitive(self):
        request = pxeserver.parse_tftp_request(RRQ + b"a\x00NetASCII\x00")
        self.assertEqual(request.mode, "netascii")

    def test_repeated_option_keeps_first(self):
        packet = (RRQ + b"boot.bin\x00octet\x00blksize\x00512\x00"
                  b"BLKSIZE\x001468\x00")
        request = pxeserver.parse_tftp_request(packet)
        self.assertEqual(request.options, {"blksize": "512"})

    def test_request_at_size_limit_accepted(self):
        name_bytes = pxeserver.TFTP_MAX_REQUEST_BYTES - 9
        packet = RRQ + b"a" * name_bytes + b"\x00octet\x00"
        self.assertEqual(len(packet), pxeserver.TFTP_MAX_REQUEST_BYTES)
        request = pxeserver.parse_tftp_request(packet)
        self.assertEqual(len(request.filename), name_bytes)

    def test_option_value_at_limit_accepted(self):
        value = b"1" * pxeserver.TFTP_MAX_OPTION_VALUE_BYTES
        packet = RRQ + b"boot.bin\x00octet\x00tsize\x00" + value + b"\x00"
        request = pxeserver.parse_tftp_request(packet)
        self.assertEqual(request.options["tsize"], value.decode())


class TestTFTPReplyPackets(unittest.TestCase):

    def test_malformed_replies_raise_packet_error(self):
        for label, packet in MALFORMED_REPLIES.items():
            with self.subTest(label):
                with self.assertRaises(PacketError):
                    pxeserver.parse_tftp_reply(packet)

    def test_data_round_trip(self):
        packet = pxeserver.build_data(65535, b"payload")
        self.assertEqual(packet, b"\x00\x03\xff\xffpayload")
        self.assertEqual(pxeserver.parse_tftp_reply(packet),
                         pxeserver.TFTPData(65535, b"payload"))

    def test_empty_data_round_trip(self):
        packet = pxeserver.build_data(0, b"")
        self.assertEqual(pxeserver.parse_tftp_reply(packet),
                         pxeserver.TFTPData(0, b""))

    def test_ack_round_trip(self):
        packet = pxeserver.build_ack(7)
        self.assertEqual(packet, b"\x00\x04\x00\x07")
        self.assertEqual(pxeserver.parse_tftp_reply(packet),
                         pxeserver.TFTPAck(7))

    def test_error_uses_rfc_text_by_default(self):
        packet = pxeserver.build_error(pxeserver.TFTPErrorCode.FILE_NOT_FOUND)
        self.assertEqual(packet, b"\x00\x05\x00\x01File not found\x00")

    def test_error_round_trip_custom_text(self):
        packet = pxeserver.build_error(pxeserver.TFTPErrorCode.NOT_DEFINED,
                                       "server busy")
        self.assertEqual(pxeserver.parse_tftp_reply(packet),
                         pxeserver.TFTPErrorPacket(0, "server busy"))

    def test_error_without_terminating_nul_parsed(self):
        packet = b"\x00\x05\x00\x08no nul"
        self.assertEqual(pxeserver.parse_tftp_reply(packet),
                         pxeserver.TFTPErrorPacket(8, "no nul"))


class TestTFTPOackPackets(unittest.TestCase):

    def test_oack_round_trip(self):
        options = {"blksize": "1468", "tsize": "1038336",
                   "windowsize": "4", "timeout": "3"}
        packet = pxeserver.build_oack(options)
        self.assertEqual(pxeserver.parse_oack(packet), options)

    def test_oack_keeps_option_order(self):
        packet = pxeserver.build_oack({"tsize": 5, "blksize": 8})
        self.assertEqual(packet, b"\x00\x06tsize\x005\x00blksize\x008\x00")

    def test_empty_oack_round_trip(self):
        packet = pxeserver.build_oack({})
        self.assertEqual(pxeserver.parse_oack(packet), {})

    def test_malformed_oacks_raise_packet_error(self):
        for label, packet in MALFORMED_OACKS.items():
            with self.subTest(label):
                with self.assertRaises(PacketError):
                    pxeserver.parse_oack(packet)


class TestTFTPOptionNegotiation(unittest.TestCase):

    def test_no_options_give_empty_oack(self):
        oack, options = negotiate({})
        self.assertEqual(oack, {})
        self.assertEqual(options, TransferOptions())

    def test_blksize_below_minimum_ignored(self):
        oack, options = negotiate({"blksize": "7"})
        self.assertNotIn("blksize", oack)
        self.assertEqual(options.blksize, pxeserver.TFTP_DEFAULT_BLKSIZE)

    def test_blksize_minimum_accepted(self):
        oack, options = negotiate({"blksize": "8"})
        self.assertEqual(oack, {"blksize": 8})
        self.assertEqual(options.blksize, 8)

    def test_blksize_capped_at_max(self):
        oack, options = negotiate({"blksize": "9000"}, max_blksize=1468)
        self.assertEqual(oack, {"blksize": 1468})
        self.assertEqual(options.blksize, 1468)

    def test_blksize_not_a_number_ignored(self):
        oack, options = negotiate({"blksize": "big"})
        self.assertEqual(oack, {})
        self.assertEqual(options.blksize, pxeserver.TFTP_DEFAULT_BLKSIZE)

    def test_timeout_zero_ignored(self):
        oack, options = negotiate({"timeout": "0"})
        self.assertEqual(oack, {})
        self.assertIsNone(options.timeout)

    def test_timeout_256_ignored(self):
        oack, options = negotiate({"timeout": "256"})
        self.assertEqual(oack, {})
        self.assertIsNone(options.timeout)

    def test_timeout_limits_accepted(self):
        for seconds in (pxeserver.TFTP_MIN_TIMEOUT_SECONDS,
                        pxeserver.TFTP_MAX_TIMEOUT_SECONDS):
            with self.subTest(seconds=seconds):
                oack, options = negotiate({"timeout": str(seconds)})
                self.assertEqual(oack, {"timeout": seconds})
                self.assertEqual(options.timeout, float(seconds))

    def test_tsize_echoes_file_size_for_rrq(self):
        oack, options = negotiate({"tsize": "0"}, file_size=123456)
        self.assertEqual(oack, {"tsize": 123456})
        self.assertIsNone(options.tsize)

    def test_tsize_kept_for_wrq(self):
        oack, options = negotiate({"tsize": "5000"}, file_size=None,
                                  opcode=TFTPOpcode.WRQ)
        self.assertEqual(oack, {"tsize": 5000})
        self.assertEqual(options.tsize, 5000)

    def test_windowsize_capped_at_max(self):
        oack, options = negotiate({"windowsize": "100"}, max_windowsize=8)
        self.assertEqual(oack, {"windowsize": 8})
        self.assertEqual(options.windowsize, 8)

    def test_windowsize_capped_by_window_bytes(self):
        blksize = pxeserver.TFTP_MAX_BLKSIZE
        expected = pxeserver.TFTP_MAX_WINDOW_BYTES // blksize
        oack, options = negotiate(
            {"windowsize": "1000", "blksize": str(blksize)},
            max_blksize=blksize, max_windowsize=1000)
        self.assertLess(expected, 1000)
        self.assertEqual(oack["windowsize"], expected)
        self.assertEqual(options.windowsize, expected)

    def test_windowsize_zero_ignored(self):
        oack, options = negotiate({"windowsize": "0"})
        self.assertEqual(oack, {})
        self.assertEqual(options.windowsize, 1)

    def test_unknown_options_never_echoed(self):
        oack, _ = negotiate({"multicast": "", "rollover": "0",
                             "blksize": "1024"})
        self.assertEqual(oack, {"blksize": 1024})

    def test_only_unknown_options_give_empty_oack(self):
        oack, _ = negotiate({"utimeout": "500000", "x-custom": "1"})
        self.assertEqual(oack, {})

    def test_oack_follows_request_order(self):
        oack, _ = negotiate({"tsize": "0", "windowsize": "4",
                             "blksize": "1024"})
        self.assertEqual(list(oack), ["tsize", "windowsize", "blksize"])


class TestNetascii(unittest.TestCase):

    def test_lf_becomes_cr_lf(self):
        self.assertEqual(pxeserver.to_netascii(b"a\nb\n"), b"a\r\nb\r\n")

    def test_bare_cr_becomes_cr_nul(self):
        self.assertEqual(pxeserver.to_netascii(b"a\rb"), b"a\r\0b")

    def test_cr_lf_input_converted(self):
        self.assertEqual(pxeserver.to_netascii(b"dos\r\n"), b"dos\r\0\r\n")

    def test_from_netascii_inverts_conversion(self):
        text = b"one\ntwo\r\nthree\rfour\0\r\r\n\n"
        self.assertEqual(
            pxeserver.from_netascii(pxeserver.to_netascii(text)), text)

    def test_netascii_size_counts_added_bytes(self):
        text = b"one\ntwo\r\nthree\rfour"
        size = pxeserver.netascii_size(io.BytesIO(text))
        self.assertEqual(size, len(b"one\r\ntwo\r\0\r\nthree\r\0four"))

    def test_netascii_size_across_chunks(self):
        chunk = pxeserver.NetasciiReader.CHUNK_BYTES
        text = b"x" * (chunk - 1) + b"\r\n" + b"y\n" * 1000
        size = pxeserver.netascii_size(io.BytesIO(text))
        self.assertEqual(size, len(pxeserver.to_netascii(text)))

    def test_netascii_size_of_empty_file(self):
        self.assertEqual(pxeserver.netascii_size(io.BytesIO(b"")), 0)

    def test_reader_blocks_match_whole_conversion(self):
        chunk = pxeserver.NetasciiReader.CHUNK_BYTES
        text = (b"line\n" * (chunk // 5)) + b"\r" + b"tail\n"
        reader = pxeserver.NetasciiReader(io.BytesIO(text))
        blocks = []
        while True:
            block = reader.read(512)
            blocks.append(block)
            if len(block) < 512:
                break
        self.assertEqual(b"".join(blocks), pxeserver.to_netascii(text))


class TestRetransmitTimer(unittest.TestCase):

    def test_initial_timeout_one_second(self):
        timer = pxeserver.RetransmitTimer(5.0)
        self.assertEqual(timer.rto, pxeserver.TFTP_INITIAL_RTO_SECONDS)
        self.assertEqual(timer.rto, 1.0)

    def test_initial_timeout_limited_by_ceiling(self):
        timer = pxeserver.RetransmitTimer(0.5)
        self.assertEqual(timer.rto, 0.5)

    def test_fast_round_trip_held_at_floor(self):
        timer = pxeserver.RetransmitTimer(5.0)
        timer.on_sample(0.0001)
        self.assertEqual(timer.rto, pxeserver.TFTP_MIN_RTO_SECONDS)

    def test_slow_round_trip_held_at_ceiling(self):
        timer = pxeserver.RetransmitTimer(5.0)
        timer.on_sample(3.0)
        self.assertEqual(timer.rto, 5.0)

    def test_round_trip_sets_timeout(self):
        # First sample: rto = rtt + 4 * (rtt / 2) = 3 * rtt (RFC 6298 2.2).
        timer = pxeserver.RetransmitTimer(5.0)
        timer.on_sample(0.5)
        self.assertAlmostEqual(timer.rto, 1.5)

    def test_timeouts_double_the_timeout(self):
        timer = pxeserver.RetransmitTimer(5.0)
        timer.on_sample(0.0001)
        timer.on_timeout()
        self.assertAlmostEqual(timer.rto, 0.4)
        timer.on_timeout()
        self.assertAlmostEqual(timer.rto, 0.8)

    def test_backoff_stops_at_ceiling(self):
        timer = pxeserver.RetransmitTimer(2.0)
        for _ in range(20):
            timer.on_timeout()
        self.assertEqual(timer.rto, 2.0)

    def test_sample_resets_backoff(self):
        timer = pxeserver.RetransmitTimer(5.0)
        timer.on_sample(0.0001)
        timer.on_timeout()
        timer.on_timeout()
        timer.on_sample(0.0001)
        self.assertAlmostEqual(timer.rto, pxeserver.TFTP_MIN_RTO_SECONDS)

    def test_fixed_timeout_ignores_samples(self):
        timer = pxeserver.RetransmitTimer(5.0, fixed=3.0)
        self.assertEqual(timer.rto, 3.0)
        timer.on_sample(0.0001)
        self.assertEqual(timer.rto, 3.0)

    def test_fixed_timeout_ignores_backoff(self):
        timer = pxeserver.RetransmitTimer(5.0, fixed=3.0)
        timer.on_timeout()
        timer.on_timeout()
        self.assertEqual(timer.rto, 3.0)

    def test_fixed_timeout_above_ceiling_kept(self):
        # The client's RFC 2349 timeout is used as is, even above the
        # server's own ceiling.
        timer = pxeserver.RetransmitTimer(0.5, fixed=3.0)
        self.assertEqual(timer.rto, 3.0)


class TestResolveUnderRoot(unittest.TestCase):
    """Path checks without sockets.  The server tests repeat them on the
    wire."""

    def setUp(self):
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        base = os.path.realpath(folder.name)
        self.root = os.path.join(base, "root")
        os.makedirs(os.path.join(self.root, "Boot"))
        with open(os.path.join(self.root, "Boot", "Menu.cfg"), "wb"):
            pass
        os.makedirs(os.path.join(base, "root-private"))

    def resolve(self, name):
        return pxeserver.resolve_under_root(self.root, name)

    def assert_rejected(self, name, code):
        with self.assertRaises(pxeserver.TFTPError) as caught:
            self.resolve(name)
        self.assertEqual(caught.exception.code, code)

    def test_backslashes_read_as_slashes(self):
        self.assertEqual(self.resolve("\\Boot\\Menu.cfg"),
                         os.path.join(self.root, "Boot", "Menu.cfg"))

    def test_case_insensitive_match(self):
        self.assertEqual(self.resolve("boot/menu.CFG"),
                         os.path.join(self.root, "Boot", "Menu.cfg"))

    def test_parent_reference_rejected(self):
        self.assert_rejected("../x", pxeserver.TFTPErrorCode.ACCESS_VIOLATION)

    def test_sibling_with_root_prefix_rejected(self):
        self.assert_rejected("../root-private/x",
                             pxeserver.TFTPErrorCode.ACCESS_VIOLATION)

    def test_only_separators_rejected(self):
        self.assert_rejected("/\\/", pxeserver.TFTPErrorCode.FILE_NOT_FOUND)


if __name__ == "__main__":
    unittest.main()
