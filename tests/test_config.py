"""Tests of the settings table, the INI loader and the config checks.

The example file pxe.ini.example is tested against the SETTINGS table, so
a setting added to the program without its example entry, or an example
default that drifts from the table, fails here.  No sockets are opened.
"""

import ipaddress
import os
import re
import sys
import tempfile
import typing
import unittest

from support import REPO_ROOT

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pxeserver  # noqa: E402  (needs REPO_ROOT on sys.path)


EXAMPLE_PATH = os.path.join(REPO_ROOT, "pxe.ini.example")

# Flags of the parser that are not settings, so have no INI key.
NON_SETTING_FLAGS = {"-h", "--help", "--version", "--config", "--tftp-only",
                     "--check"}

# A key or section header commented out with "# ", as the example writes
# every setting.  Prose comments never take this shape.
COMMENTED_ENTRY = re.compile(r"^# (\[[^\]]+\]|[a-z0-9_]+ =.*)$")
SECTION_HEADER = re.compile(r"^\[([^\]]+)\]$")
IPV4_TEXT = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
DOCUMENTATION_NETWORK = ipaddress.IPv4Network("192.0.2.0/24")
EXAMPLE_MAC = bytes.fromhex("525400123456")

# One invalid INI value per setting whose parser can reject text.  Plain
# text settings (root, iface, file names) accept any string, so they have
# none.  Each value must appear in the error message.
BAD_VALUES = {
    "mode": "relay",
    "server_address": "192.0.2.300",
    "log_level": "verbose",
    "log_timestamps": "maybe",
    "tftp_address": "localhost",
    "tftp_port": "65536",
    "tftp_port_range": "30100-30000",
    "max_blksize": "7",
    "max_windowsize": "0",
    "tftp_timeout": "0.1",
    "tftp_busy_poll": "-1",
    "tftp_retries": "0",
    "max_transfers": "0",
    "upload_overwrite": "sometimes",
    "upload_max_bytes": "-1",
    "log_format": "xml",
    "exit_after": "-1",
    "http_port": "65536",
    "http_address": "localhost",
    "pool_start": "192.0.2",
    "pool_end": "192.0.2.256",
    "router": "gateway",
    "dns_servers": "192.0.2.x",
    "lease_time": "59",
    "known_clients_only": "2",
}
TEXT_PARSERS = (pxeserver.parse_text, pxeserver.parse_optional_text)


class ExampleEntry(typing.NamedTuple):
    """One commented key of the example file and the prose above it."""

    section: str
    key: str
    value: str
    description: str


def read_example_text():
    with open(EXAMPLE_PATH, encoding="utf-8") as stream:
        return stream.read()


def uncomment_example(text):
    """Return the example with every commented key and section enabled."""
    lines = []
    for line in text.splitlines():
        match = COMMENTED_ENTRY.match(line)
        lines.append(match.group(1) if match else line)
    return "\n".join(lines) + "\n"


def parse_example(text):
    """Return (live section names, ExampleEntry list) in file order.

    A commented section header, such as the host example, sets the section
    of the entries below it but is not listed as live.  An entry's
    description is the block of prose comment lines just above it.  Keys
    that follow each other directly share the block above the first.
    """
    sections, entries = [], []
    section, prose, description = "", [], ""
    for line in text.splitlines():
        header = SECTION_HEADER.match(line)
        entry = COMMENTED_ENTRY.match(line)
        if header:
            section = header.group(1)
            sections.append(section)
            prose = []
        elif entry and entry.group(1).startswith("["):
            section = entry.group(1)[1:-1]
        elif entry:
            if prose:
                description = " ".join(prose)
                prose = []
            key, _, value = entry.group(1).partition("=")
            entries.append(ExampleEntry(section, key.strip(), value.strip(),
                                        description))
        elif line.startswith("#"):
            prose.append(line.lstrip("#").strip())
        else:
            prose = []
    return sections, entries


