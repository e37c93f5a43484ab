#!/usr/bin/env python3
"""pxeserver: a network-boot (PXE) server in one file.

Run it on the interface that faces the machines to boot:

    sudo python3 pxeserver.py --iface eth0 --root /srv/tftp

or serve a folder by TFTP only, beside an existing DHCP server:

    python3 pxeserver.py --tftp-only --root /srv/tftp

Protocols: DHCP (RFC 2131, 2132, 3396, 4578), proxyDHCP and the PXE boot
server (PXE specification 2.1), TFTP (RFC 1350, 2347, 2348, 2349, 7440),
and an optional HTTP/1.1 server (RFC 9110, 9112) for iPXE and UEFI HTTP
Boot.

Design.  The DHCP server is a socketserver.ThreadingUDPServer bound to one
interface (SO_BINDTODEVICE), so nothing is answered on other interfaces; each
request is handled in its own short thread, and the lease store serialises
changes behind one lock.  The TFTP listener owns the port 69 socket and never
waits on a transfer: each accepted request gets its own thread and its own
ephemeral UDP socket bound to the local address the request arrived on.  Every
file name from the network is resolved under the TFTP root, and after symlinks
are resolved the file must still lie inside the root, or the request is
rejected.  Sockets are all bound before any thread starts.  In proxy mode
a second socketserver answers the PXE boot server port 4011; the optional
HTTP server runs one thread per connection.

Sections, in file order:
    Constants
    Exceptions
    Logging
    Utilities
    Configuration
    DHCP packet layer
    Boot policy
    Leases
    DHCP server
    TFTP packet layer
    TFTP server
    HTTP server
    Service runner
    Command line
"""

import argparse
import collections
import configparser
import enum
import errno
import fcntl
import http.server
import io
import ipaddress
import json
import logging
import math
import os
import pwd
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import socketserver
import stat
import struct
import sys
import tempfile
import threading
import time
import typing
import urllib.parse

__version__ = "0.1.0"


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

# Ports (RFC 2131 section 4.1, RFC 1350, PXE specification 2.1).
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
TFTP_PORT = 69
PXE_BOOT_SERVER_PORT = 4011

# BOOTP and DHCP header values (RFC 2131 section 2).
BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
ETHERNET_ADDRESS_LENGTH = 6
FLAG_BROADCAST = 0x8000
MAGIC_COOKIE = b"\x63\x82\x53\x63"
# Fixed BOOTP header: op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr,
# siaddr, giaddr, chaddr, sname, file; 236 bytes (RFC 2131 section 2).
BOOTP_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
BOOTP_MIN_PACKET_BYTES = 300  # RFC 1542 section 2.1: pad replies to 300
DHCP_MIN_MAX_MESSAGE_SIZE = 576  # RFC 2132 section 9.10


class DHCPMessageType(enum.IntEnum):
    """Option 53 values (RFC 2132 section 9.6)."""

    DHCPDISCOVER = 1
    DHCPOFFER = 2
    DHCPREQUEST = 3
    DHCPDECLINE = 4
    DHCPACK = 5
    DHCPNAK = 6
    DHCPRELEASE = 7
    DHCPINFORM = 8


# DHCP option codes (RFC 2132 unless noted).
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DOMAIN_NAME_SERVER = 6
OPT_HOST_NAME = 12
OPT_DOMAIN_NAME = 15
OPT_BROADCAST_ADDRESS = 28
OPT_VENDOR_SPECIFIC = 43  # vendor-specific information
OPT_REQUESTED_IP = 50  # requested IP address
OPT_LEASE_TIME = 51  # IP address lease time
OPT_OVERLOAD = 52  # option overload
OPT_MESSAGE_TYPE = 53  # DHCP message type
OPT_SERVER_ID = 54  # server identifier
OPT_PARAMETER_REQUEST_LIST = 55
OPT_MESSAGE = 56
OPT_MAX_MESSAGE_SIZE = 57  # maximum DHCP message size
OPT_RENEWAL_TIME = 58  # renewal (T1) time value
OPT_REBINDING_TIME = 59  # rebinding (T2) time value
OPT_VENDOR_CLASS_IDENTIFIER = 60
OPT_CLIENT_IDENTIFIER = 61
OPT_TFTP_SERVER_NAME = 66
OPT_BOOTFILE_NAME = 67
OPT_USER_CLASS = 77  # user class information, RFC 3004
OPT_RELAY_AGENT_INFORMATION = 82  # RFC 3046
OPT_CLIENT_ARCH = 93  # client system architecture type, RFC 4578
OPT_CLIENT_NDI = 94  # client network interface identifier, RFC 4578
OPT_CLIENT_UUID = 97  # client machine identifier (UUID/GUID), RFC 4578
OPT_IPXE_ENCAPSULATED = 175  # iPXE encapsulated options (iPXE project)
OPT_END = 255

# Option 52 values (RFC 2132 section 9.3).
OVERLOAD_FILE = 1
OVERLOAD_SNAME = 2

# Options sent in this order at the head of every reply; the rest follow in
# the order the client listed them in option 55.
REPLY_OPTION_ORDER = (
    OPT_MESSAGE_TYPE,
    OPT_SERVER_ID,
    OPT_LEASE_TIME,
    OPT_RENEWAL_TIME,
    OPT_REBINDING_TIME,
    OPT_SUBNET_MASK,
    OPT_ROUTER,
    OPT_DOMAIN_NAME_SERVER,
    OPT_DOMAIN_NAME,
    OPT_BROADCAST_ADDRESS,
)
# Options we send whether or not the client listed them in option 55.
ALWAYS_SENT_OPTIONS = frozenset(REPLY_OPTION_ORDER) | {
    OPT_TFTP_SERVER_NAME,
    OPT_BOOTFILE_NAME,
    OPT_VENDOR_CLASS_IDENTIFIER,
    OPT_VENDOR_SPECIFIC,  # only set for PXE clients in proxy mode
    OPT_CLIENT_UUID,
    OPT_RELAY_AGENT_INFORMATION,
    OPT_MESSAGE,
    OPT_HOST_NAME,  # only set from a [host:MAC] section
}

# Options never dropped to fit a client's maximum message size.
ESSENTIAL_OPTIONS = frozenset((
    OPT_MESSAGE_TYPE, OPT_SERVER_ID, OPT_LEASE_TIME, OPT_SUBNET_MASK,
    OPT_TFTP_SERVER_NAME, OPT_BOOTFILE_NAME,
))
DHCP_IP_UDP_HEADER_BYTES = 28

# PXE vendor options inside option 43 (PXE specification 2.1, 2.4.4).
PXE_DISCOVERY_CONTROL = 6
PXE_BOOT_MENU = 9
PXE_MENU_PROMPT = 10
PXE_BOOT_ITEM = 71
PXE_USE_BOOT_FILE = 0x08  # discovery control bit 3: boot the named file
# Discovery control bits 0 and 1: no broadcast or multicast discovery.
PXE_NO_DISCOVERY = 0x03

# Raspberry Pi boot ROMs (Pi 3 and Pi 4 network boot) accept an offer only
# when option 43 contains a boot menu entry with this exact text.
RASPBERRY_PI_MENU_TEXT = b"Raspberry Pi Boot"
RASPBERRY_PI_VENDOR_CLASS = b"PXEClient:Arch:00000:UNDI:002001"
# IEEE OUIs assigned to Raspberry Pi Foundation and Raspberry Pi Trading.
RASPBERRY_PI_OUIS = frozenset(bytes.fromhex(oui) for oui in (
    "b827eb", "dca632", "e45f01", "28cdc1", "d83add", "2ccf67"))

PXE_VENDOR_CLASS = b"PXEClient"
HTTP_VENDOR_CLASS = b"HTTPClient"
IPXE_USER_CLASS = b"iPXE"


class ClientArch(enum.IntEnum):
    """Option 93 processor architecture types (RFC 4578, IANA registry)."""

    BIOS = 0  # Intel x86PC
    NEC_PC98 = 1
    EFI_ITANIUM = 2
    DEC_ALPHA = 3
    ARC_X86 = 4
    INTEL_LEAN_CLIENT = 5
    EFI_IA32 = 6
    EFI_X64 = 7  # EFI BC in the RFC; firmware uses it for x64
    EFI_XSCALE = 8
    EFI_X64_ALT = 9  # EFI x86-64
    EFI_ARM32 = 10
    EFI_ARM64 = 11
    EFI_IA32_HTTP = 15
    EFI_X64_HTTP = 16
    EFI_ARM32_HTTP = 18
    EFI_ARM64_HTTP = 19
    UBOOT_ARM32 = 21
    UBOOT_ARM64 = 22
    EFI_RISCV32 = 25
    EFI_RISCV64 = 27


# TFTP (RFC 1350 section 5, RFC 2347).
class TFTPOpcode(enum.IntEnum):
    """TFTP packet types (RFC 1350 section 5, OACK from RFC 2347)."""

    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class TFTPErrorCode(enum.IntEnum):
    """TFTP error codes (RFC 1350 appendix, code 8 from RFC 2347)."""

    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TRANSFER_ID = 5
    FILE_ALREADY_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_NEGOTIATION = 8


# The text sent to clients for each code, in the RFC 1350 wording.
TFTP_ERROR_TEXT = {
    TFTPErrorCode.NOT_DEFINED: "Not defined",
    TFTPErrorCode.FILE_NOT_FOUND: "File not found",
    TFTPErrorCode.ACCESS_VIOLATION: "Access violation",
    TFTPErrorCode.DISK_FULL: "Disk full or allocation exceeded",
    TFTPErrorCode.ILLEGAL_OPERATION: "Illegal TFTP operation",
    TFTPErrorCode.UNKNOWN_TRANSFER_ID: "Unknown transfer ID",
    TFTPErrorCode.FILE_ALREADY_EXISTS: "File already exists",
    TFTPErrorCode.NO_SUCH_USER: "No such user",
    TFTPErrorCode.OPTION_NEGOTIATION: "Option negotiation failed",
}

TFTP_HEADER = struct.Struct("!HH")  # opcode and block or error code, 4 bytes
TFTP_OPCODE = struct.Struct("!H")
_ACK_OPCODE = TFTP_OPCODE.pack(TFTPOpcode.ACK)  # for the fast path
_DATA = int(TFTPOpcode.DATA)  # a plain int packs faster than the enum
_ACK = int(TFTPOpcode.ACK)
TFTP_DEFAULT_BLKSIZE = 512  # RFC 1350
TFTP_MIN_BLKSIZE = 8  # RFC 2348
TFTP_MAX_BLKSIZE = 65464  # RFC 2348
TFTP_MIN_TIMEOUT_SECONDS = 1  # RFC 2349
TFTP_MAX_TIMEOUT_SECONDS = 255  # RFC 2349
TFTP_MIN_WINDOWSIZE = 1  # RFC 7440
TFTP_MAX_WINDOWSIZE = 65535  # RFC 7440
TFTP_BLOCK_MODULO = 65536  # block numbers are 16 bits and wrap to 0
TFTP_MODES = ("octet", "netascii")
# IPv4 header (20) + UDP header (8) + TFTP DATA header (4).
TFTP_DATA_OVERHEAD_BYTES = 32
# Requests are at most 512 bytes by RFC 2347; some clients send a little
# more, so accept up to this and reject anything larger as malformed.
TFTP_MAX_REQUEST_BYTES = 1024
TFTP_MAX_OPTION_VALUE_BYTES = 32
TFTP_RECEIVE_BUFFER_BYTES = 65536 + TFTP_HEADER.size
# Size of the buffer that a read transfer receives client packets into.
# ACKs are 4 bytes, and a longer ERROR text is cut, which its parser allows.
TFTP_ACK_BUFFER_BYTES = 1024
TFTP_BUSY_REPLY = "server busy, try again later"  # ERROR 0 text
TFTP_READ_BUFFER_BYTES = 1 << 14  # bytes read per system call
# Retransmission timer, after RFC 6298: 1 s before the first round trip is
# measured, never below the floor, never above the configured ceiling.
TFTP_INITIAL_RTO_SECONDS = 1.0
TFTP_MIN_RTO_SECONDS = 0.2
TFTP_RTT_FIRST_SAMPLES = 8  # windows sampled one after another at first
TFTP_RTT_SAMPLE_INTERVAL = 64  # windows between round-trip samples after
TFTP_LISTENER_WAKE_SECONDS = 0.5  # how often the listener checks for stop
TFTP_DESCRIPTORS_PER_TRANSFER = 3  # its socket, its guard and the file
TFTP_REQUESTS_PER_WAKE = 64  # packets read from one socket per wake
# Busy polling for ACKs (setting tftp_busy_poll): after a poll that finds
# no ACK, a transfer sleeps in recv() for this many windows, doubled after
# each further miss up to the maximum, before it polls again.
TFTP_POLL_PAUSE_WINDOWS = 16
TFTP_POLL_MAX_PAUSE_WINDOWS = 8192
# How long a request from a client address and port whose last transfer
# has sent its final block waits for that transfer to end.
TFTP_DEFER_SECONDS = 0.25
# Retransmissions before the client's first ACK: a spoofed RRQ then draws
# at most 3 packets, whatever tftp_retries is set to.
TFTP_UNPROVEN_RETRIES = 2
# Memory held per transfer for retransmission: windowsize * blksize is
# clamped to this many bytes.
TFTP_MAX_WINDOW_BYTES = 1 << 20
# After the last ACK of an upload, wait this long for a repeated final DATA
# (our ACK was lost) before closing the socket (RFC 1350 section 6 "dally").
TFTP_DALLY_SECONDS = 1.0
UPLOAD_FILE_MODE = 0o644  # mkstemp creates 0600
# Temporary upload names: "." + final name + "." + 8 random characters
# from tempfile.mkstemp + ".part".
STALE_UPLOAD_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.part$")

# Linux socket options and ioctls that the socket module may not name on 3.6.
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IN_PKTINFO = struct.Struct("=I4s4s")  # ifindex, spec_dst, addr: 12 bytes
SIOCGIFADDR = 0x8915
SIOCGIFNETMASK = 0x891B
SIOCGIFMTU = 0x8921
SIOCGIFHWADDR = 0x8927
IFNAMSIZ = 16

# Defaults used outside the settings table.
SHUTDOWN_JOIN_SECONDS = 5.0
LOG_TEXT_MAX_CHARS = 200
WARNINGS_PER_SOURCE_PER_MINUTE = 10
RATE_LIMIT_MAX_SOURCES = 4096


# ---------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------


class PXEServerError(Exception):
    """Base class of the errors this program raises on purpose."""


class ConfigError(PXEServerError):
    """An invalid setting, flag or INI file; the message names the value."""


class PacketError(PXEServerError):
    """A malformed packet; the message names the field and the counts."""


class TFTPError(PXEServerError):
    """A TFTP request that must be answered with an ERROR packet.

    ``code`` is the TFTPErrorCode sent to the client, with ``reply`` as
    its text (the RFC 1350 wording when None).  The message is the detail
    for the log, which the client does not see.
    """

    def __init__(self, code, detail, reply=None):
        super().__init__(detail)
        self.code = code
        self.reply = reply


class StartupError(PXEServerError):
    """A run-time failure before serving starts, such as a failed bind."""


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------

log = logging.getLogger("pxeserver")
config_log = logging.getLogger("pxeserver.config")
dhcp_log = logging.getLogger("pxeserver.dhcp")
tftp_log = logging.getLogger("pxeserver.tftp")
http_log = logging.getLogger("pxeserver.http")


def printable(text, limit=LOG_TEXT_MAX_CHARS):
    """Return text from the network made safe for one log line.

    Control characters and undecodable bytes are escaped, and long text is
    cut at ``limit`` characters with a marker.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    escaped = []
    for char in text[:limit]:
        if char.isprintable() and char != "\\":
            escaped.append(char)
        elif char == "\\":
            escaped.append("\\\\")
        else:
            escaped.append(f"\\x{ord(char):02x}" if ord(char) < 256
                           else f"\\u{ord(char):04x}")
    if len(text) > limit:
        escaped.append(f"...(+{len(text) - limit} chars)")
    return "".join(escaped)


class RateLimiter:
    """Allow a bounded number of events per source per minute.

    Used to keep warnings about bad input from flooding the log.  Thread
    safe.  ``allow`` returns how many events from the source were dropped
    since the last allowed one, or None when this event must be dropped.
    """

    def __init__(self, per_minute=WARNINGS_PER_SOURCE_PER_MINUTE,
                 max_sources=RATE_LIMIT_MAX_SOURCES):
        self._per_minute = per_minute
        self._max_sources = max_sources
        self._lock = threading.Lock()
        self._sources = {}  # source -> [window start, count, dropped]

    def allow(self, source):
        now = time.monotonic()
        with self._lock:
            entry = self._sources.get(source)
            if entry is None or now - entry[0] >= 60.0:
                if entry is None and len(self._sources) >= self._max_sources:
                    # A flood from many sources: forget them all rather than
                    # grow without bound.
                    self._sources.clear()
                dropped = entry[2] if entry else 0
                self._sources[source] = [now, 1, 0]
                return dropped
            if entry[1] < self._per_minute:
                entry[1] += 1
                dropped, entry[2] = entry[2], 0
                return dropped
            entry[2] += 1
            return None


def warn_limited(logger, limiter, source, message, *args):
    """Log a warning about ``source`` unless its rate limit is spent.

    Returns whether the warning was logged.
    """
    dropped = limiter.allow(source)
    if dropped is None:
        return False
    if dropped:
        message += " (%d similar warnings from this source suppressed)"
        args = args + (dropped,)
    logger.warning(message, *args)
    return True


class _TimestampFormatter(logging.Formatter):
    def __init__(self, timestamps):
        fmt = "%(levelname)s %(name)s %(message)s"
        if timestamps:
            fmt = "%(asctime)s " + fmt
        super().__init__(fmt)


class _JSONFormatter(logging.Formatter):
    """Format each record as one JSON object with the event's fields.

    Log calls for protocol events pass ``extra={"event": {...}}``; those
    fields join the time, level, logger and message.
    """

    def format(self, record):
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S",
                                  time.localtime(record.created))
            + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "event", None) or {})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level, timestamps=True, stream=None, log_format="text",
                      log_file=""):
    """Install the one handler of the program; called from main.

    Raises StartupError when ``log_file`` cannot be opened.
    """
    if stream is None and log_file == "-":
        stream = sys.stdout
    if stream is None and log_file:
        try:
            handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--log-file {log_file}: cannot open: "
                              f"{exc.strerror}; choose a writable file or "
                              f"- for standard output") from None
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(_TimestampFormatter(timestamps))
    root = logging.getLogger("pxeserver")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


# ---------------------------------------------------------------------------
# Utilities
# ---------------------------------------------------------------------------


def format_mac(raw):
    """Format a hardware address as lower-case colon-separated hex."""
    return ":".join(f"{byte:02x}" for byte in raw)


def parse_mac(text):
    """Parse 'aa:bb:cc:dd:ee:ff' (or '-' separated) into 6 bytes."""
    parts = text.strip().replace("-", ":").split(":")
    if len(parts) != ETHERNET_ADDRESS_LENGTH:
        raise ValueError(f"invalid MAC address {text!r}")
    try:
        values = [int(part, 16) for part in parts]
    except ValueError:
        raise ValueError(f"invalid MAC address {text!r}") from None
    if any(len(part) not in (1, 2) or not 0 <= value <= 255
           for part, value in zip(parts, values)):
        raise ValueError(f"invalid MAC address {text!r}")
    return bytes(values)


class InterfaceInfo(typing.NamedTuple):
    """Addresses of one network interface, read with Linux ioctls."""

    name: str
    index: int
    address: ipaddress.IPv4Address
    network: ipaddress.IPv4Network
    mtu: int
    mac: bytes


def _interface_ioctl(sock, request, name):
    packed = struct.pack("256s", name.encode("ascii")[:IFNAMSIZ - 1])
    return fcntl.ioctl(sock.fileno(), request, packed)


def interface_names():
    """Return the names of this host's network interfaces, sorted."""
    try:
        return sorted(name for _, name in socket.if_nameindex())
    except OSError:
        return []


def read_interface(name):
    """Read the IPv4 address, subnet, MTU and MAC of interface ``name``.

    Raises ConfigError naming the interface and what to do when it does not
    exist or has no IPv4 address.
    """
    try:
        index = socket.if_nametoindex(name)
    except (OSError, UnicodeError):
        available = ", ".join(interface_names()) or "none found"
        raise ConfigError(
            f"--iface {name}: no such network interface; "
            f"available: {available}") from None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            address = _interface_ioctl(sock, SIOCGIFADDR, name)[20:24]
            netmask = _interface_ioctl(sock, SIOCGIFNETMASK, name)[20:24]
        except OSError:
            raise ConfigError(
                f"--iface {name}: interface has no IPv4 address; assign "
                f"one (ip addr add ADDR/PREFIX dev {name}) or choose the "
                f"interface that faces the clients") from None
        mtu = struct.unpack_from(
            "i", _interface_ioctl(sock, SIOCGIFMTU, name), 16)[0]
        mac = _interface_ioctl(sock, SIOCGIFHWADDR, name)[18:24]
    address = ipaddress.IPv4Address(address)
    network = ipaddress.IPv4Network(
        f"{address}/{ipaddress.IPv4Address(netmask)}", strict=False)
    return InterfaceInfo(name, index, address, network, mtu, mac)


def interface_mtu(ifindex):
    """Return the MTU of the interface with this index, or None."""
    try:
        name = socket.if_indextoname(ifindex)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            raw = _interface_ioctl(sock, SIOCGIFMTU, name)
        return struct.unpack_from("i", raw, 16)[0]
    except OSError:
        return None


