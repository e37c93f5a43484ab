"""Tests of the boot policy: describe_client and choose_boot_file.

Pure functions of a parsed request and a Config, so no sockets.  Every
boot-file setting gets a distinct name here, because the defaults give
BIOS clients and the fallback the same file and a wrong branch would pass.
"""

import struct
import sys
import unittest

from support import REPO_ROOT

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pxeserver  # noqa: E402  (needs REPO_ROOT on sys.path)

from test_dhcp_packet import OVMF_DISCOVER  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_DISCOVER  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_MAC  # noqa: E402


BOOT_FILES = {
    "bios_file": "bios.kpxe",
    "efi32_file": "efi32.efi",
    "efi64_file": "efi64.efi",
    "arm32_efi_file": "arm32.efi",
    "arm64_efi_file": "arm64.efi",
    "riscv32_efi_file": "riscv32.efi",
    "riscv64_efi_file": "riscv64.efi",
    "uboot_file": "uboot.scr",
    "fallback_file": "fallback.bin",
    "ipxe_script": "script.ipxe",
}

# Option 93 value, boot file expected, reason expected.
ARCH_TABLE = (
    (0, "bios.kpxe", "arch"),
    (6, "efi32.efi", "arch"),
    (7, "efi64.efi", "arch"),
    (9, "efi64.efi", "arch"),
    (10, "arm32.efi", "arch"),
    (11, "arm64.efi", "arch"),
    (15, "efi32.efi", "arch"),  # x86 UEFI HTTP boot
    (16, "efi64.efi", "arch"),  # x64 UEFI HTTP boot
    (18, "arm32.efi", "arch"),  # ARM32 UEFI HTTP boot
    (19, "arm64.efi", "arch"),  # ARM64 UEFI HTTP boot
    (21, "uboot.scr", "arch"),  # ARM32 U-Boot
    (22, "uboot.scr", "arch"),  # ARM64 U-Boot
    (25, "riscv32.efi", "arch"),
    (27, "riscv64.efi", "arch"),
    (0x7FFF, "fallback.bin", "fallback"),
)


def make_config(**overrides):
    """Return a Config of the defaults with distinct boot-file names."""
    values = pxeserver.default_values()
    values.update(BOOT_FILES)
    values.update(overrides)
    return pxeserver.Config(reservations={}, config_file=None, **values)


def make_request(options):
    """Return a parsed DISCOVER carrying ``options`` besides option 53."""
    all_options = {pxeserver.OPT_MESSAGE_TYPE:
                   bytes((pxeserver.DHCPMessageType.DHCPDISCOVER,))}
    all_options.update(options)
    return pxeserver.DHCPPacket(op=pxeserver.BOOTREQUEST,
                                chaddr=SEABIOS_IPXE_MAC,
                                options=all_options)


def pxe_options(arch):
    """Return the options 93 and 60 of a PXE ROM of architecture ``arch``."""
    return {
        pxeserver.OPT_CLIENT_ARCH: struct.pack("!H", arch),
        pxeserver.OPT_VENDOR_CLASS_IDENTIFIER:
            f"PXEClient:Arch:{arch:05d}:UNDI:002001".encode(),
    }


class TestClientArchitecture(unittest.TestCase):

    def test_uboot_vendor_class_sets_arch(self):
        cases = ((b"U-Boot.armv8", 22), (b"U-Boot.armv7", 21),
                 (b"U-Boot.arm", 21), (b"U-Boot", None))
        for vendor_class, expected in cases:
            with self.subTest(vendor_class=vendor_class):
                client = pxeserver.describe_client(make_request(
                    {pxeserver.OPT_VENDOR_CLASS_IDENTIFIER: vendor_class}))
                self.assertEqual(client.arch, expected)

    def test_option_93_wins_over_uboot_vendor_class(self):
        client = pxeserver.describe_client(make_request({
            pxeserver.OPT_VENDOR_CLASS_IDENTIFIER: b"U-Boot.armv8",
            pxeserver.OPT_CLIENT_ARCH: struct.pack("!H", 11)}))
        self.assertEqual(client.arch, 11)

    def test_arch_table_picks_boot_file(self):
        config = make_config()
        for arch, expected_file, expected_reason in ARCH_TABLE:
            with self.subTest(arch=arch):
                client = pxeserver.describe_client(
                    make_request(pxe_options(arch)))
                self.assertEqual(
                    pxeserver.choose_boot_file(config, client),
                    (expected_file, expected_reason))

    def test_arch_list_uses_first_entry(self):
        request = make_request(
            {pxeserver.OPT_CLIENT_ARCH: struct.pack("!HH", 7, 0)})
        client = pxeserver.describe_client(request)
        self.assertEqual(client.arch, 7)

    def test_malformed_arch_option_falls_back(self):
        config = make_config()
        for raw in (b"", b"\x00", b"\x00\x07\x00"):
            with self.subTest(option_93=raw):
                client = pxeserver.describe_client(
                    make_request({pxeserver.OPT_CLIENT_ARCH: raw}))
                self.assertIsNone(client.arch)
                self.assertIn("option 93", client.arch_error)
                self.assertEqual(
                    pxeserver.choose_boot_file(config, client),
                    ("fallback.bin", "fallback"))

    def test_missing_arch_option_falls_back(self):
        request = make_request({pxeserver.OPT_VENDOR_CLASS_IDENTIFIER:
                                b"PXEClient"})
        client = pxeserver.describe_client(request)
        self.assertIsNone(client.arch_error)
        self.assertEqual(pxeserver.choose_boot_file(make_config(), client),
                         ("fallback.bin", "fallback"))

    def test_arch_names_for_log(self):
        names = {arch: pxeserver.ClientInfo(arch=arch).arch_name
                 for arch in (None, 7, 0x7FFF)}
        self.assertEqual(names, {None: "none", 7: "efi_x64",
                                 0x7FFF: "unknown-32767"})

    def test_ovmf_capture_gets_efi64_file(self):
        packet = pxeserver.parse_dhcp_packet(OVMF_DISCOVER)
        client = pxeserver.describe_client(packet)
        self.assertTrue(client.is_pxe)
        self.assertFalse(client.is_ipxe)
        self.assertEqual(pxeserver.choose_boot_file(make_config(), client),
                         ("efi64.efi", "arch"))