def parse_argv(argv):
    return pxeserver.build_parser().parse_args(argv)


class _TempDirTestCase(unittest.TestCase):
    """Gives each test a fresh folder, used as --root and for INI files."""

    def setUp(self):
        temporary = tempfile.TemporaryDirectory(prefix="pxeserver-config-")
        self.addCleanup(temporary.cleanup)
        self.workdir = temporary.name

    def write_ini(self, text, name="pxe.ini"):
        path = os.path.join(self.workdir, name)
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(text)
        return path

    def read_ini_error(self, text):
        """Return the ConfigError message that read_ini raises for text."""
        path = self.write_ini(text)
        with self.assertRaises(pxeserver.ConfigError) as caught:
            pxeserver.read_ini(path)
        return str(caught.exception)


class TestExampleFile(_TempDirTestCase):

    def setUp(self):
        super().setUp()
        self.text = read_example_text()
        self.sections, entries = parse_example(self.text)
        prefix = pxeserver.HOST_SECTION_PREFIX
        self.host_entries = [entry for entry in entries
                             if entry.section.startswith(prefix)]
        self.entries = [entry for entry in entries
                        if not entry.section.startswith(prefix)]

    def test_example_lists_every_setting_in_order(self):
        keys = [entry.key for entry in self.entries]
        expected = [setting.key for setting in pxeserver.SETTINGS]
        self.assertEqual(keys, expected)

    def test_example_host_section_has_every_key(self):
        keys = [entry.key for entry in self.host_entries]
        self.assertEqual(keys, list(pxeserver.HOST_KEYS))

    def test_example_sections_follow_help_order(self):
        self.assertEqual(self.sections, list(pxeserver.SECTIONS))

    def test_example_keys_sit_in_their_section(self):
        for entry in self.entries:
            with self.subTest(key=entry.key):
                setting = pxeserver.SETTINGS_BY_KEY.get(entry.key)
                self.assertIsNotNone(setting)
                self.assertEqual(entry.section, setting.section)

    def test_example_shows_table_defaults(self):
        for entry in self.entries:
            setting = pxeserver.SETTINGS_BY_KEY.get(entry.key)
            if setting is None or setting.default is None:
                continue
            with self.subTest(key=entry.key):
                self.assertEqual(setting.parse(entry.value),
                                 setting.parse(setting.default))

    def test_example_marks_unset_defaults(self):
        for entry in self.entries:
            setting = pxeserver.SETTINGS_BY_KEY.get(entry.key)
            if setting is None or setting.default is not None:
                continue
            with self.subTest(key=entry.key):
                self.assertIn("not set by default",
                              entry.description.lower())

    def test_example_describes_every_key(self):
        for entry in self.entries + self.host_entries:
            with self.subTest(key=entry.key):
                self.assertTrue(entry.description)

    def test_example_parses_fully_uncommented(self):
        path = self.write_ini(uncomment_example(self.text))
        values, _ = pxeserver.read_ini(path)
        self.assertEqual(set(values), set(pxeserver.SETTINGS_BY_KEY))

    def test_example_host_section_parses(self):
        path = self.write_ini(uncomment_example(self.text))
        _, reservations = pxeserver.read_ini(path)
        expected = pxeserver.Reservation(
            EXAMPLE_MAC, ipaddress.IPv4Address("192.0.2.50"), "node1",
            "pxelinux.0")
        self.assertEqual(reservations, {EXAMPLE_MAC: expected})

    def test_example_parses_as_shipped(self):
        path = self.write_ini(self.text)
        self.assertEqual(pxeserver.read_ini(path), ({}, {}))

    def test_example_uses_documentation_addresses(self):
        for text in IPV4_TEXT.findall(self.text):
            with self.subTest(address=text):
                address = ipaddress.IPv4Address(text)
                self.assertTrue(address in DOCUMENTATION_NETWORK
                                or address.is_unspecified)

    def test_example_lines_fit_79_columns(self):
        for number, line in enumerate(self.text.splitlines(), 1):
            with self.subTest(line=number):
                self.assertLessEqual(len(line), 79)