def resolve_under_root(root, name):
    """Map a client's file name to a real path inside ``root``.

    ``root`` must already be a real (symlink-free) absolute path.  A leading
    '/' is dropped and '\\' is read as '/', as Windows Deployment Services
    clients send it.  When the exact name does not exist, a case-insensitive
    match is tried component by component.  After symlinks are resolved the
    path must be ``root`` itself or lie below it; the check compares whole
    path components, so a sibling such as /srv/tftp-private beside /srv/tftp
    is outside.  Raises TFTPError with FILE_NOT_FOUND or ACCESS_VIOLATION.
    """
    relative = name.replace("\\", "/").lstrip("/")
    if not relative or "\0" in relative:
        raise TFTPError(TFTPErrorCode.FILE_NOT_FOUND,
                        f"empty or invalid file name {printable(name)!r}")
    candidate = os.path.join(root, relative)
    if not os.path.lexists(candidate):
        candidate = _match_case_insensitive(root, relative) or candidate
    real = os.path.realpath(candidate)
    if real != root and not real.startswith(root + os.sep):
        raise TFTPError(TFTPErrorCode.ACCESS_VIOLATION,
                        f"path {printable(name)!r} resolves to {real!r}, "
                        f"outside the root {root!r}")
    return real


def _match_case_insensitive(root, relative):
    """Return the path whose components match ``relative`` ignoring case.

    Returns None when some component has no match.  Within one folder, an
    exact match wins, then the first case-insensitive match in sorted order.
    """
    current = root
    for part in relative.split("/"):
        if part in ("", "."):
            continue
        if part == ".." or os.path.lexists(os.path.join(current, part)):
            current = os.path.join(current, part)
            continue
        try:
            entries = sorted(os.listdir(current))
        except OSError:
            return None
        folded = part.casefold()
        match = next((entry for entry in entries
                      if entry.casefold() == folded), None)
        if match is None:
            return None
        current = os.path.join(current, match)
    return current


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def parse_ipv4(text):
    """Parse a dotted-quad IPv4 address."""
    try:
        return ipaddress.IPv4Address(text.strip())
    except ValueError:
        raise ValueError(f"invalid IPv4 address {text!r}; use a dotted quad "
                         f"such as 192.0.2.10") from None


def parse_ipv4_list(text):
    """Parse a comma-separated list of IPv4 addresses."""
    items = [item for item in text.replace(" ", ",").split(",") if item]
    return tuple(parse_ipv4(item) for item in items)


def _int_parser(low, high, unit=""):
    def parse(text):
        digits = str(text).strip()
        # int() would also take "1_000", "+5" and non-ASCII digits.
        if not re.fullmatch(r"-?[0-9]+", digits):
            raise ValueError(f"invalid integer {text!r}; use decimal "
                             f"digits")
        value = int(digits, 10)
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range; use {low} to "
                             f"{high}{unit}")
        return value
    return parse


def _float_parser(low, high, unit=""):
    def parse(text):
        try:
            value = float(str(text).strip())
        except ValueError:
            raise ValueError(f"invalid number {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"{value:g} is out of range; use {low:g} to "
                             f"{high:g}{unit}")
        return value
    return parse


def _choice_parser(*choices):
    def parse(text):
        value = str(text).strip().lower()
        if value not in choices:
            raise ValueError(f"invalid choice {text!r}; use one of "
                             f"{', '.join(choices)}")
        return value
    return parse


def parse_bool(text):
    """Parse an INI boolean (yes/no, true/false, on/off, 1/0)."""
    value = str(text).strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"invalid boolean {text!r}; use yes or no")


def parse_port_range(text):
    """Parse 'LOW-HIGH' into a pair of UDP ports."""
    low, sep, high = str(text).partition("-")
    parse_port = _int_parser(1, 65535)
    if not sep:
        raise ValueError(f"invalid port range {text!r}; use LOW-HIGH such "
                         f"as 30000-30100")
    low, high = parse_port(low), parse_port(high)
    if low > high:
        raise ValueError(f"invalid port range {text!r}: {low} is above "
                         f"{high}")
    return (low, high)


def parse_text(text):
    """Parse a plain string setting; surrounding blanks are dropped."""
    return str(text).strip()


def parse_optional_text(text):
    """Parse a string setting where an empty value means 'off'."""
    return str(text).strip()


class Setting(typing.NamedTuple):
    """One setting: its INI section and key, and how to read it.

    The flag is the key in kebab case (``tftp_port`` is ``--tftp-port``),
    so the INI file and the command line use the same names.  ``default``
    is the value before parsing, or None for "not set".
    """

    section: str
    key: str
    parse: typing.Callable
    default: typing.Any
    help: str
    metavar: str = None

    @property
    def flag(self):
        return "--" + self.key.replace("_", "-")


MODES = ("auto", "full", "proxy", "off")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Flags override the INI file, which overrides these defaults.
SETTINGS = (
    # [server]
    Setting("server", "iface", parse_text, None,
            "network interface to serve DHCP on and to learn the server "
            "address, subnet and MTU from", "IFACE"),
    Setting("server", "root", parse_text, "/srv/tftp",
            "folder served by TFTP; no file outside it is ever served",
            "DIR"),
    Setting("server", "mode", _choice_parser(*MODES), "auto",
            "DHCP mode: full (lease pool and boot files), proxy (boot files "
            "only, beside an existing DHCP server), off (TFTP only), or auto "
            "(probe the interface at start-up: proxy if another DHCP server "
            "answers, else full)", "MODE"),
    Setting("server", "server_address", parse_ipv4, None,
            "IPv4 address announced to clients as the DHCP and TFTP server "
            "(default: the address of --iface)", "ADDR"),
    Setting("server", "log_level", _choice_parser(*LOG_LEVELS), "info",
            "lowest level logged: debug, info, warning or error", "LEVEL"),
    Setting("server", "log_timestamps", parse_bool, "yes",
            "start each log line with a timestamp; turn off under journald, "
            "which adds its own", "BOOL"),
    Setting("server", "log_format", _choice_parser("text", "json"), "text",
            "log line format: text, or json for one JSON object per line "
            "with the event's fields (DHCP offers and ACKs, transfer starts "
            "and ends)", "FORMAT"),
    Setting("server", "log_file", parse_optional_text, "",
            "file the log is appended to; - is standard output (default: "
            "standard error)", "FILE"),
    Setting("server", "user", parse_optional_text, "",
            "user to switch to once every privileged socket is bound; the "
            "lease file, and its folder if the server created it, is given "
            "to that user (default: stay as started)", "NAME"),
    Setting("server", "exit_after", _int_parser(0, 1 << 31), "0",
            "exit with status 0 once this many clients have downloaded "
            "their boot file (or --exit-after-file) over TFTP; 0 never "
            "exits", "COUNT"),
    Setting("server", "exit_after_file", parse_optional_text, "",
            "file that --exit-after counts downloads of (default: any "
            "configured boot file)", "NAME"),
    # [tftp]
    Setting("tftp", "tftp_address", parse_ipv4, "0.0.0.0",
            "local IPv4 address the TFTP server listens on", "ADDR"),
    Setting("tftp", "tftp_port", _int_parser(0, 65535), "69",
            "UDP port of the TFTP server; 0 picks a free port", "PORT"),
    Setting("tftp", "tftp_port_range", parse_port_range, None,
            "UDP ports for transfer sockets, as LOW-HIGH, to fit firewall "
            "rules (default: any free port)", "LOW-HIGH"),
    Setting("tftp", "max_blksize", _int_parser(TFTP_MIN_BLKSIZE,
                                                TFTP_MAX_BLKSIZE), None,
            "largest TFTP block size granted, in bytes (default: what fits "
            "the MTU of the interface the request came in on, so DATA "
            "packets are never fragmented)", "BYTES"),
    Setting("tftp", "max_windowsize", _int_parser(TFTP_MIN_WINDOWSIZE,
                                                   TFTP_MAX_WINDOWSIZE),
            "64", "largest TFTP windowsize granted (RFC 7440), in blocks",
            "BLOCKS"),
    Setting("tftp", "tftp_timeout", _float_parser(0.5, 255.0, " seconds"),
            "5", "longest wait for an ACK before a retransmission, in "
            "seconds; shorter waits follow the measured round-trip time",
            "SECONDS"),
    Setting("tftp", "tftp_busy_poll", _int_parser(0, 1000), "50",
            "how long a transfer polls for the client's ACK before its "
            "thread sleeps, in microseconds; 0 turns polling off.  It "
            "runs only while the transfer is the only one and only while "
            "it finds ACKs", "MICROSECONDS"),
    Setting("tftp", "tftp_retries", _int_parser(1, 100), "6",
            "retransmissions of one packet before a transfer is abandoned",
            "COUNT"),
    Setting("tftp", "max_transfers", _int_parser(1, 100000), "256",
            "concurrent TFTP transfers; requests beyond it get an ERROR",
            "COUNT"),
    Setting("tftp", "upload_dir", parse_optional_text, "",
            "folder that accepts TFTP uploads (WRQ); empty rejects all "
            "uploads", "DIR"),
    Setting("tftp", "upload_overwrite", parse_bool, "no",
            "let an upload replace an existing file", "BOOL"),
    Setting("tftp", "upload_max_bytes", _int_parser(0, 1 << 40),
            str(100 << 20), "largest upload accepted, in bytes", "BYTES"),
    # [http]
    Setting("http", "http_port", _int_parser(0, 65535), None,
            "TCP port of the HTTP server for boot files; iPXE then gets its "
            "script over HTTP, and UEFI HTTP Boot clients are answered "
            "(default: no HTTP server)", "PORT"),
    Setting("http", "http_address", parse_ipv4, "0.0.0.0",
            "local IPv4 address the HTTP server listens on", "ADDR"),
    # [dhcp]
    Setting("dhcp", "pool_start", parse_ipv4, None,
            "first address of the lease pool (default: derived from the "
            "subnet of --iface)", "ADDR"),
    Setting("dhcp", "pool_end", parse_ipv4, None,
            "last address of the lease pool", "ADDR"),
    Setting("dhcp", "router", parse_ipv4, None,
            "default gateway sent to clients (option 3); none by default",
            "ADDR"),
    Setting("dhcp", "dns_servers", parse_ipv4_list, None,
            "comma-separated DNS servers sent to clients (option 6)",
            "ADDRS"),
    Setting("dhcp", "domain_name", parse_optional_text, "",
            "domain name sent to clients (option 15)", "NAME"),
    Setting("dhcp", "lease_time", _int_parser(60, 365 * 86400,
                                               " seconds"), "3600",
            "lease time granted, in seconds", "SECONDS"),
    Setting("dhcp", "lease_file", parse_text,
            "/var/lib/pxeserver/leases.json",
            "file the leases are kept in across restarts", "FILE"),
    Setting("dhcp", "known_clients_only", parse_bool, "no",
            "answer only MAC addresses that have a [host:MAC] section",
            "BOOL"),
    # [boot]
    Setting("boot", "bios_file", parse_optional_text, "undionly.kpxe",
            "boot file for BIOS clients (option 93 = 0)", "NAME"),
    Setting("boot", "efi32_file", parse_optional_text, "ipxe-i386.efi",
            "boot file for 32-bit x86 UEFI clients (option 93 = 6)", "NAME"),
    Setting("boot", "efi64_file", parse_optional_text, "ipxe.efi",
            "boot file for x86-64 UEFI clients (option 93 = 7 or 9)",
            "NAME"),
    Setting("boot", "arm32_efi_file", parse_optional_text, "ipxe-arm32.efi",
            "boot file for 32-bit ARM UEFI clients (option 93 = 10)",
            "NAME"),
    Setting("boot", "arm64_efi_file", parse_optional_text, "ipxe-arm64.efi",
            "boot file for 64-bit ARM UEFI clients (option 93 = 11)",
            "NAME"),
    Setting("boot", "riscv32_efi_file", parse_optional_text,
            "ipxe-riscv32.efi",
            "boot file for 32-bit RISC-V UEFI clients (option 93 = 25)",
            "NAME"),
    Setting("boot", "riscv64_efi_file", parse_optional_text,
            "ipxe-riscv64.efi",
            "boot file for 64-bit RISC-V UEFI clients (option 93 = 27)",
            "NAME"),
    Setting("boot", "uboot_file", parse_optional_text, "boot.scr.uimg",
            "boot file for U-Boot clients (option 93 = 21 or 22, or a "
            "U-Boot vendor class); U-Boot's default boot command fetches "
            "boot.scr.uimg itself", "NAME"),
    Setting("boot", "fallback_file", parse_optional_text, "undionly.kpxe",
            "boot file for PXE clients of any other or a malformed "
            "architecture", "NAME"),
    Setting("boot", "ipxe_script", parse_optional_text, "boot.ipxe",
            "script given to clients that are already running iPXE, so a "
            "chainload ends instead of looping; empty gives iPXE the "
            "architecture's boot file", "NAME"),
)
SETTINGS_BY_KEY = {setting.key: setting for setting in SETTINGS}
SECTIONS = ("server", "tftp", "http", "dhcp", "boot")
HOST_SECTION_PREFIX = "host:"
HOST_KEYS = ("address", "hostname", "boot_file")


class Reservation(typing.NamedTuple):
    """A [host:MAC] section: fixed settings for one client."""

    mac: bytes
    address: ipaddress.IPv4Address = None
    hostname: str = ""
    boot_file: str = None


Config = typing.NamedTuple(
    "Config",
    [(setting.key, typing.Any) for setting in SETTINGS]
    + [("reservations", dict), ("config_file", str), ("explicit", frozenset)])
Config.__doc__ = """All settings, merged and validated; read-only.

``explicit`` holds the keys set by the INI file or a flag, as opposed to
those left at their defaults.
"""
Config.__new__.__defaults__ = (frozenset(),)


def default_values():
    """Return every setting's default, parsed."""
    return {setting.key: None if setting.default is None
            else setting.parse(setting.default) for setting in SETTINGS}


def read_ini(path):
    """Read and validate an INI file in one pass.

    Returns (values, reservations).  Raises ConfigError listing every bad
    key, value and section, not just the first.
    """
    # No [DEFAULT] section: its keys would be copied into every section.
    parser = configparser.ConfigParser(interpolation=None,
                                       inline_comment_prefixes=("#", ";"),
                                       default_section="\0")
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read: "
                          f"{exc.strerror}") from None
    except (configparser.Error, UnicodeError) as exc:
        message = str(exc).replace("\n", " ")
        raise ConfigError(f"{path}: invalid INI syntax: {message}") from None
    values, reservations, problems = {}, {}, []
    for section in parser.sections():
        if section.lower().startswith(HOST_SECTION_PREFIX):
            _read_host_section(path, parser, section, reservations, problems)
            continue
        if section not in SECTIONS:
            problems.append(f"{path}: unknown section [{section}]; use one "
                            f"of {', '.join(SECTIONS)} or host:MAC")
            continue
        for key, text in parser.items(section):
            setting = SETTINGS_BY_KEY.get(key)
            if setting is None or setting.section != section:
                problems.append(f"{path} [{section}] {key}: unknown key")
                continue
            try:
                values[key] = setting.parse(text)
            except ValueError as exc:
                problems.append(f"{path} [{section}] {key}: {exc}")
    if problems:
        raise ConfigError("; ".join(problems))
    return values, reservations


def _read_host_section(path, parser, section, reservations, problems):
    where = f"{path} [{section}]"
    try:
        mac = parse_mac(section[len(HOST_SECTION_PREFIX):])
    except ValueError as exc:
        problems.append(f"{where}: {exc}; use [host:52:54:00:12:34:56]")
        return
    fields = {}
    for key, text in parser.items(section):
        if key not in HOST_KEYS:
            problems.append(f"{where} {key}: unknown key; use one of "
                            f"{', '.join(HOST_KEYS)}")
            continue
        try:
            fields[key] = (parse_ipv4(text) if key == "address"
                           else parse_text(text))
        except ValueError as exc:
            problems.append(f"{where} {key}: {exc}")
    if mac in reservations:
        problems.append(f"{where}: duplicate section for this MAC address")
    reservations[mac] = Reservation(mac, **fields)


def build_config(args):
    """Merge defaults, the INI file and flags into one Config.

    ``args`` is the argparse namespace; a flag left out is None there, so
    the file's value or the default shows through.
    """
    values = default_values()
    reservations = {}
    explicit = set()
    if args.config:
        file_values, reservations = read_ini(args.config)
        values.update(file_values)
        explicit.update(file_values)
    for setting in SETTINGS:
        flag_value = getattr(args, setting.key)
        if flag_value is not None:
            values[setting.key] = flag_value
            explicit.add(setting.key)
    config = Config(reservations=reservations, config_file=args.config,
                    explicit=frozenset(explicit), **values)
    check_config(config)
    return config


def check_config(config):
    """Check settings that depend on each other; raise ConfigError."""
    problems = []
    if not os.path.isdir(config.root):
        problems.append(f"--root {config.root}: folder not found; create it "
                        f"or point --root at the folder of boot files")
    if config.mode != "off" and not config.iface:
        problems.append("--iface is missing: DHCP needs the interface that "
                        "faces the clients; give --iface IFACE, or use "
                        "--tftp-only to serve TFTP alone")
    if (config.pool_start is None) != (config.pool_end is None):
        problems.append("--pool-start and --pool-end go together; give both "
                        "or neither")
    elif config.pool_start is not None and config.pool_start > config.pool_end:
        problems.append(f"--pool-start {config.pool_start} is above "
                        f"--pool-end {config.pool_end}")
    if config.upload_dir and not os.path.isdir(config.upload_dir):
        problems.append(f"--upload-dir {config.upload_dir}: folder not "
                        f"found; create it or leave the setting empty")
    if problems:
        raise ConfigError("; ".join(problems))


# ---------------------------------------------------------------------------
# DHCP packet layer (RFC 2131, 2132, 3396)
# ---------------------------------------------------------------------------

_ZERO_ADDRESS = ipaddress.IPv4Address(0)


class DHCPPacket(typing.NamedTuple):
    """A BOOTP/DHCP message with the RFC 2131 field names.

    Addresses are IPv4Address objects, ``chaddr``, ``sname`` and ``file``
    are raw bytes, and ``options`` maps option codes to raw values, with
    repeated options already joined (RFC 3396).
    """

    op: int
    htype: int = HTYPE_ETHERNET
    hlen: int = ETHERNET_ADDRESS_LENGTH
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: ipaddress.IPv4Address = _ZERO_ADDRESS
    yiaddr: ipaddress.IPv4Address = _ZERO_ADDRESS
    siaddr: ipaddress.IPv4Address = _ZERO_ADDRESS
    giaddr: ipaddress.IPv4Address = _ZERO_ADDRESS
    chaddr: bytes = b""
    sname: bytes = b""
    file: bytes = b""
    options: dict = {}

    @property
    def mac(self):
        """The client hardware address, ``hlen`` bytes of ``chaddr``."""
        return self.chaddr[:self.hlen]

    @property
    def message_type(self):
        """The option 53 value as DHCPMessageType, or None if absent."""
        raw = self.options.get(OPT_MESSAGE_TYPE)
        if raw is None:
            return None
        return DHCPMessageType(raw[0])


def parse_dhcp_options(data, where, options=None):
    """Parse an options area into ``options`` (a dict); raise PacketError.

    PAD bytes are skipped and END stops the scan; a missing END is
    tolerated.  Repeated options are concatenated (RFC 3396).
    """
    options = {} if options is None else options
    offset = 0
    while offset < len(data):
        code = data[offset]
        if code == OPT_PAD:
            offset += 1
            continue
        if code == OPT_END:
            break
        if offset + 1 >= len(data):
            raise PacketError(f"option {code} in {where} at offset {offset} "
                              f"has no length byte")
        length = data[offset + 1]
        end = offset + 2 + length
        if end > len(data):
            raise PacketError(
                f"option {code} in {where} at offset {offset} has length "
                f"{length} but only {len(data) - offset - 2} bytes remain")
        options[code] = options.get(code, b"") + data[offset + 2:end]
        offset = end
    return options


def parse_dhcp_packet(data):
    """Parse a DHCP message; raise PacketError naming the bad field.

    Checks the header length, hlen, the magic cookie, each option length,
    option 53 (must be present, one byte, a known type) and follows option
    overload (RFC 2132 section 9.3) into ``file`` and ``sname``.
    """
    minimum = BOOTP_HEADER.size + len(MAGIC_COOKIE)
    if len(data) < minimum:
        raise PacketError(f"packet too short: {len(data)} bytes, need at "
                          f"least {minimum}")
    fields = BOOTP_HEADER.unpack_from(data)
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr,
     giaddr, chaddr, sname, file) = fields
    if hlen > len(chaddr):
        raise PacketError(f"hlen {hlen} is longer than chaddr (16 bytes)")
    cookie = data[BOOTP_HEADER.size:minimum]
    if cookie != MAGIC_COOKIE:
        raise PacketError(f"bad magic cookie {cookie.hex()}, expected "
                          f"{MAGIC_COOKIE.hex()}")
    options = parse_dhcp_options(data[minimum:], "options")
    overload = options.get(OPT_OVERLOAD, b"\0")
    if len(overload) != 1:
        raise PacketError(f"option 52 (overload) has length {len(overload)}, "
                          f"expected 1")
    if overload[0] & OVERLOAD_FILE:
        parse_dhcp_options(file, "file", options)
    if overload[0] & OVERLOAD_SNAME:
        parse_dhcp_options(sname, "sname", options)
    message_type = options.get(OPT_MESSAGE_TYPE)
    if message_type is None:
        raise PacketError("option 53 (DHCP message type) missing: a BOOTP "
                          "request, which this server does not answer")
    if len(message_type) != 1:
        raise PacketError(f"option 53 has length {len(message_type)}, "
                          f"expected 1")
    try:
        DHCPMessageType(message_type[0])
    except ValueError:
        raise PacketError(f"option 53 has unknown message type "
                          f"{message_type[0]}") from None
    return DHCPPacket(op, htype, hlen, hops, xid, secs, flags,
                      ipaddress.IPv4Address(ciaddr),
                      ipaddress.IPv4Address(yiaddr),
                      ipaddress.IPv4Address(siaddr),
                      ipaddress.IPv4Address(giaddr),
                      chaddr, sname.rstrip(b"\0"), file.rstrip(b"\0"),
                      options)


def encode_dhcp_options(options, order=()):
    """Encode options, codes in ``order`` first, then END.

    A value longer than 255 bytes is split into several instances of the
    same option (RFC 3396).
    """
    codes = list(dict.fromkeys(code for code in order if code in options))
    codes += [code for code in options if code not in codes]
    out = bytearray()
    for code in codes:
        value = options[code]
        for start in range(0, max(len(value), 1), 255):
            chunk = value[start:start + 255]
            out += bytes((code, len(chunk))) + chunk
    out.append(OPT_END)
    return bytes(out)