class TestIPXEDetection(unittest.TestCase):

    def test_user_class_forms_detected(self):
        forms = {
            "RFC 3004 single": b"\x04iPXE",
            "RFC 3004 second of two": b"\x03abc\x04iPXE",
            "raw 4 bytes": b"iPXE",
            "RFC 3004 after empty instance": b"\x00\x04iPXE",
        }
        for form, raw in forms.items():
            with self.subTest(form=form):
                self.assertTrue(pxeserver.is_ipxe_client(
                    {pxeserver.OPT_USER_CLASS: raw}))

    def test_option_175_alone_detected(self):
        # Sub-option 177 (bus id) as the SeaBIOS iPXE ROM sends it.
        options = {pxeserver.OPT_IPXE_ENCAPSULATED:
                   bytes.fromhex("b105018086100e")}
        self.assertTrue(pxeserver.is_ipxe_client(options))

    def test_other_user_classes_not_detected(self):
        forms = {
            "none": None,
            "other class": b"\x04gPXE",
            "prefix only": b"\x03iPX",
            "iPXE inside longer class": b"\x05iPXEx",
            "empty": b"",
        }
        for form, raw in forms.items():
            options = {} if raw is None else {pxeserver.OPT_USER_CLASS: raw}
            with self.subTest(form=form):
                self.assertFalse(pxeserver.is_ipxe_client(options))

    def test_seabios_ipxe_capture_detected(self):
        packet = pxeserver.parse_dhcp_packet(SEABIOS_IPXE_DISCOVER)
        client = pxeserver.describe_client(packet)
        self.assertTrue(client.is_ipxe)
        self.assertEqual(client.arch, 0)


class TestChooseBootFile(unittest.TestCase):

    def test_ipxe_client_gets_script(self):
        options = pxe_options(7)
        options[pxeserver.OPT_USER_CLASS] = b"iPXE"
        client = pxeserver.describe_client(make_request(options))
        self.assertEqual(pxeserver.choose_boot_file(make_config(), client),
                         ("script.ipxe", "ipxe"))

    def test_empty_script_gives_arch_file(self):
        options = pxe_options(7)
        options[pxeserver.OPT_USER_CLASS] = b"iPXE"
        client = pxeserver.describe_client(make_request(options))
        config = make_config(ipxe_script="")
        self.assertEqual(pxeserver.choose_boot_file(config, client),
                         ("efi64.efi", "arch"))

    def test_reservation_boot_file_overrides_arch(self):
        client = pxeserver.describe_client(make_request(pxe_options(7)))
        reservation = pxeserver.Reservation(SEABIOS_IPXE_MAC,
                                            boot_file="host.efi")
        self.assertEqual(
            pxeserver.choose_boot_file(make_config(), client, reservation),
            ("host.efi", "host"))

    def test_reservation_without_file_keeps_arch(self):
        client = pxeserver.describe_client(make_request(pxe_options(7)))
        reservation = pxeserver.Reservation(SEABIOS_IPXE_MAC)
        self.assertEqual(
            pxeserver.choose_boot_file(make_config(), client, reservation),
            ("efi64.efi", "arch"))

    def test_plain_client_wants_no_boot_file(self):
        request = make_request({pxeserver.OPT_PARAMETER_REQUEST_LIST:
                                bytes((1, 3, 6))})
        client = pxeserver.describe_client(request)
        self.assertFalse(pxeserver.wants_boot_file(client, request.options))

    def test_option_67_request_wants_boot_file(self):
        request = make_request({pxeserver.OPT_PARAMETER_REQUEST_LIST:
                                bytes((1, pxeserver.OPT_BOOTFILE_NAME))})
        client = pxeserver.describe_client(request)
        self.assertTrue(pxeserver.wants_boot_file(client, request.options))

    def test_pxe_client_wants_boot_file(self):
        request = make_request(pxe_options(0))
        client = pxeserver.describe_client(request)
        self.assertTrue(pxeserver.wants_boot_file(client, request.options))


if __name__ == "__main__":
    unittest.main()