class TestSettingsTable(unittest.TestCase):

    def test_defaults_parse_with_own_parser(self):
        for setting in pxeserver.SETTINGS:
            if setting.default is None:
                continue
            with self.subTest(key=setting.key):
                setting.parse(setting.default)

    def test_setting_keys_are_unique(self):
        keys = [setting.key for setting in pxeserver.SETTINGS]
        self.assertEqual(len(keys), len(set(keys)))

    def test_setting_sections_are_known(self):
        for setting in pxeserver.SETTINGS:
            with self.subTest(key=setting.key):
                self.assertIn(setting.section, pxeserver.SECTIONS)

    def test_every_flag_has_ini_key(self):
        parser = pxeserver.build_parser()
        flags = {option for action in parser._actions
                 for option in action.option_strings}
        expected = {setting.flag for setting in pxeserver.SETTINGS}
        self.assertEqual(flags - NON_SETTING_FLAGS, expected)

    def test_flag_destination_is_ini_key(self):
        parser = pxeserver.build_parser()
        for action in parser._actions:
            flags = set(action.option_strings) - NON_SETTING_FLAGS
            for flag in flags:
                with self.subTest(flag=flag):
                    key = flag[2:].replace("-", "_")
                    self.assertEqual(action.dest, key)

    def test_flags_default_to_none(self):
        args = parse_argv([])
        for setting in pxeserver.SETTINGS:
            with self.subTest(key=setting.key):
                self.assertIsNone(getattr(args, setting.key))

    def test_flag_help_states_default(self):
        parser = pxeserver.build_parser()
        helps = {action.dest: action.help for action in parser._actions}
        for setting in pxeserver.SETTINGS:
            if not setting.default:
                continue
            with self.subTest(key=setting.key):
                self.assertIn(f"(default: {setting.default})",
                              helps[setting.key])

    def test_bad_value_table_covers_parsers(self):
        checked = {setting.key for setting in pxeserver.SETTINGS
                   if setting.parse not in TEXT_PARSERS}
        self.assertEqual(set(BAD_VALUES), checked)


class TestPrecedence(_TempDirTestCase):

    def build(self, ini_text=None, flags=()):
        argv = ["--root", self.workdir, "--tftp-only"]
        if ini_text is not None:
            argv += ["--config", self.write_ini(ini_text)]
        return pxeserver.build_config(parse_argv(argv + list(flags)))

    def test_default_applies_without_file(self):
        config = self.build()
        self.assertEqual(config.tftp_port, 69)

    def test_defaults_match_default_values(self):
        config = self.build()
        values = pxeserver.default_values()
        values.update(root=self.workdir, mode="off")
        self.assertEqual(config._asdict(),
                         dict(values, reservations={}, config_file=None,
                              explicit=frozenset({"root", "mode"})))

    def test_explicit_lists_file_and_flag_keys(self):
        config = self.build("[tftp]\ntftp_port = 6969\n",
                            ["--max-transfers", "9"])
        self.assertIn("tftp_port", config.explicit)
        self.assertIn("max_transfers", config.explicit)
        self.assertNotIn("tftp_timeout", config.explicit)

    def test_file_overrides_default(self):
        config = self.build("[tftp]\ntftp_port = 6969\n")
        self.assertEqual(config.tftp_port, 6969)

    def test_flag_overrides_file(self):
        config = self.build("[tftp]\ntftp_port = 6969\n",
                            ["--tftp-port", "7070"])
        self.assertEqual(config.tftp_port, 7070)

    def test_false_flag_overrides_true_file(self):
        config = self.build("[tftp]\nupload_overwrite = yes\n",
                            ["--upload-overwrite", "no"])
        self.assertIs(config.upload_overwrite, False)

    def test_empty_flag_overrides_file(self):
        config = self.build("[boot]\nipxe_script = menu.ipxe\n",
                            ["--ipxe-script", ""])
        self.assertEqual(config.ipxe_script, "")

    def test_file_root_used_without_flag(self):
        path = self.write_ini(f"[server]\nroot = {self.workdir}\n"
                              f"mode = off\n")
        config = pxeserver.build_config(parse_argv(["--config", path]))
        self.assertEqual(config.root, self.workdir)

    def test_tftp_only_overrides_file_mode(self):
        config = self.build("[server]\nmode = full\n")
        self.assertEqual(config.mode, "off")

    def test_config_records_file_path(self):
        config = self.build("[server]\n")
        self.assertEqual(config.config_file,
                         os.path.join(self.workdir, "pxe.ini"))

    def test_file_reservations_reach_config(self):
        config = self.build("[host:52:54:00:12:34:56]\n"
                            "boot_file = custom.efi\n")
        reservation = config.reservations[EXAMPLE_MAC]
        self.assertEqual(reservation.boot_file, "custom.efi")