def build_dhcp_packet(packet, order=(), min_bytes=BOOTP_MIN_PACKET_BYTES):
    """Build the wire form of a DHCPPacket, padded to ``min_bytes``.

    The padding goes after END (RFC 2131 section 4.1 wants PAD only there).
    """
    header = BOOTP_HEADER.pack(
        packet.op, packet.htype, packet.hlen, packet.hops, packet.xid,
        packet.secs, packet.flags, packet.ciaddr.packed,
        packet.yiaddr.packed, packet.siaddr.packed, packet.giaddr.packed,
        packet.chaddr, packet.sname, packet.file)
    data = (header + MAGIC_COOKIE
            + encode_dhcp_options(packet.options, order))
    return data.ljust(min_bytes, b"\0")


def option_address(options, code):
    """Decode a one-address option, or None when absent or malformed."""
    raw = options.get(code)
    if raw is None or len(raw) != 4:
        return None
    return ipaddress.IPv4Address(raw)


def option_uint16(options, code):
    """Decode a 16-bit option, or None when absent or malformed."""
    raw = options.get(code)
    if raw is None or len(raw) != 2:
        return None
    return struct.unpack("!H", raw)[0]


def encode_addresses(addresses):
    return b"".join(address.packed for address in addresses)


# ---------------------------------------------------------------------------
# Boot policy (PXE specification 2.1, RFC 4578)
# ---------------------------------------------------------------------------

# The boot-file setting for each client architecture.
ARCH_BOOT_SETTINGS = {
    ClientArch.BIOS: "bios_file",
    ClientArch.EFI_IA32: "efi32_file",
    ClientArch.EFI_X64: "efi64_file",
    ClientArch.EFI_X64_ALT: "efi64_file",
    ClientArch.EFI_ARM32: "arm32_efi_file",
    ClientArch.EFI_ARM64: "arm64_efi_file",
    ClientArch.EFI_IA32_HTTP: "efi32_file",
    ClientArch.EFI_X64_HTTP: "efi64_file",
    ClientArch.EFI_ARM32_HTTP: "arm32_efi_file",
    ClientArch.EFI_ARM64_HTTP: "arm64_efi_file",
    ClientArch.UBOOT_ARM32: "uboot_file",
    ClientArch.UBOOT_ARM64: "uboot_file",
    ClientArch.EFI_RISCV32: "riscv32_efi_file",
    ClientArch.EFI_RISCV64: "riscv64_efi_file",
}

# U-Boot names its CPU in the vendor class ("U-Boot.armv8"); some builds
# send no option 93, so the architecture is taken from here instead.
UBOOT_VENDOR_PREFIX = b"U-Boot"
UBOOT_VENDOR_ARCHES = (
    (b"armv8", ClientArch.UBOOT_ARM64),
    (b"aarch64", ClientArch.UBOOT_ARM64),
    (b"arm", ClientArch.UBOOT_ARM32),
)


UBOOT_ARCHES = frozenset((ClientArch.UBOOT_ARM32, ClientArch.UBOOT_ARM64))
BOOT_FILE_SETTINGS = ("bios_file", "efi32_file", "efi64_file",
                      "arm32_efi_file", "arm64_efi_file", "riscv32_efi_file",
                      "riscv64_efi_file", "uboot_file", "fallback_file",
                      "ipxe_script")


def boot_file_names(config):
    """Return every non-empty boot file name the configuration can give out.

    The names come from the boot-file settings and the [host:MAC] sections.
    """
    names = {getattr(config, key) for key in BOOT_FILE_SETTINGS}
    names.update(reservation.boot_file
                 for reservation in config.reservations.values())
    return {name for name in names if name}


class ClientInfo(typing.NamedTuple):
    """The facts about the booting client that a DHCP request carries."""

    arch: int = None  # option 93, or None when absent or malformed
    arch_error: str = None  # why option 93 could not be read
    vendor_class: bytes = b""
    is_pxe: bool = False  # option 60 starts with "PXEClient"
    is_ipxe: bool = False
    uuid: bytes = None  # option 97, echoed back to PXE clients
    is_raspberry_pi: bool = False
    is_http: bool = False  # option 60 starts with "HTTPClient": UEFI HTTP Boot

    @property
    def arch_name(self):
        if self.arch is None:
            return "none"
        try:
            return ClientArch(self.arch).name.lower()
        except ValueError:
            return f"unknown-{self.arch}"


def is_ipxe_client(options):
    """Tell whether the request comes from iPXE.

    iPXE sends user class "iPXE" (option 77), which some builds encode as
    RFC 3004 length-prefixed instances and others as the 4 raw bytes, and
    its own option 175.
    """
    if OPT_IPXE_ENCAPSULATED in options:
        return True
    raw = options.get(OPT_USER_CLASS, b"")
    if raw == IPXE_USER_CLASS:
        return True
    offset = 0
    while offset < len(raw):
        length = raw[offset]
        if raw[offset + 1:offset + 1 + length] == IPXE_USER_CLASS:
            return True
        offset += 1 + length
    return False


def _uboot_arch(vendor_class):
    """Return the option 93 code for a U-Boot vendor class, or None."""
    cpu = vendor_class[len(UBOOT_VENDOR_PREFIX):].lower()
    for marker, arch in UBOOT_VENDOR_ARCHES:
        if marker in cpu:
            return arch
    return None


def describe_client(packet):
    """Read the PXE-related options of a request into a ClientInfo."""
    options = packet.options
    arch, arch_error = None, None
    raw_arch = options.get(OPT_CLIENT_ARCH)
    if raw_arch is not None:
        # RFC 4578 allows a list of 16-bit types; the first one is used.
        if len(raw_arch) < 2 or len(raw_arch) % 2:
            arch_error = (f"option 93 has length {len(raw_arch)}, expected "
                          f"a multiple of 2")
        else:
            arch = struct.unpack_from("!H", raw_arch)[0]
    vendor_class = options.get(OPT_VENDOR_CLASS_IDENTIFIER, b"")
    if arch is None and vendor_class.startswith(UBOOT_VENDOR_PREFIX):
        arch = _uboot_arch(vendor_class)
    return ClientInfo(
        arch=arch, arch_error=arch_error, vendor_class=vendor_class,
        is_pxe=vendor_class.startswith(PXE_VENDOR_CLASS),
        is_ipxe=is_ipxe_client(options),
        uuid=options.get(OPT_CLIENT_UUID),
        is_raspberry_pi=(vendor_class == RASPBERRY_PI_VENDOR_CLASS
                         and packet.mac[:3] in RASPBERRY_PI_OUIS),
        is_http=vendor_class.startswith(HTTP_VENDOR_CLASS))


def wants_boot_file(client, options):
    """Tell whether a client should get boot information in replies."""
    if (client.is_pxe or client.is_ipxe or client.is_http
            or client.arch is not None or client.arch_error):
        return True
    return OPT_BOOTFILE_NAME in options.get(OPT_PARAMETER_REQUEST_LIST, b"")


def choose_boot_file(config, client, reservation=None, http_base=None):
    """Return (file name or URL, reason) for a client; it may be empty.

    Order: iPXE gets the iPXE script (so a chainload ends instead of
    loading iPXE again), then a per-MAC reservation, then the table by
    architecture, then the fallback.  With the HTTP server on
    (``http_base`` is its URL), iPXE gets its script as an http:// URL,
    and UEFI HTTP Boot clients get their file as one.  Without it, UEFI
    HTTP Boot clients get nothing, since they cannot use TFTP.
    """
    if client.is_ipxe and config.ipxe_script:
        if http_base:
            return _http_url(http_base, config.ipxe_script), "ipxe-http"
        return config.ipxe_script, "ipxe"
    if client.is_http and not http_base:
        return "", "http-off"
    if reservation is not None and reservation.boot_file:
        name, reason = reservation.boot_file, "host"
    elif ARCH_BOOT_SETTINGS.get(client.arch) is not None:
        name, reason = getattr(config, ARCH_BOOT_SETTINGS[client.arch]), "arch"
    else:
        name, reason = config.fallback_file, "fallback"
    if client.is_http and name:
        return _http_url(http_base, name), "http"
    return name, reason


def _http_url(http_base, name):
    return f"{http_base}/{urllib.parse.quote(name.lstrip('/'))}"


# ---------------------------------------------------------------------------
# Leases
# ---------------------------------------------------------------------------

LEASE_FILE_FORMAT = "pxeserver-leases"
LEASE_FILE_VERSION = 1
OFFER_HOLD_SECONDS = 60  # an offered address is kept for its client
# When the pool is full, an offer older than this may go to another client.
# Firmware sends its DHCPREQUEST within a few seconds of the offer.
OFFER_TAKEOVER_SECONDS = 10
DECLINE_QUARANTINE_SECONDS = 600  # RFC 2131 4.3.3: mark declined in use


class Lease(typing.NamedTuple):
    """An address bound to a MAC until ``expires`` (seconds since epoch)."""

    mac: str
    address: ipaddress.IPv4Address
    expires: float
    hostname: str = ""


class RequestResult(typing.NamedTuple):
    """The lease store's verdict on a DHCPREQUEST: ack, nak or ignore."""

    verdict: str
    address: ipaddress.IPv4Address = None
    reason: str = ""


class LeaseStore:
    """The pool, the leases and the lease file.

    Thread safe: one lock guards the tables.  Every change that a client is
    told about (an ACK, a release) is written to the file before the
    caller sends its reply: ``commit`` writes the whole table to a
    temporary file, fsyncs it and renames it over the old one, so a crash
    at any point leaves either the old or the new file.  Concurrent
    commits share one write (group commit).
    """

    def __init__(self, path, network, pool_start, pool_end, server_address,
                 reservations, lease_time, clock=time.time,
                 excluded=()):
        self.path = path
        self.created_folder = False
        # Addresses never leased besides the server's: the interface's own.
        self.excluded = frozenset(excluded) | {server_address}
        self.network = network
        self.pool_start = int(pool_start)
        self.pool_end = int(pool_end)
        self.server_address = server_address
        self.reservations = reservations  # MAC bytes -> Reservation
        self.lease_time = lease_time
        self._clock = clock
        self._lock = threading.Lock()
        self._leases = {}  # MAC text -> Lease
        self._by_address = {}  # IPv4Address -> MAC text
        self._offers = {}  # IPv4Address -> (MAC text, expiry)
        self._declined = {}  # IPv4Address -> expiry
        self._reserved = {reservation.address: format_mac(mac)
                          for mac, reservation in reservations.items()
                          if reservation.address is not None}
        self._cursor = self.pool_start
        self._changes = 0  # bumped on each change that must reach the file
        self._saved = 0
        self._writing = False
        self._written = threading.Condition(self._lock)

    def set_reservations(self, reservations):
        """Replace the [host:MAC] reservations (on SIGHUP)."""
        with self._lock:
            self.reservations = reservations
            self._reserved = {reservation.address: format_mac(mac)
                              for mac, reservation in reservations.items()
                              if reservation.address is not None}

    def pool_text(self):
        start = ipaddress.IPv4Address(self.pool_start)
        end = ipaddress.IPv4Address(self.pool_end)
        text = f"{start}-{end}"
        if self.pool_start <= int(self.server_address) <= self.pool_end:
            text += f" (excluding {self.server_address})"
        return text

    def pool_size(self):
        size = self.pool_end - self.pool_start + 1
        for address in self.excluded:
            if self.pool_start <= int(address) <= self.pool_end:
                size -= 1
        return size

    # --- loading and saving

    def load(self):
        """Read the lease file; a missing file starts empty.

        A damaged file is moved aside with a warning and the store starts
        empty.  Leases for addresses outside the pool (the pool may have
        changed since they were written) are dropped with a warning.
        Raises StartupError when the lease folder cannot be created.
        """
        folder = os.path.dirname(os.path.abspath(self.path))
        if os.path.isdir(self.path):
            raise ConfigError(f"--lease-file {self.path}: is a folder; name "
                              f"a file, such as {self.path}/leases.json")
        self.created_folder = not os.path.isdir(folder)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"--lease-file {self.path}: cannot create "
                               f"folder {folder}: {exc.strerror}; choose "
                               f"another --lease-file") from None
        self.check_writable()
        try:
            with open(self.path, encoding="utf-8") as handle:
                document = json.load(handle)
            entries = self._check_document(document)
        except FileNotFoundError:
            dhcp_log.info("lease file %s not found; starting with no "
                          "leases", self.path)
            return
        except (OSError, ValueError) as exc:
            self._move_aside(exc)
            return
        dropped = [entry for entry in entries if not self._load_entry(entry)]
        if dropped:
            self._keep_copy(len(dropped))
        dhcp_log.info("loaded %d leases from %s", len(self._leases),
                      self.path)

    def check_writable(self):
        """Raise StartupError unless the lease folder accepts new files.

        The file is replaced by renaming a temporary file over it, so the
        folder, not only the file, must be writable.
        """
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StartupError(f"--lease-file {self.path}: cannot write in "
                               f"{folder}: {exc.strerror}; make the folder "
                               f"writable for the server's user or choose "
                               f"another --lease-file") from None

    def _keep_copy(self, count):
        """Copy the lease file aside before leases dropped at load are lost."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(self._clock()))
        copy = f"{self.path}.before-{stamp}"
        try:
            shutil.copy2(self.path, copy)
        except OSError as exc:
            dhcp_log.error("cannot keep a copy of %s before dropping %d "
                           "leases: %s", self.path, count, exc)
            return
        dhcp_log.warning("lease file %s: %d leases dropped; the file as it "
                         "was is kept in %s", self.path, count, copy)

    @staticmethod
    def _check_document(document):
        if (not isinstance(document, dict)
                or document.get("format") != LEASE_FILE_FORMAT
                or not isinstance(document.get("leases"), list)):
            raise ValueError(f"not a {LEASE_FILE_FORMAT} file")
        return document["leases"]

    def _move_aside(self, exc):
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(self._clock()))
        damaged = f"{self.path}.damaged-{stamp}"
        suffix = 1
        while os.path.lexists(damaged):
            suffix += 1
            damaged = f"{self.path}.damaged-{stamp}-{suffix}"
        try:
            os.replace(self.path, damaged)
        except OSError as move_error:
            raise StartupError(
                f"lease file {self.path} is damaged ({exc}) and cannot be "
                f"moved aside: {move_error.strerror}; move it by hand") \
                from None
        dhcp_log.warning("lease file %s is damaged (%s); moved it to %s and "
                         "started with no leases", self.path, exc, damaged)

    def _load_entry(self, entry):
        """Load one lease entry; return False, after a warning, if dropped."""
        try:
            mac = format_mac(parse_mac(entry["mac"]))
            address = ipaddress.IPv4Address(entry["address"])
            expires = float(entry["expires"])
            hostname = str(entry.get("hostname", ""))
            if not math.isfinite(expires):
                raise ValueError(f"expires {expires!r} is not a finite time")
        except (KeyError, TypeError, ValueError) as exc:
            dhcp_log.warning("lease file %s: entry %s dropped: %s; expected "
                             "an object with mac, address and expires",
                             self.path, printable(repr(entry)), exc)
            return False
        if not self._is_assignable(address, mac):
            dhcp_log.warning("lease file %s: lease of %s to %s dropped: the "
                             "address is outside the pool", self.path,
                             address, mac)
            return False
        if address in self._by_address or mac in self._leases:
            dhcp_log.warning("lease file %s: duplicate lease of %s to %s "
                             "dropped", self.path, address, mac)
            return False
        self._bind(Lease(mac, address, expires, hostname))
        return True

    def _snapshot(self):
        leases = sorted(self._leases.values(), key=lambda lease:
                        int(lease.address))
        return {"format": LEASE_FILE_FORMAT, "version": LEASE_FILE_VERSION,
                "leases": [{"mac": lease.mac, "address": str(lease.address),
                            "expires": int(lease.expires),
                            "hostname": lease.hostname}
                           for lease in leases]}

    def _write(self, document):
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, temporary = tempfile.mkstemp(
            dir=folder, prefix=os.path.basename(self.path) + ".",
            suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=1)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            os.unlink(temporary)
            raise
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def commit(self):
        """Write every change made so far to the file before returning.

        Returns False, after logging an ERROR, when the file cannot be
        written; the caller must then not confirm the lease to the client.
        """
        with self._lock:
            target = self._changes
            while self._saved < target:
                if self._writing:
                    self._written.wait()
                    continue
                self._writing = True
                generation = self._changes
                try:
                    document = self._snapshot()
                except (TypeError, ValueError, OverflowError) as exc:
                    self._writing = False
                    self._written.notify_all()
                    dhcp_log.error("cannot encode the lease table: %s", exc)
                    return False
                self._lock.release()
                try:
                    self._write(document)
                    error = None
                except OSError as exc:
                    error = exc
                finally:
                    self._lock.acquire()
                    self._writing = False
                    self._written.notify_all()
                if error is not None:
                    dhcp_log.error("cannot write lease file %s: %s; leases "
                                   "are not confirmed until it can be "
                                   "written", self.path, error)
                    return False
                self._saved = max(self._saved, generation)
            return True

    # --- lookups

    def _is_assignable(self, address, mac):
        """Tell whether ``address`` may be leased to ``mac`` at all."""
        if address in self.excluded:
            return False
        if address not in self.network or address in (
                self.network.network_address,
                self.network.broadcast_address):
            return False
        owner = self._reserved.get(address)
        if owner is not None:
            return owner == mac
        return self.pool_start <= int(address) <= self.pool_end

    def _is_free_for(self, address, mac, now):
        """Tell whether ``address`` is unused by others at time ``now``."""
        if not self._is_assignable(address, mac):
            return False
        holder = self._by_address.get(address)
        if holder is not None and holder != mac:
            if self._leases[holder].expires > now:
                return False
        offer = self._offers.get(address)
        if offer is not None and offer[0] != mac and offer[1] > now:
            return False
        return self._declined.get(address, 0) <= now

    def _bind(self, lease):
        old = self._leases.get(lease.mac)
        if old is not None and self._by_address.get(old.address) == lease.mac:
            del self._by_address[old.address]
        previous = self._by_address.get(lease.address)
        if previous is not None and previous != lease.mac:
            del self._leases[previous]
        self._leases[lease.mac] = lease
        self._by_address[lease.address] = lease.mac

    def lease_for(self, mac):
        with self._lock:
            return self._leases.get(mac)

    def leases(self):
        with self._lock:
            return list(self._leases.values())

    # --- DHCP operations

    def offer(self, mac, requested=None):
        """Pick an address to offer ``mac`` and hold it briefly.

        Order (RFC 2131 section 4.3.1): the reservation, the client's
        current or last lease, the requested address if free, then the
        next free address of the pool.  Returns None when the pool is
        exhausted.
        """
        now = self._clock()
        with self._lock:
            address = self._choose(mac, requested, now)
            if address is not None:
                self._offers[address] = (mac, now + OFFER_HOLD_SECONDS)
            return address

    def _choose(self, mac, requested, now):
        reservation = self.reservations.get(parse_mac(mac))
        if reservation is not None and reservation.address is not None:
            if self._is_free_for(reservation.address, mac, now):
                return reservation.address
            return None
        lease = self._leases.get(mac)
        if lease is not None and self._is_free_for(lease.address, mac, now):
            return lease.address
        for address, (holder, expires) in self._offers.items():
            # A repeated DHCPDISCOVER gets the address already offered.
            if holder == mac and expires > now:
                return address
        if requested is not None and self._is_free_for(requested, mac, now):
            return requested
        return self._next_free(mac, now)

    def _next_free(self, mac, now):
        """Scan the pool from the cursor for a free address.

        Addresses never leased are preferred; when none is left, the
        address whose lease expired longest ago is reclaimed.  When every
        address is leased or offered, the oldest offer to another client
        made over OFFER_TAKEOVER_SECONDS ago is taken over.  Offers cost a
        client nothing to repeat, so this keeps a flood of DHCPDISCOVERs
        from random MACs from holding the whole pool for the full hold.
        """
        takeover_before = now + OFFER_HOLD_SECONDS - OFFER_TAKEOVER_SECONDS
        size = self.pool_end - self.pool_start + 1
        oldest = None
        oldest_offer = None
        for step in range(size):
            value = self.pool_start + (self._cursor - self.pool_start
                                       + step) % size
            address = ipaddress.IPv4Address(value)
            if not self._is_free_for(address, mac, now):
                offer = self._offers.get(address)
                if (offer is not None and offer[1] <= takeover_before
                        and self._is_offer_only(address, now)
                        and (oldest_offer is None
                             or offer[1] < oldest_offer[0])):
                    oldest_offer = (offer[1], address)
                continue
            holder = self._by_address.get(address)
            if holder is None or holder == mac:
                self._cursor = value + 1 if value < self.pool_end \
                    else self.pool_start
                return address
            expires = self._leases[holder].expires
            if oldest is None or expires < oldest[0]:
                oldest = (expires, address)
        if oldest is not None:
            return oldest[1]
        return None if oldest_offer is None else oldest_offer[1]

    def _is_offer_only(self, address, now):
        """Tell whether ``address`` is held by nothing but a pending offer."""
        if self._declined.get(address, 0) > now:
            return False
        holder = self._by_address.get(address)
        return holder is None or self._leases[holder].expires <= now

    def request(self, mac, address, hostname=""):
        """Decide a DHCPREQUEST for ``address`` and bind it on ACK.

        As the only server of its network, the store ACKs an address that
        is free and valid for the client, in any state of the client and
        even without a record of it, and NAKs one that is not.
        """
        now = self._clock()
        with self._lock:
            if not self._is_assignable(address, mac):
                return RequestResult("nak", address,
                                     f"{address} is not in the pool for "
                                     f"this client")
            if not self._is_free_for(address, mac, now):
                return RequestResult("nak", address,
                                     f"{address} is in use by another client")
            reservation = self.reservations.get(parse_mac(mac))
            if (reservation is not None and reservation.address is not None
                    and reservation.address != address):
                return RequestResult("nak", address,
                                     f"this client is reserved "
                                     f"{reservation.address}")
            self._offers.pop(address, None)
            self._bind(Lease(mac, address, now + self.lease_time, hostname))
            self._changes += 1
            return RequestResult("ack", address)

    def cancel_offer(self, mac):
        """Drop the offers made to ``mac`` (it chose another server)."""
        with self._lock:
            for address, (holder, _) in list(self._offers.items()):
                if holder == mac:
                    del self._offers[address]

    def release(self, mac, address):
        """End the lease of ``mac`` on ``address``; return True if it had one.

        The lease stays in the table as expired, so the client gets the
        same address again while no one else needs it.
        """
        now = self._clock()
        with self._lock:
            lease = self._leases.get(mac)
            if lease is None or lease.address != address:
                return False
            self._leases[mac] = lease._replace(expires=now)
            self._changes += 1
            return True

    def decline(self, mac, address):
        """Quarantine an address the client found in use (DHCPDECLINE)."""
        now = self._clock()
        with self._lock:
            lease = self._leases.get(mac)
            if lease is None or lease.address != address:
                return False
            del self._leases[mac]
            del self._by_address[address]
            # NOTE: the quarantine lives in memory only; after a restart a
            # declined address can be offered again.
            self._declined[address] = now + DECLINE_QUARANTINE_SECONDS
            self._changes += 1
            return True


# ---------------------------------------------------------------------------
# DHCP server (RFC 2131, 2132)
# ---------------------------------------------------------------------------


def derive_pool(network, server_address, pool_start=None, pool_end=None):
    """Return the (start, end) of the lease pool; raise ConfigError.

    Without a configured range the pool is every host address of the
    subnet; the server's own address is excluded by the lease store.
    """
    if pool_start is None:
        if network.num_addresses < 4:
            raise ConfigError(
                f"subnet {network} of the interface is too small for a "
                f"pool; give the interface a larger subnet or set "
                f"--pool-start and --pool-end")
        start = network.network_address + 1
        end = network.broadcast_address - 1
        if server_address == start:
            start += 1
        elif server_address == end:
            end -= 1
        return start, end
    for flag, address in (("--pool-start", pool_start),
                          ("--pool-end", pool_end)):
        if address not in network:
            raise ConfigError(f"{flag} {address} is outside the interface "
                              f"subnet {network}; use an address inside it")
    return pool_start, pool_end


def check_reservations(reservations, network):
    """Raise ConfigError for reserved addresses that cannot be handed out.

    Every problem is listed: an address outside the interface's subnet,
    and an address reserved for two MAC addresses.
    """
    problems = []
    owners = {}
    for mac, reservation in sorted(reservations.items()):
        address = reservation.address
        if address is None:
            continue
        if address not in network:
            problems.append(f"[host:{format_mac(mac)}] address {address} is "
                            f"outside the interface subnet {network}")
        if address in owners:
            problems.append(f"[host:{format_mac(mac)}] address {address} is "
                            f"also reserved for {format_mac(owners[address])}")
        owners[address] = mac
    if problems:
        raise ConfigError("; ".join(problems))


def reply_destination(request, message_type, broadcast_address,
                      client_port=DHCP_CLIENT_PORT,
                      server_port=DHCP_SERVER_PORT):
    """Return (address, port) a reply goes to, per RFC 2131 section 4.1.

    Relayed requests go to the relay agent on the server port.  A NAK is
    broadcast, since the client has no usable address.  A client with an
    address in ciaddr gets unicast.  Otherwise the reply is broadcast.
    """
    if request.giaddr != _ZERO_ADDRESS:
        return str(request.giaddr), server_port
    if message_type == DHCPMessageType.DHCPNAK:
        return broadcast_address, client_port
    if request.ciaddr != _ZERO_ADDRESS:
        return str(request.ciaddr), client_port
    # NOTE: RFC 2131 lets a server unicast to yiaddr when the broadcast flag
    # is clear, which needs an ARP entry that only root can add.  The reply
    # is broadcast instead, which every client accepts.
    return broadcast_address, client_port


class DHCPRequestHandler(socketserver.BaseRequestHandler):
    """Hands one datagram to the server; runs in its own thread."""

    def handle(self):
        data, sock = self.request
        self.server.handle_packet(data, sock, self.client_address)


class DHCPServer(socketserver.ThreadingUDPServer):
    """The full-mode DHCP server: leases, boot files, replies.

    Bound to 0.0.0.0 on the DHCP port and to one interface with
    SO_BINDTODEVICE, so broadcasts on other interfaces are never answered.
    Each datagram is handled in its own daemon thread; the lease store
    serialises all changes.  ``broadcast_address`` and the ports can be
    changed for tests on loopback.
    """

    daemon_threads = True
    allow_reuse_address = True
    log_port_suffix = ""

    def __init__(self, config, interface, port=DHCP_SERVER_PORT,
                 client_port=DHCP_CLIENT_PORT,
                 broadcast_address="255.255.255.255", bind_device=True,
                 bind_address="0.0.0.0", http_base=None):
        self.config = config
        self.http_base = http_base
        self.interface = interface
        self.server_address_ip = config.server_address or interface.address
        self.client_port = client_port
        self.relay_port = DHCP_SERVER_PORT
        self.broadcast_address = broadcast_address
        self.bind_device = bind_device
        self.warnings = RateLimiter()
        self.other_servers = RateLimiter(per_minute=1)
        self.leases = self.make_lease_store()
        super().__init__((bind_address, port), DHCPRequestHandler,
                         bind_and_activate=False)
        try:
            self.server_bind()
        except OSError as exc:
            self.server_close()
            raise StartupError(_bind_error_text("DHCP", bind_address, port,
                                                exc)) from None

    @property
    def server_address_text(self):
        return str(self.server_address_ip)

    def make_lease_store(self):
        """Create and load the lease store; full mode only."""
        start, end = derive_pool(self.interface.network,
                                 self.server_address_ip,
                                 self.config.pool_start, self.config.pool_end)
        leases = LeaseStore(
            self.config.lease_file, self.interface.network, start, end,
            self.server_address_ip, self.config.reservations,
            self.config.lease_time, excluded={self.interface.address})
        check_reservations(self.config.reservations, self.interface.network)
        if leases.pool_size() <= 0:
            raise ConfigError(f"the pool {leases.pool_text()} contains no "
                              f"address besides the server's; widen "
                              f"--pool-start and --pool-end")
        leases.load()
        return leases

    def message_handlers(self):
        """Return the table of message type to handler method."""
        return {
            DHCPMessageType.DHCPDISCOVER: self._on_discover,
            DHCPMessageType.DHCPREQUEST: self._on_request,
            DHCPMessageType.DHCPDECLINE: self._on_decline,
            DHCPMessageType.DHCPRELEASE: self._on_release,
            DHCPMessageType.DHCPINFORM: self._on_inform,
        }

    def is_for_us(self, client):
        """Tell whether requests from this client are served and logged."""
        return True

    def server_bind(self):
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if self.bind_device:
            self.socket.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE,
                                   self.interface.name.encode() + b"\0")
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def handle_error(self, request, client_address):
        dhcp_log.exception("request from %s:%d failed: internal error",
                           client_address[0], client_address[1])

    # --- receiving

    def handle_packet(self, data, sock, source):
        """Parse, decide, and send the reply to one DHCP datagram."""
        try:
            packet = parse_dhcp_packet(data)
        except PacketError as exc:
            warn_limited(dhcp_log, self.warnings, source[0],
                         "malformed DHCP packet from %s:%d dropped: %s",
                         source[0], source[1], exc)
            return
        if not self._is_servable(packet, source):
            return

        client = describe_client(packet)
        mac = format_mac(packet.mac)
        if not self.is_for_us(client):
            dhcp_log.debug("%s from %s ignored: not a PXE client xid=0x%08x",
                           packet.message_type.name, mac, packet.xid)
            return
        self._log_request(packet, client, mac)
        if client.arch_error:
            # Rate limits go by source address: a client picks its own MAC.
            warn_limited(dhcp_log, self.warnings, source[0],
                         "%s from %s: %s; using the fallback boot file",
                         packet.message_type.name, mac, client.arch_error)
        if (self.config.known_clients_only
                and packet.mac not in self.config.reservations):
            dhcp_log.info("%s from %s ignored: not a known client "
                          "(known_clients_only) xid=0x%08x",
                          packet.message_type.name, mac, packet.xid)
            return

        handler = self.message_handlers().get(packet.message_type)
        if handler is None:
            dhcp_log.debug("%s from %s ignored: not handled by this server "
                           "xid=0x%08x", packet.message_type.name, mac,
                           packet.xid)
            return
        handler(packet, client, mac, sock, source)

    def _is_servable(self, packet, source):
        """Tell whether a parsed packet is a request this server can serve.

        Replies from other servers are ignored at DEBUG; a hardware address
        that is not Ethernet, or a relay from another subnet, is dropped
        with a rate-limited warning.
        """
        if packet.op != BOOTREQUEST:
            dhcp_log.debug("BOOTREPLY from %s:%d ignored (another DHCP "
                           "server on the segment?)", source[0], source[1])
            return False
        if packet.hlen != ETHERNET_ADDRESS_LENGTH:
            warn_limited(dhcp_log, self.warnings, source[0],
                         "DHCP request from %s:%d dropped: hlen %d is not "
                         "an Ethernet address", source[0], source[1],
                         packet.hlen)
            return False
        if (packet.giaddr != _ZERO_ADDRESS
                and packet.giaddr not in self.interface.network):
            warn_limited(dhcp_log, self.warnings, source[0],
                         "%s from relay %s dropped: no pool for its subnet",
                         packet.message_type.name, packet.giaddr)
            return False
        return True

    def _log_request(self, packet, client, mac):
        fields = [f"{packet.message_type.name} from {mac}",
                  f"via {self.interface.name}{self.log_port_suffix}",
                  f"xid=0x{packet.xid:08x}"]
        if packet.ciaddr != _ZERO_ADDRESS:
            fields.append(f"ciaddr={packet.ciaddr}")
        requested = option_address(packet.options, OPT_REQUESTED_IP)
        if requested is not None:
            fields.append(f"requested={requested}")
        if packet.giaddr != _ZERO_ADDRESS:
            fields.append(f"giaddr={packet.giaddr}")
        if client.is_pxe or client.arch is not None:
            fields.append(f"arch={client.arch_name}")
        if client.is_ipxe:
            fields.append("ipxe=yes")
        dhcp_log.info("%s", " ".join(fields))

    # --- message handlers

    def _on_discover(self, packet, client, mac, sock, source):
        requested = option_address(packet.options, OPT_REQUESTED_IP)
        address = self.leases.offer(mac, requested)
        if address is None:
            warn_limited(dhcp_log, self.warnings, "pool",
                         "DHCPDISCOVER from %s not answered: no free address "
                         "in the pool %s xid=0x%08x", mac,
                         self.leases.pool_text(), packet.xid)
            return
        self._reply(packet, client, mac, sock, DHCPMessageType.DHCPOFFER,
                    address)

    def _on_request(self, packet, client, mac, sock, source):
        server_id = option_address(packet.options, OPT_SERVER_ID)
        requested = option_address(packet.options, OPT_REQUESTED_IP)
        if server_id is not None and server_id != self.server_address_ip:
            # SELECTING with another server's identifier: the client took
            # another offer, so ours is withdrawn in silence.  Another
            # server that hands out addresses here is a fault, and this is
            # the only sign of one that unicasts its offers.
            self.leases.cancel_offer(mac)
            dhcp_log.info("DHCPREQUEST from %s is for server %s; offer "
                          "withdrawn xid=0x%08x", mac, server_id, packet.xid)
            warn_limited(dhcp_log, self.other_servers, str(server_id),
                         "another DHCP server, %s, is handing out addresses "
                         "on %s (client %s chose its offer): two servers on "
                         "one segment give clients conflicting leases; stop "
                         "it or run pxeserver with --mode proxy", server_id,
                         self.interface.name, mac)
            return
        address = requested
        if address is None and packet.ciaddr != _ZERO_ADDRESS:
            address = packet.ciaddr  # RENEWING or REBINDING
        if address is None:
            warn_limited(dhcp_log, self.warnings, source[0],
                         "DHCPREQUEST from %s dropped: neither option 50 nor "
                         "ciaddr names an address xid=0x%08x", mac,
                         packet.xid)
            return
        hostname = printable(packet.options.get(OPT_HOST_NAME, b""), 63)
        result = self.leases.request(mac, address, hostname)
        if result.verdict == "nak":
            self._nak(packet, mac, sock, result.reason)
            return
        if not self.leases.commit():
            return
        self._reply(packet, client, mac, sock, DHCPMessageType.DHCPACK,
                    address)

    def _on_decline(self, packet, client, mac, sock, source):
        address = option_address(packet.options, OPT_REQUESTED_IP)
        if address is not None and self.leases.decline(mac, address):
            self.leases.commit()
            dhcp_log.warning("DHCPDECLINE from %s: %s is in use by another "
                             "host; quarantined for %d s xid=0x%08x", mac,
                             address, DECLINE_QUARANTINE_SECONDS, packet.xid)

    def _on_release(self, packet, client, mac, sock, source):
        if self.leases.release(mac, packet.ciaddr):
            self.leases.commit()
            dhcp_log.info("released %s from %s xid=0x%08x", packet.ciaddr,
                          mac, packet.xid)

    def _on_inform(self, packet, client, mac, sock, source):
        self._reply(packet, client, mac, sock, DHCPMessageType.DHCPACK,
                    None)

    # --- replies

    def _nak(self, packet, mac, sock, reason):
        options = {
            OPT_MESSAGE_TYPE: bytes((DHCPMessageType.DHCPNAK,)),
            OPT_SERVER_ID: self.server_address_ip.packed,
            OPT_MESSAGE: reason.encode()[:255],
        }
        self._copy_relay_info(packet, options)
        flags = packet.flags
        if packet.giaddr != _ZERO_ADDRESS:
            # RFC 2131 4.3.2: a NAK through a relay must ask it to broadcast.
            flags |= FLAG_BROADCAST
        reply = DHCPPacket(op=BOOTREPLY, hlen=packet.hlen, xid=packet.xid,
                           flags=flags, giaddr=packet.giaddr,
                           chaddr=packet.chaddr, options=options)
        dhcp_log.info("DHCPNAK to %s: %s xid=0x%08x", mac, reason,
                      packet.xid)
        self._send(sock, packet, DHCPMessageType.DHCPNAK, reply)

    def _copy_relay_info(self, packet, options):
        relay_info = packet.options.get(OPT_RELAY_AGENT_INFORMATION)
        if relay_info is not None and packet.giaddr != _ZERO_ADDRESS:
            options[OPT_RELAY_AGENT_INFORMATION] = relay_info

    def _reply(self, packet, client, mac, sock, message_type, address):
        """Build and send an OFFER or ACK; ``address`` None is an INFORM."""
        reservation = self.config.reservations.get(packet.mac)
        options = self._reply_options(message_type, address, reservation)
        boot_file = ""
        if wants_boot_file(client, packet.options):
            boot_file = self._add_boot_options(client, reservation, options)
        self._copy_relay_info(packet, options)

        siaddr = self.server_address_ip if boot_file else _ZERO_ADDRESS
        reply = DHCPPacket(
            op=BOOTREPLY, hlen=packet.hlen, xid=packet.xid,
            flags=packet.flags, ciaddr=packet.ciaddr,
            yiaddr=address or _ZERO_ADDRESS, siaddr=siaddr,
            giaddr=packet.giaddr, chaddr=packet.chaddr,
            sname=b"", file=boot_file.encode()[:127], options=options)
        self._log_reply(packet, client, mac, message_type, address, boot_file)

        requested = packet.options.get(OPT_PARAMETER_REQUEST_LIST, b"")
        self._send(sock, packet, message_type, reply, tuple(requested))

    def _add_boot_options(self, client, reservation, options):
        """Add the boot options for a PXE client; return the boot file."""
        boot_file, _ = choose_boot_file(self.config, client, reservation,
                                        self.http_base)
        if boot_file:
            options[OPT_TFTP_SERVER_NAME] = self.server_address_text.encode()
            options[OPT_BOOTFILE_NAME] = boot_file.encode()
        # NOTE: full mode sends neither option 60 "PXEClient" nor option
        # 43, except to Raspberry Pis: with them, PXE firmware may look
        # for a boot server on port 4011, which only proxy mode runs.
        # Without them, BIOS PXE ROMs and UEFI take the boot file from
        # this offer directly.
        if client.uuid is not None:
            options[OPT_CLIENT_UUID] = client.uuid
        if client.is_raspberry_pi:
            options[OPT_VENDOR_CLASS_IDENTIFIER] = PXE_VENDOR_CLASS
            options[OPT_VENDOR_SPECIFIC] = raspberry_pi_vendor_options()
        if client.is_http and boot_file:
            # UEFI HTTP Boot accepts only offers with option 60 HTTPClient.
            options[OPT_VENDOR_CLASS_IDENTIFIER] = HTTP_VENDOR_CLASS
        return boot_file

    def _log_reply(self, packet, client, mac, message_type, address,
                   boot_file):
        """Log one line, and one JSON event, for an OFFER or ACK."""
        fields = [f"{message_type.name} to {mac}"]
        if address is not None:
            fields.append(f"yiaddr={address}")
        if boot_file:
            fields.append(f"bootfile={printable(boot_file)}")
            fields.append(f"arch={client.arch_name}")
        fields.append(f"xid=0x{packet.xid:08x}")
        event = {"event": message_type.name, "mac": mac,
                 "yiaddr": str(address) if address else None,
                 "bootfile": boot_file, "arch": client.arch_name,
                 "xid": f"0x{packet.xid:08x}"}
        dhcp_log.info("%s", " ".join(fields), extra={"event": event})

    def _reply_options(self, message_type, address, reservation):
        config = self.config
        options = {
            OPT_MESSAGE_TYPE: bytes((message_type,)),
            OPT_SERVER_ID: self.server_address_ip.packed,
        }
        if address is not None:
            lease_time = config.lease_time
            options[OPT_LEASE_TIME] = struct.pack("!I", lease_time)
            options[OPT_RENEWAL_TIME] = struct.pack("!I", lease_time // 2)
            options[OPT_REBINDING_TIME] = struct.pack("!I",
                                                      lease_time * 7 // 8)
        network = self.interface.network
        options[OPT_SUBNET_MASK] = network.netmask.packed
        if config.router is not None:
            options[OPT_ROUTER] = config.router.packed
        if config.dns_servers:
            options[OPT_DOMAIN_NAME_SERVER] = encode_addresses(
                config.dns_servers)
        if config.domain_name:
            options[OPT_DOMAIN_NAME] = config.domain_name.encode()
        options[OPT_BROADCAST_ADDRESS] = network.broadcast_address.packed
        if reservation is not None and reservation.hostname:
            options[OPT_HOST_NAME] = reservation.hostname.encode()
        return options

    def _send(self, sock, request, message_type, reply, requested=(),
              destination=None):
        """Encode ``reply`` within the client's size limit and send it.

        Options outside ALWAYS_SENT_OPTIONS go only to clients that list
        them in option 55.  When the reply is over the limit of option 57,
        options are dropped from the end of the order until it fits, but
        never those in ESSENTIAL_OPTIONS.
        """
        order = REPLY_OPTION_ORDER + requested
        limit = option_uint16(request.options, OPT_MAX_MESSAGE_SIZE)
        limit = max(limit or DHCP_MIN_MAX_MESSAGE_SIZE,
                    DHCP_MIN_MAX_MESSAGE_SIZE)
        # The UDP and IP headers count against option 57 (RFC 2132 9.10).
        limit -= DHCP_IP_UDP_HEADER_BYTES
        options = {code: value for code, value in reply.options.items()
                   if code in ALWAYS_SENT_OPTIONS or code in requested}
        data = build_dhcp_packet(reply._replace(options=options), order)
        droppable = [code for code in reversed(
            list(dict.fromkeys(order + tuple(options))))
            if code in options and code not in ESSENTIAL_OPTIONS]
        while len(data) > limit and droppable:
            del options[droppable.pop(0)]
            data = build_dhcp_packet(reply._replace(options=options), order)
        if destination is None:
            destination = reply_destination(
                request, message_type, self.broadcast_address,
                self.client_port, self.relay_port)
        try:
            sock.sendto(data, destination)
        except OSError as exc:
            dhcp_log.error("sending %s to %s:%d failed: %s",
                           message_type.name, destination[0],
                           destination[1], exc)


class ProxyDHCPServer(DHCPServer):
    """The proxyDHCP server beside another DHCP server (PXE spec 2.1).

    Answers only DHCPDISCOVERs from PXE clients, with an offer that carries
    no address (yiaddr 0.0.0.0), option 60 "PXEClient" and the boot file.
    It never offers, ACKs or NAKs an address and keeps no leases.  BIOS
    PXE ROMs and iPXE get option 43 with discovery control bit 3 set, which
    tells them to download the file named in this offer.  UEFI firmware
    gets no option 43: it then asks the boot server on port 4011 (see
    BootServer), which is what the UEFI PXE drivers handle reliably.
    """

    def make_lease_store(self):
        return None

    def message_handlers(self):
        return {DHCPMessageType.DHCPDISCOVER: self._on_proxy_discover}

    def is_for_us(self, client):
        return client.is_pxe or client.is_http or client.arch in UBOOT_ARCHES

    def _on_proxy_discover(self, packet, client, mac, sock, source):
        reply = self.build_proxy_reply(packet, client, mac,
                                       DHCPMessageType.DHCPOFFER)
        if reply is not None:
            self._send(sock, packet, DHCPMessageType.DHCPOFFER, reply)

    def build_proxy_reply(self, packet, client, mac, message_type):
        """Build a proxy OFFER or boot-server ACK, or None to stay silent."""
        if (self.config.known_clients_only
                and packet.mac not in self.config.reservations):
            return None

        reservation = self.config.reservations.get(packet.mac)
        boot_file, _ = choose_boot_file(self.config, client, reservation,
                                        self.http_base)
        if not boot_file:
            dhcp_log.info("%s from %s gets no reply: no boot file for "
                          "arch=%s xid=0x%08x", packet.message_type.name, mac,
                          client.arch_name, packet.xid)
            return None
        if client.arch in UBOOT_ARCHES:
            # NOTE: U-Boot takes the TFTP server from siaddr of its own
            # DHCP server's reply and drops offers without an address, so
            # it cannot boot through proxyDHCP.
            warn_limited(dhcp_log, self.warnings, "uboot",
                         "%s from %s gets no reply: U-Boot (arch=%s) cannot "
                         "use proxyDHCP; give it a boot file on the main "
                         "DHCP server or run --mode full",
                         packet.message_type.name, mac, client.arch_name)
            return None

        options = {
            OPT_MESSAGE_TYPE: bytes((message_type,)),
            OPT_SERVER_ID: self.server_address_ip.packed,
            OPT_VENDOR_CLASS_IDENTIFIER: (HTTP_VENDOR_CLASS if client.is_http
                                          else PXE_VENDOR_CLASS),
            OPT_BOOTFILE_NAME: boot_file.encode(),
        }
        vendor = pxe_vendor_options(client, packet.options)
        if vendor:
            options[OPT_VENDOR_SPECIFIC] = vendor
        if client.uuid is not None:
            options[OPT_CLIENT_UUID] = client.uuid
        self._copy_relay_info(packet, options)

        event = {"event": message_type.name, "mac": mac, "proxy": True,
                 "bootfile": boot_file, "arch": client.arch_name,
                 "xid": f"0x{packet.xid:08x}"}
        dhcp_log.info("%s to %s proxy bootfile=%s arch=%s xid=0x%08x",
                      message_type.name, mac, printable(boot_file),
                      client.arch_name, packet.xid, extra={"event": event})

        return DHCPPacket(
            op=BOOTREPLY, hlen=packet.hlen, xid=packet.xid,
            flags=packet.flags, ciaddr=packet.ciaddr,
            siaddr=self.server_address_ip, giaddr=packet.giaddr,
            chaddr=packet.chaddr, sname=self.server_address_text.encode(),
            file=boot_file.encode()[:127], options=options)


class BootServer(ProxyDHCPServer):
    """The PXE boot server on UDP port 4011, run beside proxyDHCP.

    UEFI firmware, and iPXE after a proxyDHCP offer, send a DHCPREQUEST
    (or DHCPINFORM) here once they have an address, and get a DHCPACK with
    the boot file, sent back to the address and port they sent from.
    """

    log_port_suffix = f":{PXE_BOOT_SERVER_PORT}"

    def message_handlers(self):
        return {
            DHCPMessageType.DHCPREQUEST: self._on_boot_request,
            DHCPMessageType.DHCPINFORM: self._on_boot_request,
        }

    def _on_boot_request(self, packet, client, mac, sock, source):
        reply = self.build_proxy_reply(packet, client, mac,
                                       DHCPMessageType.DHCPACK)
        if reply is None:
            return
        if packet.giaddr != _ZERO_ADDRESS:
            destination = (str(packet.giaddr), self.relay_port)
        else:
            destination = source
        requested = packet.options.get(OPT_PARAMETER_REQUEST_LIST, b"")
        self._send(sock, packet, DHCPMessageType.DHCPACK, reply,
                   tuple(requested), destination)


def raspberry_pi_vendor_options():
    """Return the option 43 that Raspberry Pi boot ROMs look for.

    Discovery control 3 (no discovery), a menu prompt "PXE" with timeout
    0, and one boot menu item of type 0 named "Raspberry Pi Boot".
    """
    menu_item = (struct.pack("!HB", 0, len(RASPBERRY_PI_MENU_TEXT))
                 + RASPBERRY_PI_MENU_TEXT)
    return encode_dhcp_options({
        PXE_DISCOVERY_CONTROL: bytes((PXE_NO_DISCOVERY,)),
        PXE_MENU_PROMPT: b"\0PXE",
        PXE_BOOT_MENU: menu_item,
    })


def pxe_vendor_options(client, request_options):
    """Return the PXE option 43 for a proxy reply, or b"" for none.

    BIOS PXE ROMs and iPXE get discovery control bit 3: boot the file named
    in the reply, with no boot server discovery or menu.  A boot item
    (sub-option 71) in the request is echoed, as the PXE specification
    asks of a boot server.  UEFI firmware gets nothing, which sends it to
    the boot server on port 4011.  Raspberry Pis get their own menu.
    """
    if client.is_raspberry_pi:
        return raspberry_pi_vendor_options()
    suboptions = {}
    if client.is_ipxe or client.arch in (None, ClientArch.BIOS):
        suboptions[PXE_DISCOVERY_CONTROL] = bytes((PXE_USE_BOOT_FILE,))
    try:
        requested = parse_dhcp_options(
            request_options.get(OPT_VENDOR_SPECIFIC, b""), "option 43")
    except PacketError:
        requested = {}
    boot_item = requested.get(PXE_BOOT_ITEM)
    if boot_item is not None and len(boot_item) == 4:
        suboptions[PXE_BOOT_ITEM] = boot_item
    if not suboptions:
        return b""
    return encode_dhcp_options(suboptions)


# How long auto mode waits for another server, and when it repeats its
# DHCPDISCOVER.  dnsmasq pings an address for about 3 s before offering it,
# so a shorter wait can miss a server that is there.
DHCP_PROBE_SECONDS = 6.0
DHCP_PROBE_RESEND_SECONDS = 2.0


def open_client_socket(interface, bind_device=True):
    """Bind a UDP socket on the DHCP client port of ``interface``.

    SO_REUSEADDR lets it share the port with a DHCP client running on the
    host; every such socket receives the broadcast replies.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if bind_device:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE,
                            interface.name.encode() + b"\0")
        sock.bind(("0.0.0.0", DHCP_CLIENT_PORT))
    except OSError:
        sock.close()
        raise
    return sock