class TestReadIniErrors(_TempDirTestCase):

    def test_bad_value_names_key_and_value(self):
        for key, text in BAD_VALUES.items():
            section = pxeserver.SETTINGS_BY_KEY[key].section
            with self.subTest(key=key):
                message = self.read_ini_error(f"[{section}]\n{key} = {text}\n")
                self.assertIn(f"[{section}] {key}:", message)
                self.assertIn(text, message)

    def test_integer_forms_beyond_digits_rejected(self):
        for text in ("1_000", "+5", "\u0665\u0660", "0x10", "1e3"):
            with self.subTest(text=text):
                message = self.read_ini_error(
                    f"[tftp]\ntftp_retries = {text}\n")
                self.assertIn("invalid integer", message)

    def test_bad_value_message_names_file(self):
        message = self.read_ini_error("[tftp]\ntftp_port = 65536\n")
        self.assertIn(os.path.join(self.workdir, "pxe.ini"), message)

    def test_two_bad_values_both_reported(self):
        message = self.read_ini_error("[tftp]\ntftp_port = 65536\n"
                                      "[dhcp]\nlease_time = 59\n")
        self.assertIn("tftp_port", message)
        self.assertIn("65536", message)
        self.assertIn("lease_time", message)
        self.assertIn("59", message)

    def test_errors_of_every_kind_collected(self):
        message = self.read_ini_error("[tftp]\ntftp_retries = 0\n"
                                      "[network]\n"
                                      "[host:52:54:00:12:34]\n")
        self.assertIn("tftp_retries", message)
        self.assertIn("[network]", message)
        self.assertIn("52:54:00:12:34", message)

    def test_unknown_section_rejected_with_name(self):
        message = self.read_ini_error("[network]\nroot = /srv/tftp\n")
        self.assertIn("unknown section [network]", message)

    def test_unknown_key_rejected_with_name(self):
        message = self.read_ini_error("[tftp]\nblock_size = 1468\n")
        self.assertIn("[tftp] block_size: unknown key", message)

    def test_key_in_wrong_section_rejected(self):
        message = self.read_ini_error("[server]\ntftp_port = 69\n")
        self.assertIn("[server] tftp_port: unknown key", message)

    def test_host_section_bad_mac_rejected(self):
        message = self.read_ini_error("[host:52:54:00:12:34:5g]\n"
                                      "address = 192.0.2.50\n")
        self.assertIn("invalid MAC address '52:54:00:12:34:5g'", message)

    def test_host_section_short_mac_rejected(self):
        message = self.read_ini_error("[host:52:54:00:12:34]\n")
        self.assertIn("invalid MAC address '52:54:00:12:34'", message)

    def test_host_section_bad_address_rejected(self):
        message = self.read_ini_error("[host:52:54:00:12:34:56]\n"
                                      "address = 192.0.2.500\n")
        self.assertIn("address: invalid IPv4 address '192.0.2.500'",
                      message)

    def test_host_section_unknown_key_rejected(self):
        message = self.read_ini_error("[host:52:54:00:12:34:56]\n"
                                      "ip = 192.0.2.50\n")
        self.assertIn("[host:52:54:00:12:34:56] ip: unknown key", message)

    def test_duplicate_host_section_rejected(self):
        section = "[host:52:54:00:12:34:56]\n"
        message = self.read_ini_error(section + section)
        self.assertIn("host:52:54:00:12:34:56", message)

    def test_same_mac_other_spelling_rejected(self):
        message = self.read_ini_error("[host:52:54:00:12:34:56]\n"
                                      "[host:52-54-00-12-34-56]\n")
        self.assertIn("[host:52-54-00-12-34-56]: duplicate section",
                      message)

    def test_missing_file_reported(self):
        path = os.path.join(self.workdir, "missing.ini")
        with self.assertRaises(pxeserver.ConfigError) as caught:
            pxeserver.read_ini(path)
        self.assertIn(f"--config {path}: cannot read", str(caught.exception))

    def test_invalid_syntax_reported_on_one_line(self):
        message = self.read_ini_error("tftp_port = 69\n")
        self.assertIn("invalid INI syntax", message)
        self.assertNotIn("\n", message)