def build_probe_discover(interface, xid):
    """Build the DHCPDISCOVER that auto mode broadcasts."""
    options = {
        OPT_MESSAGE_TYPE: bytes((DHCPMessageType.DHCPDISCOVER,)),
        OPT_PARAMETER_REQUEST_LIST: bytes((OPT_SUBNET_MASK, OPT_SERVER_ID)),
    }
    packet = DHCPPacket(op=BOOTREQUEST, xid=xid, flags=FLAG_BROADCAST,
                        chaddr=interface.mac, options=options)
    return build_dhcp_packet(packet)


def read_server_reply(data, own_address):
    """Return the server address of a DHCP reply from another server.

    Returns None for anything else: a request, a malformed packet, or a
    reply from this host.
    """
    try:
        packet = parse_dhcp_packet(data)
    except PacketError:
        return None
    if packet.op != BOOTREPLY:
        return None
    server = option_address(packet.options, OPT_SERVER_ID) or packet.siaddr
    if server == own_address or server == _ZERO_ADDRESS:
        return None
    if packet.yiaddr == _ZERO_ADDRESS:
        return None  # a proxyDHCP offer hands out no address
    return server


def probe_dhcp_server(interface, own_address, seconds=DHCP_PROBE_SECONDS):
    """Broadcast one DHCPDISCOVER and return the first server that offers.

    Returns None when no other server answers within ``seconds``.  No
    DHCPREQUEST follows, so no lease is taken.  Raises OSError when the
    client port cannot be bound.
    """
    xid = random.getrandbits(32)
    discover = build_probe_discover(interface, xid)
    with open_client_socket(interface) as sock:
        started = time.monotonic()
        deadline = started + seconds
        next_send = started
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            if now >= next_send:
                sock.sendto(discover, ("255.255.255.255", DHCP_SERVER_PORT))
                next_send = now + DHCP_PROBE_RESEND_SECONDS
            sock.settimeout(min(deadline, next_send) - now)
            try:
                data, _ = sock.recvfrom(4096)
            except socket.timeout:
                continue  # time to resend, or the deadline: checked above
            if len(data) >= 8 and struct.unpack_from("!I", data, 4)[0] == xid:
                server = read_server_reply(data, own_address)
                if server is not None:
                    return server


def choose_mode(config, interface, own_address):
    """Resolve --mode auto into full or proxy, logging the choice."""
    if config.mode != "auto":
        return config.mode
    try:
        server = probe_dhcp_server(interface, own_address)
    except OSError as exc:
        dhcp_log.warning("auto mode: cannot probe %s for a DHCP server "
                         "(%s); choosing proxy mode, which never hands out "
                         "addresses; use --mode full on a network with no "
                         "DHCP server", interface.name, exc)
        return "proxy"
    if server is None:
        dhcp_log.info("auto mode: no DHCP server answered on %s within "
                      "%.0f s; choosing full mode", interface.name,
                      DHCP_PROBE_SECONDS)
        return "full"
    dhcp_log.info("auto mode: DHCP server %s answered on %s; choosing proxy "
                  "mode", server, interface.name)
    return "proxy"


class OtherServerWatch:
    """Warn when another DHCP server hands out addresses beside full mode.

    Listens on the DHCP client port of the interface, where servers
    broadcast their offers, in its own thread.  Two servers handing out
    addresses on one segment is a fault, so each other server is named in
    a warning at most once a minute.
    """

    def __init__(self, interface, own_address):
        self.interface = interface
        self.own_address = own_address
        self.sock = open_client_socket(interface)
        self.sock.settimeout(0.5)
        self.stopping = threading.Event()
        self.warnings = RateLimiter(per_minute=1)

    def serve_forever(self):
        while not self.stopping.is_set():
            try:
                data, source = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                time.sleep(0.5)
                continue
            server = read_server_reply(data, self.own_address)
            if server is not None:
                warn_limited(dhcp_log, self.warnings, str(server),
                             "another DHCP server, %s, is handing out "
                             "addresses on %s: two servers on one segment "
                             "give clients conflicting leases; stop it or "
                             "run pxeserver with --mode proxy", server,
                             self.interface.name)

    def shutdown(self):
        self.stopping.set()

    def close(self):
        self.sock.close()


# ---------------------------------------------------------------------------
# TFTP packet layer (RFC 1350, 2347)
# ---------------------------------------------------------------------------


class TFTPRequest(typing.NamedTuple):
    """A parsed RRQ or WRQ.

    ``filename`` is decoded as UTF-8 with surrogate escapes, so any bytes
    round-trip to the file system.  ``mode`` is lower case.  ``options``
    maps lower-case option names to their text values, in request order;
    a repeated option keeps its first value.
    """

    opcode: TFTPOpcode
    filename: str
    mode: str
    options: dict


class TFTPAck(typing.NamedTuple):
    block: int


class TFTPData(typing.NamedTuple):
    block: int
    payload: bytes


class TFTPErrorPacket(typing.NamedTuple):
    code: int
    message: str


def _decode_field(raw):
    return raw.decode("utf-8", "surrogateescape")


def parse_tftp_opcode(data):
    """Return the TFTPOpcode of a packet; raise PacketError."""
    if len(data) < TFTP_OPCODE.size:
        raise PacketError(f"packet too short: {len(data)} bytes, need at "
                          f"least {TFTP_OPCODE.size} for the opcode")
    value = TFTP_OPCODE.unpack_from(data)[0]
    try:
        return TFTPOpcode(value)
    except ValueError:
        raise PacketError(f"unknown opcode {value}") from None


def parse_tftp_request(data):
    """Parse an RRQ or WRQ into a TFTPRequest; raise PacketError.

    Empty fields after the last option are NUL padding that some clients
    send, and are ignored.  An option name without a value, a value longer
    than TFTP_MAX_OPTION_VALUE_BYTES, or a packet without the terminating
    NUL is malformed.
    """
    opcode = parse_tftp_opcode(data)
    if opcode not in (TFTPOpcode.RRQ, TFTPOpcode.WRQ):
        raise PacketError(f"expected RRQ or WRQ, got {opcode.name}")
    if len(data) > TFTP_MAX_REQUEST_BYTES:
        raise PacketError(f"request too long: {len(data)} bytes, at most "
                          f"{TFTP_MAX_REQUEST_BYTES}")
    body = data[TFTP_OPCODE.size:]
    if not body.endswith(b"\0"):
        raise PacketError("request does not end with a NUL byte")
    fields = body[:-1].split(b"\0")
    if len(fields) < 2:
        raise PacketError("request has a file name but no mode")
    filename, mode, rest = fields[0], fields[1], fields[2:]
    stripped = False
    while rest and not rest[-1]:
        rest.pop()
        stripped = True
    if stripped and len(rest) % 2:
        rest.append(b"")  # the last option's value is empty, as multicast's

    if not filename:
        raise PacketError("request has an empty file name")
    try:
        mode = mode.decode("ascii").lower()
    except UnicodeDecodeError:
        raise PacketError(f"mode {mode!r} is not ASCII") from None
    if len(rest) % 2:
        raise PacketError(f"option {rest[-1]!r} has no value")
    options = {}
    for index in range(0, len(rest), 2):
        name, value = rest[index], rest[index + 1]
        if not name:
            raise PacketError(f"empty option name before value {value!r}")
        if len(value) > TFTP_MAX_OPTION_VALUE_BYTES:
            raise PacketError(
                f"option {name!r} value is {len(value)} bytes, at most "
                f"{TFTP_MAX_OPTION_VALUE_BYTES}")
        key = _decode_field(name).lower()
        options.setdefault(key, _decode_field(value))
    return TFTPRequest(opcode, _decode_field(filename), mode, options)


def build_tftp_request(opcode, filename, mode="octet", options=None):
    """Build an RRQ or WRQ; the inverse of parse_tftp_request."""
    parts = [filename.encode("utf-8", "surrogateescape"), mode.encode()]
    for name, value in (options or {}).items():
        parts.append(name.encode("utf-8", "surrogateescape"))
        parts.append(str(value).encode("utf-8", "surrogateescape"))
    return TFTP_OPCODE.pack(opcode) + b"\0".join(parts) + b"\0"


def parse_tftp_reply(data):
    """Parse a DATA, ACK or ERROR packet; raise PacketError for others."""
    opcode = parse_tftp_opcode(data)
    if opcode == TFTPOpcode.ACK:
        if len(data) < TFTP_HEADER.size:
            raise PacketError(f"ACK too short: {len(data)} bytes, need "
                              f"{TFTP_HEADER.size}")
        return TFTPAck(TFTP_HEADER.unpack_from(data)[1])
    if opcode == TFTPOpcode.DATA:
        if len(data) < TFTP_HEADER.size:
            raise PacketError(f"DATA too short: {len(data)} bytes, need at "
                              f"least {TFTP_HEADER.size}")
        return TFTPData(TFTP_HEADER.unpack_from(data)[1],
                        data[TFTP_HEADER.size:])
    if opcode == TFTPOpcode.ERROR:
        if len(data) < TFTP_HEADER.size:
            raise PacketError(f"ERROR too short: {len(data)} bytes, need "
                              f"at least {TFTP_HEADER.size}")
        text = data[TFTP_HEADER.size:].split(b"\0", 1)[0]
        return TFTPErrorPacket(TFTP_HEADER.unpack_from(data)[1],
                               text.decode("utf-8", "replace"))
    raise PacketError(f"unexpected {opcode.name} inside a transfer")


def build_data(block, payload):
    return TFTP_HEADER.pack(TFTPOpcode.DATA, block) + payload


def build_ack(block):
    return TFTP_HEADER.pack(TFTPOpcode.ACK, block)


def build_error(code, message=None):
    """Build an ERROR packet; the text defaults to the RFC 1350 wording."""
    text = TFTP_ERROR_TEXT.get(code, "") if message is None else message
    return (TFTP_HEADER.pack(TFTPOpcode.ERROR, code)
            + text.encode("utf-8", "replace") + b"\0")


def build_oack(options):
    """Build an OACK from a dict of option names to values."""
    parts = []
    for name, value in options.items():
        parts.append(name.encode() + b"\0" + str(value).encode() + b"\0")
    return TFTP_OPCODE.pack(TFTPOpcode.OACK) + b"".join(parts)


def parse_oack(data):
    """Parse an OACK into a dict; the inverse of build_oack."""
    if parse_tftp_opcode(data) != TFTPOpcode.OACK:
        raise PacketError("not an OACK")
    body = data[TFTP_OPCODE.size:]
    if body and not body.endswith(b"\0"):
        raise PacketError("OACK does not end with a NUL byte")
    fields = body[:-1].split(b"\0") if body else []
    if len(fields) % 2:
        raise PacketError("OACK has an option without a value")
    return {_decode_field(fields[i]): _decode_field(fields[i + 1])
            for i in range(0, len(fields), 2)}


def to_netascii(chunk):
    """Convert bytes to netascii: CR becomes CR NUL, LF becomes CR LF.

    The mapping is byte by byte, so chunks can be converted one at a time.
    """
    return chunk.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def from_netascii(data):
    """Convert netascii back to local text: CR LF to LF, CR NUL to CR.

    Used for uploads in netascii mode.  A CR at the very end of ``data`` is
    kept for the caller to join with the next chunk.
    """
    return data.replace(b"\r\n", b"\n").replace(b"\r\0", b"\r")


class NetasciiReader:
    """A read-only file wrapper that returns the netascii form of a file."""

    CHUNK_BYTES = 65536

    def __init__(self, raw):
        self._raw = raw
        self._buffer = bytearray()

    def read(self, size):
        while len(self._buffer) < size:
            chunk = self._raw.read(self.CHUNK_BYTES)
            if not chunk:
                break
            self._buffer += to_netascii(chunk)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readinto(self, view):
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)

    def close(self):
        self._raw.close()


def netascii_size(raw):
    """Return the size of a file after netascii conversion, reading it."""
    size = 0
    while True:
        chunk = raw.read(NetasciiReader.CHUNK_BYTES)
        if not chunk:
            return size
        size += len(chunk) + chunk.count(b"\r") + chunk.count(b"\n")


# ---------------------------------------------------------------------------
# TFTP server (RFC 1350, 2347, 2348, 2349, 7440)
# ---------------------------------------------------------------------------


class TransferOptions(typing.NamedTuple):
    """The values a transfer runs with after option negotiation."""

    blksize: int = TFTP_DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float = None  # seconds the client asked for, or None
    tsize: int = None  # file size announced by the client (WRQ)


def _option_integer(value, low, high):
    try:
        number = int(value)
    except ValueError:
        return None
    return number if low <= number <= high else None


def negotiate_options(request, max_blksize, max_windowsize, file_size):
    """Decide which requested options to accept, and their values.

    Returns (oack, options): ``oack`` holds only options the client asked
    for and we accept, in request order (empty means send no OACK), and
    ``options`` is a TransferOptions.  Unknown options and invalid values
    are left out of the OACK, so the client falls back to the RFC 1350
    default for them (RFC 2347).  ``file_size`` is None for uploads.
    """
    oack = {}
    blksize, windowsize, timeout, tsize = TFTP_DEFAULT_BLKSIZE, 1, None, None
    for name, value in request.options.items():
        if name == "blksize":
            number = _option_integer(value, TFTP_MIN_BLKSIZE, 1 << 31)
            if number is not None:
                blksize = min(number, max_blksize)
                oack[name] = blksize
        elif name == "timeout":
            number = _option_integer(value, TFTP_MIN_TIMEOUT_SECONDS,
                                     TFTP_MAX_TIMEOUT_SECONDS)
            if number is not None:
                timeout = float(number)
                oack[name] = number
        elif name == "tsize":
            number = _option_integer(value, 0, 1 << 63)
            if number is None:
                continue
            if file_size is not None:
                oack[name] = file_size
            else:
                tsize = number
                oack[name] = number
        elif name == "windowsize":
            number = _option_integer(value, TFTP_MIN_WINDOWSIZE,
                                     TFTP_MAX_WINDOWSIZE)
            if number is not None:
                windowsize = min(number, max_windowsize)
                oack[name] = windowsize
    if "windowsize" in oack:
        # Bound the memory a transfer keeps for retransmission.
        windowsize = max(1, min(windowsize,
                                TFTP_MAX_WINDOW_BYTES // blksize))
        oack["windowsize"] = windowsize
    return oack, TransferOptions(blksize, windowsize, timeout, tsize)


class RetransmitTimer:
    """Retransmission timeout in the manner of TCP's (RFC 6298).

    Keeps a smoothed round-trip time and its variance from ACKs of packets
    that were sent once (Karn's rule), doubles the timeout after each
    expiry up to ``ceiling``, and never goes below TFTP_MIN_RTO_SECONDS.
    When the client negotiated the RFC 2349 ``timeout`` option, that value
    is used as is.
    """

    def __init__(self, ceiling, fixed=None):
        self._ceiling = ceiling
        self._fixed = fixed
        self._srtt = None
        self._rttvar = None
        self._backoff = 1
        self.rto = fixed or min(TFTP_INITIAL_RTO_SECONDS, ceiling)

    def on_sample(self, rtt):
        """Update the estimate with one measured round trip, in seconds."""
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self._backoff = 1
        self._update()

    def on_timeout(self):
        """Back off after an expiry."""
        self._backoff = min(self._backoff * 2, 1 << 10)
        self._update()

    def _update(self):
        if self._fixed:
            self.rto = self._fixed
            return
        if self._srtt is None:
            base = TFTP_INITIAL_RTO_SECONDS
        else:
            base = self._srtt + 4 * self._rttvar
        self.rto = min(max(base, TFTP_MIN_RTO_SECONDS) * self._backoff,
                       self._ceiling)


class TransferAborted(Exception):
    """Ends a transfer; ``reason`` is logged, ``quiet`` keeps it at INFO."""

    def __init__(self, reason, quiet=False):
        super().__init__(reason)
        self.quiet = quiet


class TFTPTransfer(threading.Thread):
    """One TFTP transfer, with its own thread and its own UDP socket.

    The socket is created, bound and connected to the peer by the listener
    and owned by this thread from then on; the thread closes it.  Being
    connected, it receives only the peer's packets: the kernel hands any
    other sender's packets to the transfer's guard socket, which the
    listener answers with ERROR 5 (see TFTPServer).  Subclasses implement
    ``transfer()``.  Any exception is logged with the client and file, and
    the thread always removes itself from the server's table.
    """

    def __init__(self, server, sock, peer, request, local_mtu):
        super().__init__(name=f"tftp-{peer[0]}:{peer[1]}", daemon=True)
        self.server = server
        self.config = server.config
        self.sock = sock
        self.guard = None  # the listener's socket beside ours, if any
        self.final_sent = False  # whether the last packet has gone out
        self.peer = peer
        self.request = request
        self.local_mtu = local_mtu
        self.client = f"{peer[0]}:{peer[1]}"
        self.name_for_log = printable(request.filename)
        self.bytes = 0
        self.retransmits = 0
        self.started = time.monotonic()
        self.completed = False
        self.acknowledged = False  # whether the client has ACKed anything
        self.path = None  # the resolved file, once known
        self._timeout_ticks = None
        self._timeout_seconds = None

    def run(self):
        try:
            self.transfer()
        except TransferAborted as exc:
            if self.server.stopping.is_set():
                self._send_quietly(build_error(TFTPErrorCode.NOT_DEFINED,
                                               "server shutting down"))
                tftp_log.info("transfer of %s %s %s stopped: the server is "
                              "shutting down", self.name_for_log,
                              self.direction, self.client)
            elif exc.quiet:
                tftp_log.info("transfer of %s %s %s ended: %s",
                              self.name_for_log, self.direction, self.client,
                              exc)
            elif not warn_limited(tftp_log, self.server.warnings,
                                  self.peer[0], "transfer of %s %s %s "
                                  "failed: %s", self.name_for_log,
                                  self.direction, self.client, exc):
                # Each started transfer gets an end line, even when its
                # client has used up its warnings.
                tftp_log.info("transfer of %s %s %s failed: %s",
                              self.name_for_log, self.direction,
                              self.client, exc)
        except TFTPError as exc:
            self.send_error(exc.code, str(exc), exc.reply)
        except Exception:
            tftp_log.exception("transfer of %s to %s failed: internal error",
                               self.name_for_log, self.client)
            self._send_quietly(build_error(TFTPErrorCode.NOT_DEFINED,
                                           "internal server error"))
        finally:
            self.sock.close()
            self.server.transfer_finished(self)

    def send_error(self, code, detail, reply=None):
        """Send an ERROR with ``reply`` or the RFC text for ``code`` and
        log ``detail``.

        One helper does both, so the log and the wire cannot drift apart.
        """
        self._send_quietly(build_error(code, reply))
        warn_limited(tftp_log, self.server.warnings, self.peer[0],
                     "%s of %s from %s rejected: ERROR %d %s: %s",
                     self.request.opcode.name, self.name_for_log,
                     self.client, code, TFTP_ERROR_TEXT[code], detail)

    def send_packet(self, packet):
        """Send a packet of the transfer to the peer."""
        try:
            self.sock.send(packet)
        except OSError as exc:
            self.send_failed(exc)

    def send_failed(self, exc):
        """Handle a failed send to the peer.

        A send that a firewall rule rejects (EPERM), that finds the queue
        full (ENOBUFS), or that reports an ICMP error of an earlier packet
        (ECONNREFUSED, see recover_receive) counts as a lost packet, which
        the retransmission timer repairs.  Any other failure ends the
        transfer.
        """
        if exc.errno in (errno.EPERM, errno.ENOBUFS, errno.EAGAIN,
                         errno.ECONNREFUSED):
            tftp_log.debug("send to %s dropped: %s", self.client, exc)
            return
        self.receive_failed(exc)

    def receive_failed(self, exc):
        """End the transfer after a failed send or receive."""
        if self.server.stopping.is_set():
            raise TransferAborted("server is shutting down") from None
        raise TransferAborted(f"socket error: {exc}") from None

    def recover_receive(self, exc, buffer):
        """Return the length of a packet read into ``buffer`` after a failed
        receive, or end the transfer when there is none.

        On the connected socket an ICMP port unreachable from the client
        shows up as ECONNREFUSED, before any packet already queued: the
        client's last ACK may be waiting behind the error that a
        retransmission it no longer needed drew.  So one queued packet is
        read without waiting; only when there is none is the port taken
        as closed.
        """
        if exc.errno != errno.ECONNREFUSED:
            self.receive_failed(exc)
        try:
            return self.sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        except OSError as again:
            if again.errno != errno.ECONNREFUSED:
                self.receive_failed(again)
        reason = "the client's port is closed (ICMP port unreachable)"
        if self.final_sent:
            # busybox tftp and atftp exit right after their final ACK,
            # without the dally of RFC 1350 section 6.
            reason += ("; the last block had gone out, so the client may "
                       "have the whole file and only its final ACK was lost")
        raise TransferAborted(reason)

    def _send_quietly(self, packet):
        try:
            self.sock.send(packet)
        except OSError as exc:
            tftp_log.debug("send to %s failed: %s", self.client, exc)

    def max_blksize(self):
        """Return the blksize cap: the setting, else what fits the MTU."""
        if self.config.max_blksize:
            return self.config.max_blksize
        if self.local_mtu:
            return max(TFTP_MIN_BLKSIZE,
                       min(TFTP_MAX_BLKSIZE,
                           self.local_mtu - TFTP_DATA_OVERHEAD_BYTES))
        return TFTP_DEFAULT_BLKSIZE

    def receive(self, timeout, pending=None):
        """Wait up to ``timeout`` s for a packet from the peer.

        ``pending`` is a packet already received, handled before waiting.
        Returns the parsed packet, or None on timeout.  A malformed packet
        from the peer ends the transfer with ERROR 4.
        """
        if pending is None:
            if timeout <= 0:
                return None
            self._set_receive_timeout(timeout)
            try:
                data = self.sock.recv(TFTP_RECEIVE_BUFFER_BYTES)
            except BlockingIOError:
                return None  # SO_RCVTIMEO expired
            except OSError as exc:
                buffer = bytearray(TFTP_RECEIVE_BUFFER_BYTES)
                data = bytes(buffer[:self.recover_receive(exc, buffer)])
        else:
            data = pending
        if self.server.stopping.is_set():
            raise TransferAborted("server is shutting down")
        if len(data) == TFTP_HEADER.size and data[:2] == _ACK_OPCODE:
            return TFTPAck(TFTP_HEADER.unpack(data)[1])
        try:
            return parse_tftp_reply(data)
        except PacketError as exc:
            self._send_quietly(build_error(TFTPErrorCode.ILLEGAL_OPERATION))
            raise TransferAborted(f"malformed packet from client: {exc}")

    def _set_receive_timeout(self, seconds):
        """Set the kernel's receive timeout, rounded up to 10 ms.

        SO_RCVTIMEO makes each wait one recv() system call, where a
        Python socket timeout adds a poll() before it; the rounding skips
        the setsockopt() call while the timeout stays the same.
        """
        if seconds == self._timeout_seconds:
            return
        self._timeout_seconds = seconds
        ticks = max(1, int(seconds * 100) + 1)
        if ticks != self._timeout_ticks:
            self._timeout_ticks = ticks
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                 struct.pack("ll", ticks // 100,
                                             ticks % 100 * 10000))

    def check_client_error(self, packet, after_oack):
        """End the transfer if ``packet`` is an ERROR from the client.

        UEFI firmware asks for tsize, then ends the transfer with ERROR 8
        after the OACK on purpose and sends a new RRQ from a new port; that
        ends quietly, with nothing sent back.
        """
        if not isinstance(packet, TFTPErrorPacket):
            return
        text = printable(packet.message)
        if after_oack and packet.code == TFTPErrorCode.OPTION_NEGOTIATION:
            raise TransferAborted(f"client ended the transfer after the "
                                  f"OACK (ERROR 8 {text!r}), as UEFI "
                                  f"firmware does to learn the size",
                                  quiet=True)
        raise TransferAborted(f"client sent ERROR {packet.code} {text!r}")

    def log_end(self, verb):
        """Log the end of a successful transfer and mark it completed."""
        self.completed = True
        seconds = time.monotonic() - self.started
        rate = self.bytes / seconds / 1e6 if seconds > 0 else 0.0
        event = {"event": "transfer_end", "direction": verb,
                 "file": self.request.filename, "client": self.client,
                 "bytes": self.bytes, "seconds": round(seconds, 3),
                 "retransmits": self.retransmits}
        tftp_log.info("%s %s %s %s bytes=%d seconds=%.3f rate=%.1fMB/s "
                      "retransmits=%d", verb, self.name_for_log,
                      "to" if verb == "sent" else "from", self.client,
                      self.bytes, seconds, rate, self.retransmits,
                      extra={"event": event})


class ReadTransfer(TFTPTransfer):
    """Send a file to a client (RRQ), with windows of ``windowsize``."""

    direction = "to"

    def transfer(self):
        path, handle, size = self._open()
        try:
            self._send_file(handle, size)
        finally:
            handle.close()

    def _open(self):
        path = resolve_under_root(self.server.root, self.request.filename)
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise TFTPError(TFTPErrorCode.FILE_NOT_FOUND,
                            f"no file at {path!r}") from None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # The file is not at fault.  A client that gets "access
                # violation" gives up, while "server busy" lets it retry.
                raise TFTPError(TFTPErrorCode.NOT_DEFINED,
                                f"cannot open {path!r}: {exc.strerror}; "
                                f"raise the open file limit or lower "
                                f"max_transfers",
                                TFTP_BUSY_REPLY) from None
            raise TFTPError(TFTPErrorCode.ACCESS_VIOLATION,
                            f"cannot open {path!r}: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            code = (TFTPErrorCode.FILE_NOT_FOUND if stat.S_ISDIR(info.st_mode)
                    else TFTPErrorCode.ACCESS_VIOLATION)
            raise TFTPError(code, f"{path!r} is not a regular file")
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb", buffering=TFTP_READ_BUFFER_BYTES)
        size = info.st_size
        if self.request.mode == "netascii":
            size = netascii_size(handle)
            handle.seek(0)
            handle = NetasciiReader(handle)
        return path, handle, size

    def _send_file(self, handle, size):
        oack, options = negotiate_options(
            self.request, self.max_blksize(), self.config.max_windowsize,
            size)
        timer = RetransmitTimer(self.config.tftp_timeout, options.timeout)
        tftp_log.info("RRQ from %s file=%s mode=%s size=%d options=%s",
                      self.client, self.name_for_log, self.request.mode, size,
                      _format_options(oack) or "none",
                      extra={"event": {"event": "transfer_start",
                                       "file": self.request.filename,
                                       "client": self.client, "size": size,
                                       "options": oack}})
        if oack:
            self._negotiate(build_oack(oack), timer)
        self._send_blocks(handle, options, timer)
        # The client may reuse its port for its next request at once, and
        # with a port range another client may need this transfer's port.
        self.sock.close()
        self.server.release_transfer(self)
        if self.bytes != size:
            tftp_log.warning("file %s changed while it was sent to %s: "
                             "its size was %d bytes at the start, %d were "
                             "sent; the client may have a wrong copy",
                             self.name_for_log, self.client, size,
                             self.bytes)
        self.log_end("sent")

    def _negotiate(self, oack_packet, timer):
        """Send the OACK until the client ACKs block 0."""
        tries = 0
        sent_at = time.monotonic()
        self.send_packet(oack_packet)
        while True:
            # A stray packet does not move the deadline.
            packet = self.receive(sent_at + timer.rto - time.monotonic())
            if packet is None:
                tries += 1
                if tries > min(self.config.tftp_retries,
                               TFTP_UNPROVEN_RETRIES):
                    raise TransferAborted(f"timed out waiting for the ACK "
                                          f"of the OACK after {tries - 1} "
                                          f"retries")
                tftp_log.debug("timeout after %.3f s waiting for the ACK of "
                               "the OACK from %s; resending it (try %d)",
                               timer.rto, self.client, tries)
                timer.on_timeout()
                self.retransmits += 1
                sent_at = time.monotonic()
                self.send_packet(oack_packet)
                continue
            self.check_client_error(packet, after_oack=True)
            if isinstance(packet, TFTPAck) and packet.block == 0:
                self.acknowledged = True
                if tries == 0:
                    timer.on_sample(time.monotonic() - sent_at)
                return
            # Anything else is a stale or stray packet; keep waiting.

    def _send_blocks(self, handle, options, timer):
        """Send DATA windows until the final block is acknowledged.

        Blocks are read into a ring of ``2 * windowsize`` packet buffers,
        each with its header written at read time.  The ring contains the
        window in flight, kept for a resend, and the next window, read
        while the client replies, so that its ACK is met with a send and
        little else.  Block numbers are counted without wrapping here and
        wrapped to 16 bits in the header, where they roll over to 0.

        This loop runs once per window and allocates nothing.  Its common
        case is one receive that acknowledges the whole window when no
        round-trip sample is due.  That case is written out with local
        names and skips the rest.  Any other packet, or a timeout, goes
        through ``_wait_for_ack`` and the retry logic below it.  A timeout
        makes the next windows sampled ones, so the common case never has
        a retry or a back-off to end.  While it runs alone, the transfer
        polls for each ACK before it sleeps (``tftp_busy_poll``).
        """
        blksize, windowsize = options.blksize, options.windowsize
        ring = 2 * windowsize
        slots = [bytearray(TFTP_HEADER.size + blksize) for _ in range(ring)]
        views = [memoryview(slot)[TFTP_HEADER.size:] for slot in slots]
        packets = list(slots)  # what goes on the wire; the last is shorter
        for slot in slots:
            TFTP_HEADER.pack_into(slot, 0, _DATA, 0)
        readinto = handle.readinto
        ack = bytearray(TFTP_ACK_BUFFER_BYTES)
        send = self.sock.send
        recv_into = self.sock.recv_into
        clock = time.monotonic
        modulo = TFTP_BLOCK_MODULO
        ack_opcode = _ACK
        dontwait = socket.MSG_DONTWAIT
        # Waking a sleeping thread can take longer than the client takes
        # to send its ACK, and polling skips that wake-up where ACKs come
        # quickly.  A poll that finds nothing, or another transfer seen at
        # a round-trip sample, pauses polling (TFTP_POLL_*).
        poll_seconds = self.config.tftp_busy_poll / 1e6
        polling = self.server.may_busy_poll()
        poll_pause = poll_backoff = TFTP_POLL_PAUSE_WINDOWS
        if polling or not poll_seconds:
            poll_pause = 0
        base = 1  # the first block not yet acknowledged
        unread = 1  # the next block to read from the file
        final = 0  # the number of the last block, once it has been read
        last_length = 0
        tries = 0
        # The round trip is sampled on each of the first
        # TFTP_RTT_FIRST_SAMPLES windows and on as many after each timeout,
        # then once per TFTP_RTT_SAMPLE_INTERVAL, which follows a link and
        # keeps the timer's work off most blocks.  The samples after a loss
        # soon undo an outlier, such as a repeated ACK from the client.
        samples = countdown = 0
        retransmitted = False
        self._set_receive_timeout(timer.rto)
        try:
            while not final and unread <= windowsize:
                final, last_length = self._read_block(
                    readinto, slots, views, packets, unread)
                unread += 1
            while True:
                stop = base + windowsize  # the window is base .. stop - 1
                if final and stop > final:
                    stop = final + 1
                    self.final_sent = True
                count = stop - base
                sent_at = clock()
                try:
                    if count == 1:
                        send(packets[base % ring])
                    else:
                        for block in range(base, stop):
                            send(packets[block % ring])
                except OSError as exc:
                    self.send_failed(exc)
                # Read the next window while the client replies to this one
                # (_read_block, written out).
                ahead = stop + windowsize
                while unread < ahead and not final:
                    index = unread % ring
                    length = readinto(views[index])
                    slot = slots[index]
                    slot[2] = unread >> 8 & 0xFF
                    slot[3] = unread & 0xFF
                    if length < blksize:
                        final, last_length = unread, length
                        packets[index] = memoryview(slot)[
                            :TFTP_HEADER.size + length]
                    unread += 1
                if polling:
                    try:
                        length = recv_into(ack, 0, dontwait)
                    except BlockingIOError:
                        length, found = self._poll_then_receive(
                            ack, poll_seconds)
                        if found:
                            poll_backoff = TFTP_POLL_PAUSE_WINDOWS
                        else:
                            polling, poll_pause = False, poll_backoff
                            poll_backoff = min(2 * poll_backoff,
                                               TFTP_POLL_MAX_PAUSE_WINDOWS)
                    except OSError as exc:
                        length = self.recover_receive(exc, ack)
                else:
                    if poll_pause:
                        poll_pause -= 1
                        if not poll_pause:
                            polling = self.server.may_busy_poll()
                            if not polling:
                                poll_pause = poll_backoff
                    try:
                        length = recv_into(ack)
                    except BlockingIOError:
                        length = -1  # SO_RCVTIMEO expired
                    except OSError as exc:
                        length = self.recover_receive(exc, ack)
                if length == 4 and ack[1] == ack_opcode and not ack[0]:
                    acked = ((ack[2] << 8 | ack[3]) - base) % modulo + 1
                    if acked == count and countdown:
                        countdown -= 1  # the common case
                        base = stop
                        if final and base > final:
                            return
                        continue
                    if acked > count:
                        acked = 0  # a stale or duplicate ACK
                else:
                    acked = 0
                if not acked and length >= 0:
                    acked = self._wait_for_ack(base, count,
                                               sent_at + timer.rto,
                                               bytes(ack[:length]))
                if not acked:
                    tries += 1
                    self._check_retries(tries, base)
                    timer.on_timeout()
                    self._set_receive_timeout(timer.rto)
                    self.retransmits += count
                    retransmitted = True
                    samples = countdown = 0
                    continue
                if retransmitted:
                    retransmitted = False  # Karn's rule: no sample
                elif not countdown:
                    # A sample also ends any back-off (Karn's rule).
                    timer.on_sample(clock() - sent_at)
                    samples += 1
                    if samples >= TFTP_RTT_FIRST_SAMPLES:
                        countdown = TFTP_RTT_SAMPLE_INTERVAL - 1
                    if polling and not self.server.may_busy_poll():
                        # Another transfer has started.
                        polling, poll_pause = False, poll_backoff
                else:
                    countdown -= 1
                self._set_receive_timeout(timer.rto)
                tries = 0
                self.acknowledged = True
                if acked < count:
                    # Blocks after the acknowledged one were lost or dropped
                    # by the client (RFC 7440) and go out again with the
                    # next window.
                    self.retransmits += count - acked
                base += acked
                if final and base > final:
                    return
        finally:
            done = base - 1  # blocks acknowledged
            self.bytes = done * blksize
            if final and done == final:
                self.bytes += last_length - blksize

    def _poll_then_receive(self, buffer, seconds):
        """Poll for a packet for up to ``seconds``, then wait for one.

        Returns (length, found): the packet's length, or -1 when the
        receive timeout expired, and whether polling found the packet.
        """
        give_up = time.monotonic() + seconds
        while True:
            try:
                return self.sock.recv_into(buffer, 0,
                                           socket.MSG_DONTWAIT), True
            except BlockingIOError:
                if time.monotonic() > give_up:
                    break
            except OSError as exc:
                return self.recover_receive(exc, buffer), True
        try:
            return self.sock.recv_into(buffer), False
        except BlockingIOError:
            return -1, False  # SO_RCVTIMEO expired
        except OSError as exc:
            return self.recover_receive(exc, buffer), False

    @staticmethod
    def _read_block(readinto, slots, views, packets, block):
        """Read block ``block`` into its slot of the ring; write its header.

        Returns (final, length): ``final`` is ``block`` when it is the last
        block of the file, shorter than blksize, and 0 otherwise.
        """
        index = block % len(slots)
        slot = slots[index]
        length = readinto(views[index])
        slot[2] = block >> 8 & 0xFF
        slot[3] = block & 0xFF
        if length < len(views[index]):
            packets[index] = memoryview(slot)[:TFTP_HEADER.size + length]
            return block, length
        return 0, length

    def _check_retries(self, tries, base):
        """End the transfer when ``tries`` timeouts exceed the limit."""
        limit = self.config.tftp_retries
        if not self.acknowledged:
            # No ACK yet, so the client has not shown that it listens at
            # this address.
            limit = min(limit, TFTP_UNPROVEN_RETRIES)
        if tries > limit:
            raise TransferAborted(f"timed out waiting for ACK of block "
                                  f"{base % TFTP_BLOCK_MODULO} after "
                                  f"{tries - 1} retries")
        tftp_log.debug("no ACK of block %d from %s in time; resending from "
                       "it (try %d)", base % TFTP_BLOCK_MODULO, self.client,
                       tries)

    def _wait_for_ack(self, base, count, deadline, pending=None):
        """Wait until ``deadline`` for an ACK of one of blocks base ..
        base + count - 1.

        ``pending`` is a packet already received, handled first.  Returns
        how many blocks the ACK covers, or 0 on timeout.
        A duplicate or stale ACK is ignored and never triggers a resend,
        which would double every packet from then on (the Sorcerer's
        Apprentice bug, RFC 1123 4.2.3.1).  Nor does it move the deadline,
        which runs from the window's send: clients such as iPXE repeat
        their last ACK on a timer of their own, and a wait restarted by
        each repeat would leave a lost block unsent for seconds.
        """
        while True:
            packet = self.receive(deadline - time.monotonic(), pending)
            pending = None
            if packet is None:
                return 0
            self.check_client_error(packet, after_oack=False)
            if isinstance(packet, TFTPData):
                self._send_quietly(build_error(
                    TFTPErrorCode.ILLEGAL_OPERATION))
                raise TransferAborted("client sent DATA during a read")
            offset = (packet.block - base) % TFTP_BLOCK_MODULO
            if offset < count:
                return offset + 1


class WriteTransfer(TFTPTransfer):
    """Receive an upload (WRQ) into a temporary file, then rename it.

    The file appears under its final name only when it is complete; a
    failed or interrupted upload removes the temporary file.
    """

    direction = "from"

    def transfer(self):
        final = self._target_path()
        oack, options = negotiate_options(
            self.request, self.max_blksize(), self.config.max_windowsize,
            None)
        limit = self.config.upload_max_bytes
        if options.tsize is not None and options.tsize > limit:
            raise TFTPError(TFTPErrorCode.DISK_FULL,
                            f"announced size {options.tsize} is above "
                            f"upload_max_bytes={limit}")
        tftp_log.info("WRQ from %s file=%s mode=%s options=%s", self.client,
                      self.name_for_log, self.request.mode,
                      _format_options(oack) or "none")
        folder = os.path.dirname(final)
        fd, temporary = tempfile.mkstemp(
            dir=folder, prefix="." + os.path.basename(final) + ".",
            suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                self._receive_blocks(handle, oack, options, limit)
                handle.flush()
                os.fchmod(handle.fileno(), UPLOAD_FILE_MODE)
                os.fsync(handle.fileno())
            self._publish(temporary, final)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        self._send_quietly(self._last_ack)
        self.log_end("received")
        self._dally(options)

    def _target_path(self):
        upload_dir = self.server.upload_root
        if not upload_dir:
            raise TFTPError(TFTPErrorCode.ACCESS_VIOLATION,
                            "uploads are off; set upload_dir to accept them")
        path = resolve_under_root(upload_dir, self.request.filename)
        if path == upload_dir or not os.path.isdir(os.path.dirname(path)):
            raise TFTPError(TFTPErrorCode.ACCESS_VIOLATION,
                            f"no folder for {path!r} in the upload folder")
        if os.path.lexists(path):
            if not self.config.upload_overwrite:
                raise TFTPError(TFTPErrorCode.FILE_ALREADY_EXISTS,
                                f"{path!r} exists and upload_overwrite is "
                                f"off")
            if not os.path.isfile(path):
                raise TFTPError(TFTPErrorCode.ACCESS_VIOLATION,
                                f"{path!r} is not a regular file")
        return path

    def _publish(self, temporary, final):
        if self.config.upload_overwrite:
            os.replace(temporary, final)
            return
        # link() fails if the name appeared meanwhile; rename() would not.
        try:
            os.link(temporary, final)
        except FileExistsError:
            raise TFTPError(TFTPErrorCode.FILE_ALREADY_EXISTS,
                            f"{final!r} appeared during the upload") from None

    def _receive_blocks(self, handle, oack, options, limit):
        timer = RetransmitTimer(self.config.tftp_timeout, options.timeout)
        reply = build_oack(oack) if oack else build_ack(0)
        expected = 1  # next block number, not wrapped
        tries = 0
        pending_cr = False
        since_ack = 0
        self._send_quietly(reply)
        # Each new block or reply restarts the wait, but no other packet.
        replied_at = time.monotonic()
        deadline = replied_at + timer.rto
        # Whether the last reply went out more than once, which makes the
        # round trip to the next block ambiguous (Karn's rule).
        resent = False
        while True:
            packet = self.receive(deadline - time.monotonic())
            if packet is None:
                tries += 1
                if tries > self.config.tftp_retries:
                    raise TransferAborted(
                        f"timed out waiting for DATA block "
                        f"{expected % TFTP_BLOCK_MODULO} after {tries - 1} "
                        f"retries")
                timer.on_timeout()
                self.retransmits += 1
                self._send_quietly(reply)
                resent = True
                deadline = time.monotonic() + timer.rto
                continue
            self.check_client_error(packet, after_oack=bool(oack))
            if not isinstance(packet, TFTPData):
                continue
            now = time.monotonic()
            if packet.block != expected % TFTP_BLOCK_MODULO:
                # Out of order or repeated: acknowledge what we have, so the
                # client resends from the block after it (RFC 7440) and
                # starts a new window there.
                self._send_quietly(reply)
                resent = True
                since_ack = 0
                deadline = now + timer.rto
                continue
            if since_ack == 0:
                # The first block after a reply measures the round trip,
                # which also ends any back-off.
                if resent:
                    resent = False
                else:
                    timer.on_sample(now - replied_at)
            deadline = now + timer.rto
            tries = 0
            payload = packet.payload
            if self.request.mode == "netascii":
                payload, pending_cr = _join_netascii(payload, pending_cr)
            self.bytes += len(packet.payload)
            if self.bytes > limit:
                self._send_quietly(build_error(TFTPErrorCode.DISK_FULL))
                raise TransferAborted(f"upload exceeds upload_max_bytes="
                                      f"{limit}; partial file removed")
            handle.write(payload)
            final = len(packet.payload) < options.blksize
            since_ack += 1
            reply = build_ack(packet.block)
            expected += 1
            if final:
                # The final ACK goes out only once the file is saved
                # under its name, so a failure can still be reported.
                if pending_cr:
                    handle.write(b"\r")
                self._last_ack = reply
                return
            if since_ack >= options.windowsize:
                self._send_quietly(reply)
                replied_at = time.monotonic()
                since_ack = 0

    def _dally(self, options):
        """Answer a repeated final DATA whose ACK was lost, briefly."""
        deadline = time.monotonic() + TFTP_DALLY_SECONDS
        while time.monotonic() < deadline:
            try:
                packet = self.receive(deadline - time.monotonic())
            except TransferAborted:
                return
            if packet is None:
                return
            if isinstance(packet, TFTPData):
                self._send_quietly(self._last_ack)


def _join_netascii(payload, pending_cr):
    """Convert one netascii DATA payload, carrying a CR across blocks."""
    if pending_cr:
        payload = b"\r" + payload
    pending_cr = payload.endswith(b"\r")
    if pending_cr:
        payload = payload[:-1]
    return from_netascii(payload), pending_cr


def _format_options(options):
    return ",".join(f"{name}={value}" for name, value in options.items())


class TFTPServer:
    """The TFTP listener: accepts RRQ and WRQ and starts transfers.

    ``bind`` opens the listening socket; ``serve_forever`` runs in its own
    thread and never blocks on a transfer.  ``shutdown`` stops the listener
    and every transfer and joins their threads.  The table of transfers is
    guarded by a lock; everything else is read-only after bind.

    Each transfer's socket is connected to its client, which makes each
    packet cheaper to send and receive.  Beside it, on the same address and
    port, sits an unconnected guard socket: the kernel gives a packet to
    the connected socket when it comes from the client and to the guard
    otherwise.  The listener watches the guards and answers each foreign
    packet with ERROR 5 (RFC 1350 section 4), so the transfer goes on
    undisturbed.  Only the listener thread opens, watches and closes
    guards; a finished transfer hands its guard back through
    ``_retired_guards``.
    """

    def __init__(self, config):
        self.config = config
        self.root = os.path.realpath(config.root)
        self.upload_root = (os.path.realpath(config.upload_dir)
                            if config.upload_dir else "")
        self.stopping = threading.Event()
        self.warnings = RateLimiter()
        self.sock = None
        self._lock = threading.Lock()
        self._transfers = {}  # (address, port) -> TFTPTransfer
        self._retired_guards = []  # guards of finished transfers
        self._deferred = {}  # peer -> (deadline, data, ancillary)
        self._selector = None
        self._wake_reader = self._wake_writer = None
        self._mtu_cache = {}
        self._finished_callbacks = []

    @property
    def address(self):
        return self.sock.getsockname()

    def may_busy_poll(self):
        """Return whether a transfer may poll for ACKs instead of sleeping.

        A polling thread keeps the GIL and a CPU busy, so only a lone
        transfer polls.
        """
        return self.config.tftp_busy_poll > 0 and len(self._transfers) <= 1

    def bind(self):
        """Open the listening socket; raise StartupError naming the fix."""
        address = str(self.config.tftp_address)
        port = self.config.tftp_port
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            raise StartupError(_bind_error_text("TFTP", address, port,
                                                exc)) from None
        sock.setblocking(False)
        self.sock = sock
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        # A transfer thread writes a byte here when it ends, so that the
        # listener closes its guard and serves a deferred request at once.
        self._wake_reader, self._wake_writer = socket.socketpair()
        for end in (self._wake_reader, self._wake_writer):
            end.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ,
                                self._wake_reader)
        if self.upload_root:
            self._remove_stale_uploads()

    def _remove_stale_uploads(self):
        """Remove temporary upload files left by a crash or kill -9.

        Only names of the form mkstemp gave them (".NAME.XXXXXXXX.part")
        directly in the upload folder are removed, each with a log line.
        """
        try:
            names = os.listdir(self.upload_root)
        except OSError as exc:
            tftp_log.warning("cannot list upload folder %s: %s",
                             self.upload_root, exc)
            return
        for name in names:
            if not STALE_UPLOAD_NAME.match(name):
                continue
            path = os.path.join(self.upload_root, name)
            try:
                os.unlink(path)
            except OSError as exc:
                tftp_log.warning("cannot remove stale upload %s: %s", path,
                                 exc)
                continue
            tftp_log.info("removed stale upload %s left by an interrupted "
                          "transfer", path)

    def add_finished_callback(self, callback):
        """Call ``callback(transfer, ok)`` after each transfer ends."""
        self._finished_callbacks.append(callback)

    def serve_forever(self):
        while not self.stopping.is_set():
            for key, _ in self._selector.select(TFTP_LISTENER_WAKE_SECONDS):
                if key.data is None:
                    self._receive_requests()
                elif key.data is self._wake_reader:
                    self._drain_wake_socket()
                else:
                    self._answer_foreign(key.fileobj, key.data)
            self._close_retired_guards()
            self._serve_deferred()

    def _dispatch_safely(self, data, ancillary, peer):
        """Dispatch a request; log a bug in doing so and keep serving."""
        try:
            self._dispatch(data, ancillary, peer)
        except Exception:
            tftp_log.exception("request from %s:%d failed: internal error",
                               peer[0], peer[1])

    def _drain_wake_socket(self):
        try:
            while self._wake_reader.recv(TFTP_ACK_BUFFER_BYTES):
                pass
        except OSError:
            pass  # BlockingIOError once empty

    def _wake(self):
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass  # a full buffer already contains a wake-up

    def _serve_deferred(self):
        """Dispatch deferred requests whose client's transfer has ended,
        and drop those that waited too long."""
        if not self._deferred:
            return
        now = time.monotonic()
        for peer, (deadline, data, ancillary) in list(self._deferred.items()):
            with self._lock:
                running = peer in self._transfers
            if running and now < deadline:
                continue
            del self._deferred[peer]
            if running:
                tftp_log.debug("request from %s:%d dropped: its previous "
                               "transfer did not end in time", peer[0],
                               peer[1])
                continue
            self._dispatch_safely(data, ancillary, peer)

    def _receive_requests(self):
        """Dispatch the requests waiting on the listening socket."""
        for _ in range(TFTP_REQUESTS_PER_WAKE):
            try:
                data, ancillary, _, peer = self.sock.recvmsg(
                    TFTP_RECEIVE_BUFFER_BYTES, socket.CMSG_SPACE(
                        IN_PKTINFO.size))
            except BlockingIOError:
                return
            except OSError as exc:
                if not self.stopping.is_set():
                    tftp_log.error("receive on the TFTP socket failed: %s",
                                   exc)
                    time.sleep(0.1)
                return
            self._dispatch_safely(data, ancillary, peer)

    def _answer_foreign(self, guard, transfer):
        """Reply with ERROR 5 to packets from other senders on a transfer's
        port.

        A packet from the transfer's own client reaches the guard only once
        the transfer's socket is closed.  It is a late duplicate, so it is
        dropped without a reply.
        """
        for _ in range(TFTP_REQUESTS_PER_WAKE):
            try:
                _, source = guard.recvfrom(TFTP_ACK_BUFFER_BYTES)
            except OSError:
                return  # BlockingIOError when drained
            if source == transfer.peer:
                continue
            try:
                guard.sendto(build_error(TFTPErrorCode.UNKNOWN_TRANSFER_ID),
                             source)
            except OSError:
                pass  # the foreign sender is not ours to serve
            warn_limited(tftp_log, self.warnings, source[0],
                         "packet from %s:%d to the transfer of %s to %s "
                         "rejected: ERROR 5 unknown transfer ID",
                         source[0], source[1], transfer.name_for_log,
                         transfer.client)

    def _close_retired_guards(self):
        with self._lock:
            guards, self._retired_guards = self._retired_guards, []
        for guard in guards:
            self._selector.unregister(guard)
            guard.close()

    def _dispatch(self, data, ancillary, peer):
        try:
            request = parse_tftp_request(data)
        except PacketError as exc:
            self._reject_malformed(data, peer, exc)
            return
        # A finished transfer's guard keeps its port bound until it is closed.
        self._close_retired_guards()
        local_address, ifindex = _read_pktinfo(ancillary)
        with self._lock:
            running = self._transfers.get(peer)
            if running is not None and running.final_sent:
                # The client has its whole file and may be asking for the
                # next one from the same port before the ACK of the last
                # block has reached the transfer's thread.
                if len(self._deferred) < self.config.max_transfers:
                    self._deferred[peer] = (
                        time.monotonic() + TFTP_DEFER_SECONDS, data,
                        ancillary)
                tftp_log.debug("%s from %s:%d deferred: its previous "
                               "transfer is ending", request.opcode.name,
                               peer[0], peer[1])
                return
            if running is not None:
                tftp_log.debug("repeated %s from %s:%d ignored: its "
                               "transfer is running", request.opcode.name,
                               peer[0], peer[1])
                return
            if len(self._transfers) >= self.config.max_transfers:
                self._reject_request(
                    peer, TFTP_BUSY_REPLY,
                    f"{request.opcode.name} file="
                    f"{printable(request.filename)}: "
                    f"{len(self._transfers)} transfers running "
                    f"(max_transfers)")
                return
            if request.mode not in TFTP_MODES:
                self._send(build_error(TFTPErrorCode.ILLEGAL_OPERATION),
                           peer)
                warn_limited(tftp_log, self.warnings, peer[0],
                             "%s from %s:%d rejected: unsupported mode %r",
                             request.opcode.name, peer[0], peer[1],
                             printable(request.mode))
                return
            sockets = self._open_transfer_sockets(local_address, peer)
            if sockets is None:
                return
            sock, guard = sockets
            kind = (ReadTransfer if request.opcode == TFTPOpcode.RRQ
                    else WriteTransfer)
            transfer = kind(self, sock, peer, request, self._mtu(ifindex))
            transfer.guard = guard
            self._selector.register(guard, selectors.EVENT_READ, transfer)
            self._transfers[peer] = transfer
        try:
            transfer.start()
        except RuntimeError as exc:  # the system refused a new thread
            sock.close()
            self.transfer_finished(transfer)
            self._reject_request(peer, TFTP_BUSY_REPLY,
                                 f"cannot start a transfer thread: {exc}; "
                                 f"lower max_transfers")

    def _reject_malformed(self, data, peer, exc):
        try:
            opcode = parse_tftp_opcode(data)
        except PacketError:
            opcode = None
        if opcode in (TFTPOpcode.DATA, TFTPOpcode.ACK, TFTPOpcode.ERROR,
                      TFTPOpcode.OACK):
            # A packet of some transfer, sent here by mistake: tftp-hpa,
            # for one, sends an ACK to the port that sent it an ERROR.  The
            # client would read a reply as the result of its next request,
            # and an ERROR for an ERROR could make two servers loop.
            tftp_log.debug("%s from %s:%d to the request port ignored",
                           opcode.name, peer[0], peer[1])
            return
        self._send(build_error(TFTPErrorCode.ILLEGAL_OPERATION), peer)
        warn_limited(tftp_log, self.warnings, peer[0],
                     "malformed TFTP request from %s:%d rejected: %s",
                     peer[0], peer[1], printable(str(exc)))

    def _send(self, packet, peer):
        try:
            self.sock.sendto(packet, peer)
        except OSError as exc:
            tftp_log.error("send to %s:%d failed: %s", peer[0], peer[1], exc)

    def _open_transfer_sockets(self, local_address, peer):
        """Open a transfer's socket and its guard on the address the RRQ
        reached.

        Replies then leave from the address the client talked to, even on a
        host with several addresses.  The transfer's socket binds without
        SO_REUSEADDR, so that no other transfer can hold its port, and sets
        it afterwards, so that the guard can bind beside it.  Both then
        clear it, so that no other socket, such as one of another local
        user, can bind the port and take or forge the transfer's packets.
        NOTE: the port can be shared only in the microseconds between the
        guard's bind and that.  Returns (socket, guard), or None after
        logging and answering the client.
        """
        ports = [0]
        if self.config.tftp_port_range:
            low, high = self.config.tftp_port_range
            ports = random.sample(range(low, high + 1),
                                  min(high - low + 1, 64))
        sock = guard = None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for port in ports:
                try:
                    sock.bind((local_address, port))
                    break
                except OSError as exc:
                    error = exc
            else:
                sock.close()
                self._reject_request(peer, "no free transfer port",
                                     f"no free transfer port on "
                                     f"{local_address} ({error}); widen "
                                     f"tftp_port_range")
                return None
            sock.connect(peer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            guard = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            guard.bind(sock.getsockname())
            for opened in (sock, guard):
                opened.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            guard.setblocking(False)
            return sock, guard
        except OSError as exc:
            for opened in (sock, guard):
                if opened is not None:
                    opened.close()
            self._reject_request(peer, TFTP_BUSY_REPLY,
                                 f"cannot open a transfer socket on "
                                 f"{local_address}: {exc}; check the open "
                                 f"file limit (ulimit -n)")
            return None

    def _reject_request(self, peer, reply, reason):
        """Send ERROR 0 with ``reply`` to ``peer``; log ``reason``."""
        self._send(build_error(TFTPErrorCode.NOT_DEFINED, reply), peer)
        warn_limited(tftp_log, self.warnings, peer[0],
                     "request from %s:%d rejected: %s", peer[0], peer[1],
                     reason)

    def _mtu(self, ifindex):
        if not ifindex:
            return None
        if ifindex not in self._mtu_cache:
            self._mtu_cache[ifindex] = interface_mtu(ifindex)
        return self._mtu_cache[ifindex]

    def release_transfer(self, transfer):
        """Free a transfer's slot, client address and port once its socket
        is closed, and hand its guard to the listener.  A second call, from
        transfer_finished after an early one, changes nothing."""
        with self._lock:
            if self._transfers.get(transfer.peer) is transfer:
                del self._transfers[transfer.peer]
            if transfer.guard is not None:
                self._retired_guards.append(transfer.guard)
                transfer.guard = None
        if self._wake_writer is not None:
            self._wake()

    def transfer_finished(self, transfer):
        self.release_transfer(transfer)
        for callback in self._finished_callbacks:
            callback(transfer)

    def active_transfers(self):
        with self._lock:
            return list(self._transfers.values())

    def shutdown(self):
        """Stop listening, end every transfer and join its thread."""
        self.stopping.set()
        for transfer in self.active_transfers():
            try:
                # Wakes a waiting receive; sends still work, so the
                # transfer can tell its client.
                transfer.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # already closed; the stop flag ends it at its next wait
        deadline = time.monotonic() + SHUTDOWN_JOIN_SECONDS
        for transfer in self.active_transfers():
            transfer.join(max(0.0, deadline - time.monotonic()))

    def close(self):
        self._close_retired_guards()
        if self._selector is not None:
            self._selector.close()
        for sock in (self.sock, self._wake_reader, self._wake_writer):
            if sock is not None:
                sock.close()


def _read_pktinfo(ancillary):
    """Return (local address, interface index) from IP_PKTINFO data."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            ifindex, spec_dst, _ = IN_PKTINFO.unpack_from(data)
            return socket.inet_ntoa(spec_dst), ifindex
    return "0.0.0.0", 0


def _bind_error_text(service, address, port, exc, kind="UDP"):
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE and service == "DHCP":
        fix = ("stop the other DHCP server, or run beside it with --mode "
               "proxy")
    elif exc.errno == errno.EADDRINUSE:
        fix = f"stop the other {service} server or choose another port"
    elif exc.errno == errno.EACCES:
        fix = "run as root or choose a port above 1023"
    elif exc.errno == errno.EADDRNOTAVAIL:
        fix = "use an address that belongs to this host"
    else:
        fix = "check the address and port"
    return (f"cannot bind {service} {kind} port {port} on {address}: "
            f"{reason.lower()}; {fix}")


# ---------------------------------------------------------------------------
# HTTP server (RFC 9110, 9112; byte ranges from RFC 9110 section 14)
# ---------------------------------------------------------------------------

HTTP_IDLE_TIMEOUT_SECONDS = 30
# Time a connection has to deliver a whole request line and headers, from
# the end of its previous response or its start.  Without it a client
# that sends one byte at a time would hold its connection for good.
HTTP_HEAD_TIMEOUT_SECONDS = 10
HTTP_MAX_CONNECTIONS_PER_CLIENT = 8  # open connections from one address
HTTP_MAX_URL_CHARS = 2048
HTTP_MAX_CONNECTIONS = 64  # open connections; more are closed at once
SPARE_DESCRIPTORS = 64  # for logs, DHCP and lease files, beyond transfers


class HTTPBootServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A read-only HTTP server for the TFTP root, for large boot files.

    Serves GET and HEAD with Content-Length and single byte ranges, under
    the same path rules as TFTP (resolve_under_root).  Each connection has
    its own daemon thread; files are sent with sendfile(), never read
    whole into memory.
    """

    daemon_threads = True
    allow_reuse_address = True
    # The listen backlog; socketserver's default of 5 drops the handshakes
    # of a larger burst of clients, which then wait a second to retry.
    request_queue_size = HTTP_MAX_CONNECTIONS

    def __init__(self, config, root):
        self.config = config
        self.root = root
        self.warnings = RateLimiter()
        self._slots = threading.BoundedSemaphore(HTTP_MAX_CONNECTIONS)
        self._per_client = collections.Counter()  # address -> connections
        self._per_client_lock = threading.Lock()
        address = str(config.http_address)
        try:
            super().__init__((address, config.http_port), HTTPBootHandler)
        except OSError as exc:
            raise StartupError(_bind_error_text(
                "HTTP", address, config.http_port, exc, "TCP")) from None

    def process_request(self, request, client_address):
        # Each connection uses a thread, so their number is bounded, in
        # all and per client address, so that one client cannot take all.
        address = client_address[0]
        with self._per_client_lock:
            crowded = (self._per_client[address]
                       >= HTTP_MAX_CONNECTIONS_PER_CLIENT)
            if not crowded:
                self._per_client[address] += 1
        if crowded:
            warn_limited(http_log, self.warnings, address,
                         "connection from %s:%d closed: %d connections "
                         "open from this address", address,
                         client_address[1], HTTP_MAX_CONNECTIONS_PER_CLIENT)
            self.shutdown_request(request)
            return
        if not self._slots.acquire(blocking=False):
            self._release_client(address)
            warn_limited(http_log, self.warnings, address,
                         "connection from %s:%d closed: %d connections "
                         "open", address, client_address[1],
                         HTTP_MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            self._release_client(address)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
            self._release_client(client_address[0])

    def _release_client(self, address):
        with self._per_client_lock:
            self._per_client[address] -= 1
            if self._per_client[address] <= 0:
                del self._per_client[address]

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, socket.timeout)):
            # The client went away or stalled; nothing is wrong here.
            http_log.info("connection from %s:%d ended: %s",
                          client_address[0], client_address[1], error)
            return
        http_log.exception("request from %s:%d failed: internal error",
                           client_address[0], client_address[1])


def parse_byte_range(header, size):
    """Parse a Range header for a file of ``size`` bytes.

    Returns (start, end) inclusive for one satisfiable range, None when the
    header should be ignored (not a single 'bytes' range), or raises
    ValueError when the range cannot be satisfied (416).
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    # RFC 9110 14.1.1 allows digits only; any other form is ignored.
    if not dash or not _is_digits(first or "0") or not _is_digits(last or "0"):
        return None
    if not first:
        if not last:
            return None
        if int(last) == 0:
            raise ValueError(f"empty suffix range {header!r}")
        return max(0, size - int(last)), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size:
        raise ValueError(f"range {header!r} starts past the end ({size})")
    if start < 0 or end < start:
        return None
    return start, min(end, size - 1)


def _is_digits(text):
    return bool(text) and all("0" <= char <= "9" for char in text)


class _HeadDeadlineReader(io.RawIOBase):
    """Reads a connection's socket; while ``deadline`` is set, no read
    waits past it, however the bytes trickle in."""

    def __init__(self, sock):
        super().__init__()
        self._sock = sock
        self.deadline = None  # a time.monotonic() value, or None

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.deadline is None:
            return self._sock.recv_into(buffer)
        remaining = self.deadline - time.monotonic()
        if remaining > 0:
            self._sock.settimeout(min(remaining, HTTP_IDLE_TIMEOUT_SECONDS))
            try:
                return self._sock.recv_into(buffer)
            except socket.timeout:
                if time.monotonic() < self.deadline:
                    raise
        raise socket.timeout(f"request line and headers not complete "
                             f"after {HTTP_HEAD_TIMEOUT_SECONDS} s")


class HTTPBootHandler(http.server.BaseHTTPRequestHandler):
    """Handles one HTTP connection; GET and HEAD only."""

    protocol_version = "HTTP/1.1"
    timeout = HTTP_IDLE_TIMEOUT_SECONDS

    def setup(self):
        super().setup()
        self.rfile.close()  # the socket stays open; its reader is replaced
        self._head_reader = _HeadDeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._head_reader)

    def handle_one_request(self):
        self._head_reader.deadline = (time.monotonic()
                                      + HTTP_HEAD_TIMEOUT_SECONDS)
        super().handle_one_request()

    def _head_received(self):
        """Lift the head deadline; the response has the idle timeout."""
        self._head_reader.deadline = None
        self.connection.settimeout(self.timeout)

    def version_string(self):
        return f"pxeserver/{__version__}"

    def log_error(self, format, *args):
        # http.server calls this for requests it rejects itself (400, 501).
        warn_limited(http_log, self.server.warnings, self.client_address[0],
                     "request from %s:%d rejected: %s",
                     self.client_address[0], self.client_address[1],
                     printable(format % args))

    def do_GET(self):
        self._serve(send_body=True)

    def do_HEAD(self):
        self._serve(send_body=False)

    def log_message(self, format, *args):
        # http.server's own lines (bad request lines, timeouts) go to DEBUG;
        # each answered request gets one INFO line from _log_request.
        http_log.debug("%s:%d %s", self.client_address[0],
                       self.client_address[1], printable(format % args))

    def _serve(self, send_body):
        self._head_received()
        started = time.monotonic()
        self.rejection = None
        self.failure = None
        status, sent = self._respond(send_body)
        if self.rejection is not None:
            http_log.warning("%s %s from %s:%d rejected: status=%d %s",
                             self.command, printable(self.path),
                             self.client_address[0], self.client_address[1],
                             status, self.rejection)
            return
        if self.failure is not None:
            http_log.warning("%s %s from %s:%d failed: status=%d bytes=%d "
                             "%s", self.command, printable(self.path),
                             self.client_address[0], self.client_address[1],
                             status, sent, self.failure)
            return
        http_log.info("%s %s from %s:%d status=%d bytes=%d seconds=%.3f",
                      self.command, printable(self.path),
                      self.client_address[0], self.client_address[1],
                      status, sent, time.monotonic() - started)

    def _respond(self, send_body):
        """Send the response; return (status, body bytes sent)."""
        if len(self.path) > HTTP_MAX_URL_CHARS:
            return self._error(414, "URL too long"), 0
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        try:
            path = resolve_under_root(self.server.root, name)
        except TFTPError as exc:
            status = (404 if exc.code == TFTPErrorCode.FILE_NOT_FOUND
                      else 403)
            self.rejection = str(exc)
            return self._error(status, "Not Found" if status == 404
                               else "Forbidden"), 0
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return self._error(404, "Not Found"), 0
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return self._error(404, "Not Found"), 0
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as handle:
            return self._send_file(handle, info.st_size, send_body)

    def _send_file(self, handle, size, send_body):
        start, end, status = 0, size - 1, 200
        header = self.headers.get("Range")
        if header is not None and size > 0:
            try:
                byte_range = parse_byte_range(header, size)
            except ValueError:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return 416, 0
            if byte_range is not None:
                start, end = byte_range
                status = 206
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not send_body or length == 0:
            return status, 0
        self.wfile.flush()
        try:
            sent = self.connection.sendfile(handle, start, length)
        except OSError as exc:
            self.failure = f"sending failed: {exc}"
            self.close_connection = True
            return status, 0
        if sent < length:
            self.failure = f"file shrank: sent {sent} of {length} bytes"
            self.close_connection = True
        return status, sent

    def _error(self, status, text):
        body = f"{status} {text}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status


# ---------------------------------------------------------------------------
# Service runner
# ---------------------------------------------------------------------------


# Settings that a SIGHUP reload cannot change: they need new sockets, a
# new pool or a new root.
RESTART_SETTINGS = (
    "iface", "root", "mode", "server_address", "tftp_address", "tftp_port",
    "tftp_port_range", "upload_dir", "http_port", "http_address",
    "pool_start", "pool_end", "lease_file", "lease_time", "user",
    "log_format", "log_file", "log_timestamps",
)


def raise_descriptor_limit(max_transfers, http):
    """Raise the soft open-file limit to what max_transfers needs.

    Each transfer uses TFTP_DESCRIPTORS_PER_TRANSFER descriptors, and the
    HTTP server, when ``http`` is true, up to HTTP_MAX_CONNECTIONS.  The
    soft limit is raised up to the hard one.  If that is still too low, a
    warning names the limit and what to change.
    """
    others = SPARE_DESCRIPTORS + (HTTP_MAX_CONNECTIONS if http else 0)
    needed = max_transfers * TFTP_DESCRIPTORS_PER_TRANSFER + others
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.debug("cannot raise the open file limit to %d: %s", target,
                      exc)
    if soft < needed:
        log.warning("the open file limit (%d) allows about %d TFTP "
                    "transfers, fewer than max_transfers=%d; raise it with "
                    "ulimit -n or LimitNOFILE=, or lower max_transfers",
                    soft, max(0, (soft - others)
                              // TFTP_DESCRIPTORS_PER_TRANSFER),
                    max_transfers)


class Service:
    """Binds every socket, runs each server in a thread, and stops them.

    All sockets are bound in ``bind`` before any thread starts; if one bind
    fails, the ones already bound are closed and StartupError is raised.
    """

    def __init__(self, config):
        self.config = config
        self.interface = None
        self.tftp = TFTPServer(config)
        self.http = None
        self.mode = config.mode
        self.dhcp = None
        self.boot_server = None
        self.watch = None
        self.done = threading.Event()  # set when --exit-after is reached
        self._booted_clients = set()
        self._booted_lock = threading.Lock()
        self._threads = []
        self.tftp.add_finished_callback(self._count_boot)

    def bind(self):
        raise_descriptor_limit(self.config.max_transfers,
                               self.config.http_port is not None)
        try:
            self.tftp.bind()
            if self.config.http_port is not None:
                self.http = HTTPBootServer(self.config, self.tftp.root)
            if self.config.mode == "off":
                return
            self.interface = read_interface(self.config.iface)
            own_address = self.config.server_address or self.interface.address
            self.mode = choose_mode(self.config, self.interface, own_address)
            http_base = self._http_base(own_address)
            if self.mode == "full":
                self.dhcp = DHCPServer(self.config, self.interface,
                                       http_base=http_base)
                self._watch_other_servers(own_address)
            else:
                self.dhcp = ProxyDHCPServer(self.config, self.interface,
                                            http_base=http_base)
                self.boot_server = BootServer(self.config, self.interface,
                                              port=PXE_BOOT_SERVER_PORT,
                                              http_base=http_base)
        except BaseException:
            self.close()
            raise

    def _count_boot(self, transfer):
        """Count a finished download for --exit-after."""
        limit = self.config.exit_after
        if not limit or not transfer.completed or transfer.path is None:
            return
        if not isinstance(transfer, ReadTransfer):
            return
        if transfer.path not in self._counted_paths():
            return
        with self._booted_lock:
            self._booted_clients.add(transfer.peer[0])
            count = len(self._booted_clients)
        if count >= limit:
            log.info("exit_after=%d reached: %d clients downloaded their "
                     "boot file; stopping", limit, count)
            self.done.set()

    def _counted_paths(self):
        """Return the resolved paths whose downloads --exit-after counts."""
        config = self.config
        if config.exit_after_file:
            names = {config.exit_after_file}
        else:
            names = boot_file_names(config)
        paths = set()
        for name in names:
            if name:
                try:
                    paths.add(resolve_under_root(self.tftp.root, name))
                except TFTPError:
                    continue
        return paths

    def drop_privileges(self):
        """Switch to the --user account; raise StartupError on failure.

        Called after every socket is bound.  The lease file's folder and
        file are handed to the user first, so leases can still be written.
        """
        name = self.config.user
        if not name:
            return
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            raise ConfigError(f"--user {name}: no such user; create it or "
                              f"choose another") from None
        leases = self.dhcp.leases if self.dhcp is not None else None
        try:
            if leases is not None:
                self._hand_over_lease_file(leases, account)
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
        except OSError as exc:
            raise StartupError(f"--user {name}: cannot switch user: "
                               f"{exc.strerror}; run as root or leave "
                               f"--user out") from None
        if leases is not None:
            leases.check_writable()
        log.info("switched to user %s (uid %d)", name, account.pw_uid)

    @staticmethod
    def _hand_over_lease_file(leases, account):
        """Give the lease file, and its folder if we created it, to a user.

        A folder that existed before start-up (/var/lib, /tmp) is left
        alone; the check after the switch reports it if it is not writable.
        """
        path = os.path.abspath(leases.path)
        owned = [path] if os.path.exists(path) else []
        if leases.created_folder:
            owned.append(os.path.dirname(path))
        for item in owned:
            os.chown(item, account.pw_uid, account.pw_gid)

    def reload(self, config):
        """Apply a re-read configuration (SIGHUP) without a restart.

        Boot files, reservations, DHCP options, TFTP limits and the log
        level take effect for new requests; running transfers and leases
        are kept.  Settings that need new sockets or a new pool keep their
        old values, with a warning.
        """
        old = self.config
        kept = {key: getattr(old, key) for key in RESTART_SETTINGS
                if getattr(old, key) != getattr(config, key)}
        for key in sorted(kept):
            config_log.warning("reload: %s changed to '%s', which needs a "
                               "restart; keeping '%s'", key,
                               getattr(config, key), kept[key])
        config = config._replace(**kept)
        changed = [field for field in Config._fields
                   if getattr(old, field) != getattr(config, field)]
        self.config = config
        self.tftp.config = config
        for server in (self.dhcp, self.boot_server):
            if server is not None:
                server.config = config
        if self.dhcp is not None and self.dhcp.leases is not None:
            self.dhcp.leases.set_reservations(config.reservations)
        logging.getLogger("pxeserver").setLevel(config.log_level.upper())
        config_log.info("reloaded %s: changed %s", config.config_file,
                        ", ".join(changed) or "nothing")

    def _http_base(self, own_address):
        """Return the base URL clients reach the HTTP server at, or None."""
        if self.http is None:
            return None
        return f"http://{own_address}:{self.http.server_address[1]}"

    def _watch_other_servers(self, own_address):
        try:
            self.watch = OtherServerWatch(self.interface, own_address)
        except OSError as exc:
            dhcp_log.warning("cannot listen on port %d of %s to detect "
                             "other DHCP servers: %s", DHCP_CLIENT_PORT,
                             self.interface.name, exc)

    def warn_missing_boot_files(self):
        """Log one warning naming the boot files missing under the root."""
        if self.dhcp is None:
            return
        missing = []
        for name in sorted(boot_file_names(self.config)):
            try:
                path = resolve_under_root(self.tftp.root, name)
            except TFTPError as exc:
                config_log.warning("boot file %r: %s", name, exc)
                continue
            if not os.path.isfile(path):
                missing.append(name)
        if missing:
            config_log.warning("boot files not found under %s: %s; clients "
                               "given them will fail to boot (--check lists "
                               "which clients get which file)",
                               self.tftp.root, ", ".join(missing))

    def start(self):
        self.warn_missing_boot_files()
        if (self.dhcp is not None and self.config.known_clients_only
                and not self.config.reservations):
            config_log.warning("known_clients_only is on but no [host:MAC] "
                               "section exists, so no client will get an "
                               "answer; add host sections to --config")
        servers = [("tftp", self.tftp.serve_forever)]
        for name, server in (("dhcp", self.dhcp),
                             ("boot-server", self.boot_server),
                             ("dhcp-watch", self.watch),
                             ("http", self.http)):
            if server is not None:
                servers.append((name, server.serve_forever))
        for name, target in servers:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("ready: %s", self.describe())

    def describe(self):
        """Return the startup summary: mode, interface, addresses, ports."""
        address, port = self.tftp.address
        parts = [f"mode={self.mode}", f"tftp={address}:{port}",
                 f"root={self.tftp.root}"]
        if self.dhcp is not None:
            parts.append(f"dhcp={self.interface.name}")
            parts.append(f"server={self.dhcp.server_address_ip}")
        if self.dhcp is not None and self.dhcp.leases is not None:
            parts.append(f"pool={self.dhcp.leases.pool_text()}")
        if self.boot_server is not None:
            parts.append(f"boot-server=0.0.0.0:{PXE_BOOT_SERVER_PORT}")
        if self.http is not None:
            address, port = self.http.server_address[:2]
            parts.append(f"http={address}:{port}")
        return " ".join(parts)

    def stop(self):
        for server in (self.dhcp, self.boot_server, self.watch, self.http):
            if server is not None:
                server.shutdown()
        self.tftp.shutdown()
        for thread in self._threads:
            thread.join(SHUTDOWN_JOIN_SECONDS)
        self.close()

    def close(self):
        self.tftp.close()
        for server in (self.dhcp, self.boot_server, self.http):
            if server is not None:
                server.server_close()
        if self.watch is not None:
            self.watch.close()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _argparse_type(parse):
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def build_parser():
    """Build the argument parser from the settings table."""
    parser = argparse.ArgumentParser(
        prog="pxeserver.py",
        description="Network-boot (PXE) server: DHCP, proxyDHCP, TFTP and "
                    "HTTP in one file.",
        epilog="Settings come from the defaults, then the INI file given by "
               "--config, then the flags; a flag wins over the file. Each "
               "flag is also an INI key: --tftp-port is tftp_port in the "
               "[tftp] section.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="FILE",
                        help="INI file to read settings from")
    parser.add_argument("--check", action="store_true",
                        help="check the configuration, the boot files, the "
                             "interface and the ports, print the plan, and "
                             "exit: 0 when all is well, 1 with every "
                             "problem listed")
    groups = {
        "server": parser.add_argument_group("server"),
        "tftp": parser.add_argument_group("TFTP"),
        "http": parser.add_argument_group("HTTP"),
        "dhcp": parser.add_argument_group("DHCP (full mode)"),
        "boot": parser.add_argument_group("boot files"),
    }
    groups["server"].add_argument(
        "--tftp-only", dest="mode", action="store_const", const="off",
        help="serve TFTP only, with no DHCP; the same as --mode off")
    for setting in SETTINGS:
        help_text = setting.help
        if setting.default is not None and "(default:" not in help_text:
            default = (repr(setting.default) if setting.default == ""
                       else setting.default)
            help_text += f" (default: {default})"
        extra = {}
        if setting.parse is parse_bool:
            extra = {"nargs": "?", "const": True}
        groups[setting.section].add_argument(
            setting.flag, dest=setting.key, metavar=setting.metavar,
            type=_argparse_type(setting.parse), default=None,
            help=help_text.replace("%", "%%"),
            **extra)
    return parser


def _check_port(service, kind, address, port, device=None):
    """Return a problem text if ``port`` cannot be bound, else None."""
    sock_type = socket.SOCK_STREAM if kind == "TCP" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, sock_type) as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if device:
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE,
                                device.encode() + b"\0")
            sock.bind((address, port))
        except OSError as exc:
            return _bind_error_text(service, address, port, exc, kind)
    return None


def check_setup(config, out=sys.stdout):
    """Check what start-up needs and print the plan; return the problems.

    Checks every boot file under the root, the interface, and that each
    port can be bound (it is bound and released at once).  Auto mode is
    reported as is: the probe would send a DHCPDISCOVER, so --check does
    not run it.
    """
    problems = []
    root = os.path.realpath(config.root)
    print(f"mode: {config.mode}", file=out)
    print(f"root: {root}", file=out)
    interface = None
    if config.mode != "off":
        try:
            interface = read_interface(config.iface)
        except ConfigError as exc:
            problems.append(str(exc))
    if interface is not None:
        own = config.server_address or interface.address
        print(f"interface: {interface.name} address={own} "
              f"subnet={interface.network} mtu={interface.mtu}", file=out)
        if config.mode in ("auto", "full"):
            try:
                start, end = derive_pool(interface.network, own,
                                         config.pool_start, config.pool_end)
                print(f"pool (full mode): {start}-{end}", file=out)
            except ConfigError as exc:
                problems.append(str(exc))
    http_base = None
    if config.http_port is not None:
        host = (config.server_address or (interface.address if interface
                                          else config.http_address))
        http_base = f"http://{host}:{config.http_port}"
    print("boot files:", file=out)
    for arch, setting in sorted(ARCH_BOOT_SETTINGS.items()):
        client = ClientInfo(arch=arch)
        name, _ = choose_boot_file(config, client, None, None)
        print(f"  arch {arch:2d} ({ClientArch(arch).name.lower()}): "
              f"{name or 'none'}", file=out)
    print(f"  other arch: {config.fallback_file or 'none'}", file=out)
    ipxe, _ = choose_boot_file(config, ClientInfo(arch=0, is_ipxe=True),
                               None, http_base)
    print(f"  iPXE: {ipxe or 'none'}", file=out)
    for mac, reservation in sorted(config.reservations.items()):
        print(f"  host {format_mac(mac)}: address="
              f"{reservation.address or 'pool'} boot_file="
              f"{reservation.boot_file or 'by arch'}", file=out)
    # A missing file that was configured is a problem; a missing default
    # only means that kind of client cannot boot, which may be intended.
    configured, defaults = set(), set()
    if config.mode != "off":
        for key in BOOT_FILE_SETTINGS:
            (configured if key in config.explicit else defaults).add(
                getattr(config, key))
        configured.update(r.boot_file for r in config.reservations.values())
    for name in sorted(name for name in configured | defaults if name):
        try:
            path = resolve_under_root(root, name)
        except TFTPError as exc:
            problems.append(f"boot file {name!r}: {exc}")
            continue
        if os.path.isfile(path) and not os.access(path, os.R_OK):
            problems.append(f"boot file {name!r} is not readable")
        elif os.path.isfile(path):
            continue
        elif name in configured:
            problems.append(f"boot file {name!r} not found under {root}; "
                            f"copy it there or change the setting")
        else:
            print(f"note: default boot file {name!r} not found under "
                  f"{root}; clients given it cannot boot", file=out)
    ports = [("TFTP", "UDP", str(config.tftp_address), config.tftp_port,
              None)]
    if config.http_port is not None:
        ports.append(("HTTP", "TCP", str(config.http_address),
                      config.http_port, None))
    if interface is not None:
        ports.append(("DHCP", "UDP", "0.0.0.0", DHCP_SERVER_PORT,
                      interface.name))
        if config.mode in ("auto", "proxy"):
            ports.append(("PXE boot server", "UDP", "0.0.0.0",
                          PXE_BOOT_SERVER_PORT, interface.name))
    for service, kind, address, port, device in ports:
        problem = _check_port(service, kind, address, port, device)
        if problem:
            problems.append(problem)
    return problems


def main(argv=None):
    """Run the server until SIGTERM or SIGINT; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        problems = check_setup(config)
        for problem in problems:
            print(f"problem: {problem}")
        print("check: " + (f"{len(problems)} problems" if problems
                           else "ok"))
        return 1 if problems else 0
    try:
        configure_logging(config.log_level, config.log_timestamps,
                          log_format=config.log_format,
                          log_file=config.log_file)
    except ConfigError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    service = Service(config)
    try:
        service.bind()
        service.drop_privileges()
    except ConfigError as exc:
        service.close()
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        service.close()
        log.error("%s", exc)
        return 1
    stop = threading.Event()
    reload = threading.Event()
    wake = threading.Event()  # set by either signal; wakes the loop below

    def request_stop(signum, frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()
        wake.set()

    def request_reload(signum, frame):
        reload.set()
        wake.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    service.start()
    log.debug("start-up took %.3f s", time.monotonic() - started)
    while not service.done.is_set() and not stop.is_set():
        wake.wait(0.5)
        wake.clear()
        if reload.is_set() and not stop.is_set():
            reload.clear()
            _reload(service, args)
    service.stop()
    log.info("stopped")
    return 0


def _reload(service, args):
    """Re-read the INI file on SIGHUP; keep the old one if it is invalid."""
    if not args.config:
        config_log.info("received SIGHUP but no --config file is in use; "
                        "nothing to reload")
        return
    try:
        config = build_config(args)
    except ConfigError as exc:
        config_log.error("reload of %s rejected, keeping the running "
                         "configuration: %s", args.config, exc)
        return
    service.reload(config)


if __name__ == "__main__":
    sys.exit(main())