class TestCheckConfig(_TempDirTestCase):

    def make_config(self, **overrides):
        values = pxeserver.default_values()
        values.update(root=self.workdir, iface="pxetest0")
        values.update(overrides)
        return pxeserver.Config(reservations={}, config_file=None, **values)

    def check_error(self, **overrides):
        """Return the ConfigError message of check_config for overrides."""
        with self.assertRaises(pxeserver.ConfigError) as caught:
            pxeserver.check_config(self.make_config(**overrides))
        return str(caught.exception)

    def test_valid_config_passes(self):
        self.assertIsNone(pxeserver.check_config(self.make_config()))

    def test_missing_root_reported(self):
        root = os.path.join(self.workdir, "missing")
        message = self.check_error(root=root)
        self.assertIn(f"--root {root}: folder not found", message)

    def test_full_mode_requires_iface(self):
        message = self.check_error(iface=None)
        self.assertIn("--iface is missing", message)

    def test_off_mode_needs_no_iface(self):
        config = self.make_config(mode="off", iface=None)
        self.assertIsNone(pxeserver.check_config(config))

    def test_pool_start_without_end_reported(self):
        message = self.check_error(
            pool_start=ipaddress.IPv4Address("192.0.2.100"))
        self.assertIn("--pool-start and --pool-end go together", message)

    def test_pool_end_without_start_reported(self):
        message = self.check_error(
            pool_end=ipaddress.IPv4Address("192.0.2.199"))
        self.assertIn("--pool-start and --pool-end go together", message)

    def test_pool_start_above_end_reported(self):
        message = self.check_error(
            pool_start=ipaddress.IPv4Address("192.0.2.200"),
            pool_end=ipaddress.IPv4Address("192.0.2.100"))
        self.assertIn("--pool-start 192.0.2.200 is above --pool-end "
                      "192.0.2.100", message)

    def test_single_address_pool_passes(self):
        address = ipaddress.IPv4Address("192.0.2.100")
        config = self.make_config(pool_start=address, pool_end=address)
        self.assertIsNone(pxeserver.check_config(config))

    def test_missing_upload_dir_reported(self):
        folder = os.path.join(self.workdir, "uploads")
        message = self.check_error(upload_dir=folder)
        self.assertIn(f"--upload-dir {folder}: folder not found", message)

    def test_all_problems_in_one_error(self):
        root = os.path.join(self.workdir, "missing")
        message = self.check_error(root=root, iface=None)
        self.assertIn("--root", message)
        self.assertIn("--iface", message)


if __name__ == "__main__":
    unittest.main()
