"""Tests of the HTTP server for boot files and of HTTP boot over DHCP.

TestHTTPServer and the classes after it run an HTTPBootServer in-process on
127.0.0.1 with an ephemeral port, and talk to it with http.client or a
raw socket.  The server is in this process, so a test can read its memory
use and its thread count directly.

TestHTTPBootOffer runs DHCPServer and ProxyDHCPServer on the loopback
harness of test_dhcp_server.py, with the base URL the service would pass
when the HTTP server is on.

TestHTTPRealClients runs pxeserver.py as a child process on loopback with
--tftp-only --http-port 0 and fetches files with curl and wget, each
checked by SHA-256.  A missing client skips its test, or fails it under
PXESERVER_REQUIRE_PEERS=1.
"""

import errno
import http.client
import ipaddress
import logging
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import support
from support import REPO_ROOT

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pxeserver  # noqa: E402  (needs REPO_ROOT on sys.path)

import test_dhcp_server as harness  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_DISCOVER  # noqa: E402
from test_dhcp_packet import SEABIOS_IPXE_XID  # noqa: E402


# Upper bound on every wait in the in-process tests: a response, server
# start and stop, handler threads finishing.  A passing test waits far
# less.
WAIT_SECONDS = 5
SHUTDOWN_POLL_SECONDS = 0.02
POLL_SECONDS = 0.005

LOOPBACK = "127.0.0.1"
OTHER_LOOPBACK = "127.0.0.2"  # a second client address on loopback

# Head deadline of the server in TestHTTPSlowClients, and the interval at
# which its trickling client sends one byte.
TEST_HEAD_TIMEOUT_SECONDS = 1
TRICKLE_INTERVAL_SECONDS = 0.2

FILE_NAME = "file.bin"
FILE_SIZE = 1000
EMPTY_NAME = "empty.bin"
NESTED_NAME = "sub dir/nested file.bin"
SPARSE_NAME = "sparse.bin"
SPARSE_SIZE = 200 << 20
# Peak memory the test process may gain while it serves SPARSE_NAME to
# itself.  A server that read the whole file into memory would gain
# SPARSE_SIZE; buffers, thread stacks and allocator slack stay far below
# this.
SPARSE_RSS_LIMIT_BYTES = 16 << 20
CLIENT_BUFFER_BYTES = 1 << 20
# Larger than the socket buffers of both ends of a loopback connection,
# which tcp_wmem and tcp_rmem cap (at 4 MiB and 32 MiB on Linux 6.18).
ABORTED_FILE_SIZE = 64 << 20

# Bytes of a file beside the root.  No request may ever return them.
SECRET = b"secret outside the root\n"

MULTIPART_TYPE = "multipart/byteranges"


def file_bytes(size):
    """Return ``size`` bytes in which every 4-byte word is its offset."""
    words = (size + 3) // 4
    return struct.pack(f"!{words}I", *range(0, 4 * words, 4))[:size]


FILE_DATA = file_bytes(FILE_SIZE)


def http_config(root, extra_args=()):
    """Build the configuration the service uses with --http-port 0."""
    args = ["--tftp-only", "--root", root, "--http-port", "0",
            "--http-address", LOOPBACK, *extra_args]
    return pxeserver.build_config(pxeserver.build_parser().parse_args(args))


def read_status_kib(field):
    """Return a field of /proc/self/status, such as VmHWM, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} line in /proc/self/status")


class HTTPServerTestCase(unittest.TestCase):
    """Runs an HTTPBootServer on a fresh root for each test.

    Layout of the temporary folder::

        FOLDER/secret.bin             the outside file (SECRET)
        FOLDER/root-private/secret.bin  a sibling sharing the root's prefix
        FOLDER/root/                  the root served
    """

    def setUp(self):
        self.threads_before = threading.active_count()
        self.folder = os.path.realpath(
            tempfile.mkdtemp(prefix="pxeserver-http-"))
        self.addCleanup(shutil.rmtree, self.folder)
        self.root = os.path.join(self.folder, "root")
        os.mkdir(self.root)
        self.write_file(os.path.join(self.folder, "secret.bin"), SECRET)
        os.mkdir(os.path.join(self.folder, "root-private"))
        self.write_file(os.path.join(self.folder, "root-private",
                                     "secret.bin"), SECRET)
        self.write_file(os.path.join(self.root, FILE_NAME), FILE_DATA)
        self.write_file(os.path.join(self.root, EMPTY_NAME), b"")
        self.quiet_logs()
        self.start_server()

    def write_file(self, path, data):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as stream:
            stream.write(data)

    def quiet_logs(self):
        """Keep the server's log lines off stderr; assertLogs still works."""
        logger = logging.getLogger("pxeserver")
        handler = logging.NullHandler()
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        self.addCleanup(setattr, logger, "propagate", logger.propagate)
        logger.propagate = False

    def start_server(self):
        config = http_config(self.root)
        self.server = pxeserver.HTTPBootServer(config, self.root)
        self.port = self.server.server_address[1]
        self.server_thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="http-server-under-test")
        self.server_thread.start()
        self.addCleanup(self.stop_server)
        self.server_threads = threading.active_count()

    def stop_server(self):
        """Stop the server and check that no handler thread is left."""
        self.server.shutdown()
        self.server_thread.join(WAIT_SECONDS)
        self.server.server_close()
        self.assertFalse(self.server_thread.is_alive(),
                         "server thread did not stop")
        self.wait_for_threads(self.threads_before)

    def wait_for_threads(self, count):
        """Wait until at most ``count`` threads run, or fail."""
        deadline = time.monotonic() + WAIT_SECONDS
        while threading.active_count() > count:
            if time.monotonic() > deadline:
                names = [thread.name for thread in threading.enumerate()]
                self.fail(f"{threading.active_count()} threads still "
                          f"running after {WAIT_SECONDS} s, expected "
                          f"{count}: {names}")
            time.sleep(POLL_SECONDS)

    def wait_for_handlers(self):
        """Wait until every connection's handler thread has ended.

        A handler logs its line after the response is sent, so the
        client can have the whole body before the line exists.
        """
        self.wait_for_threads(self.server_threads)

    def connect(self):
        connection = http.client.HTTPConnection(LOOPBACK, self.port,
                                                timeout=WAIT_SECONDS)
        self.addCleanup(connection.close)
        return connection

    def request(self, method, path, headers=None):
        """Send one request on a new connection; return (response, body)."""
        connection = self.connect()
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        connection.close()
        return response, body

    def get(self, path, **headers):
        return self.request("GET", path, headers)

    def get_range(self, range_header, path=f"/{FILE_NAME}"):
        return self.request("GET", path, {"Range": range_header})


class TestHTTPServer(HTTPServerTestCase):
    """GET and HEAD of whole files."""

    def test_get_returns_whole_file(self):
        response, body = self.get(f"/{FILE_NAME}")
        self.assertEqual(response.status, 200)
        self.assertEqual(body, FILE_DATA)

    def test_get_sends_content_length(self):
        response, _ = self.get(f"/{FILE_NAME}")
        self.assertEqual(response.getheader("Content-Length"),
                         str(FILE_SIZE))

    def test_get_advertises_byte_ranges(self):
        response, _ = self.get(f"/{FILE_NAME}")
        self.assertEqual(response.getheader("Accept-Ranges"), "bytes")

    def test_head_sends_length_without_body(self):
        response, body = self.request("HEAD", f"/{FILE_NAME}")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Length"),
                         str(FILE_SIZE))
        self.assertEqual(body, b"")

    def test_head_leaves_connection_usable(self):
        # A HEAD response that carried a body would be read as the start
        # of the next response on the same connection.
        connection = self.connect()
        connection.request("HEAD", f"/{FILE_NAME}")
        connection.getresponse().read()
        connection.request("GET", f"/{FILE_NAME}")
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.read(), FILE_DATA)

    def test_keep_alive_serves_second_request(self):
        connection = self.connect()
        for _ in range(2):
            connection.request("GET", f"/{FILE_NAME}")
            response = connection.getresponse()
            self.assertEqual(response.status, 200)
            self.assertEqual(response.read(), FILE_DATA)

    def test_empty_file_served_empty(self):
        response, body = self.get(f"/{EMPTY_NAME}")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Length"), "0")
        self.assertEqual(body, b"")

    def test_range_on_empty_file_ignored(self):
        response, body = self.get_range("bytes=0-99", f"/{EMPTY_NAME}")
        self.assertEqual(response.status, 200)
        self.assertEqual(body, b"")

    def test_get_decodes_percent_escapes(self):
        # DHCP replies carry the file name percent-encoded in the URL.
        self.write_file(os.path.join(self.root, NESTED_NAME), FILE_DATA)
        url = pxeserver._http_url("http://x", NESTED_NAME)
        path = url[len("http://x"):]
        response, body = self.get(path)
        self.assertEqual(response.status, 200)
        self.assertEqual(body, FILE_DATA)

    def test_get_ignores_query_string(self):
        response, body = self.get(f"/{FILE_NAME}?arch=x64&n=1")
        self.assertEqual(response.status, 200)
        self.assertEqual(body, FILE_DATA)

    def test_get_matches_name_ignoring_case(self):
        # The same rule as TFTP, for firmware that changes the case.
        response, body = self.get(f"/{FILE_NAME.upper()}")
        self.assertEqual(response.status, 200)
        self.assertEqual(body, FILE_DATA)

    def test_missing_file_gets_404(self):
        response, _ = self.get("/no-such-file.bin")
        self.assertEqual(response.status, 404)

    def test_directory_gets_404_without_listing(self):
        os.mkdir(os.path.join(self.root, "folder"))
        self.write_file(os.path.join(self.root, "folder", "inner.bin"), b"x")
        for path in ("/folder", "/folder/", "/"):
            with self.subTest(path=path):
                response, body = self.get(path)
                self.assertEqual(response.status, 404)
                self.assertNotIn(b"inner.bin", body)

    def test_post_rejected_as_not_implemented(self):
        response, _ = self.request("POST", f"/{FILE_NAME}")
        self.assertEqual(response.status, 501)

    def test_url_over_limit_gets_414(self):
        path = "/" + "a" * pxeserver.HTTP_MAX_URL_CHARS
        response, _ = self.get(path)
        self.assertEqual(response.status, 414)

    def test_url_at_limit_not_414(self):
        path = "/" + "a" * (pxeserver.HTTP_MAX_URL_CHARS - 1)
        response, _ = self.get(path)
        self.assertEqual(response.status, 404)

    def test_fifo_answered_without_hanging(self):
        # Opening a FIFO for reading blocks until a writer appears, so a
        # server that opens it plainly never sends a response.
        fifo = os.path.join(self.root, "pipe")
        os.mkfifo(fifo)
        # Runs before stop_server: a handler stuck in open() is released
        # by a writer that opens and closes the FIFO.
        self.addCleanup(self.release_fifo_reader, fifo)
        try:
            response, _ = self.get("/pipe")
        except socket.timeout:
            self.fail(f"no response to GET of a FIFO within "
                      f"{WAIT_SECONDS} s")
        self.assertEqual(response.status, 404)

    def release_fifo_reader(self, fifo):
        try:
            descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            # ENXIO: no reader has the FIFO open, so nothing is stuck.
            if exc.errno != errno.ENXIO:
                raise
            return
        os.close(descriptor)


class TestHTTPRanges(HTTPServerTestCase):
    """Single byte ranges (RFC 9110 section 14) over a real connection."""

    def assert_partial(self, range_header, start, end):
        response, body = self.get_range(range_header)
        self.assertEqual(response.status, 206)
        self.assertEqual(response.getheader("Content-Range"),
                         f"bytes {start}-{end}/{FILE_SIZE}")
        self.assertEqual(response.getheader("Content-Length"),
                         str(end - start + 1))
        self.assertEqual(body, FILE_DATA[start:end + 1])

    def test_first_bytes_range(self):
        self.assert_partial("bytes=0-99", 0, 99)

    def test_open_ended_range(self):
        self.assert_partial("bytes=100-", 100, FILE_SIZE - 1)

    def test_suffix_range(self):
        self.assert_partial("bytes=-50", FILE_SIZE - 50, FILE_SIZE - 1)

    def test_range_end_past_eof_clamped(self):
        self.assert_partial(f"bytes=900-{FILE_SIZE * 10}", 900,
                            FILE_SIZE - 1)

    def test_last_byte_range(self):
        self.assert_partial(f"bytes={FILE_SIZE - 1}-", FILE_SIZE - 1,
                            FILE_SIZE - 1)

    def test_head_with_range_has_no_body(self):
        response, body = self.request("HEAD", f"/{FILE_NAME}",
                                      {"Range": "bytes=0-99"})
        self.assertEqual(response.status, 206)
        self.assertEqual(response.getheader("Content-Length"), "100")
        self.assertEqual(body, b"")

    def test_unsatisfiable_range_gets_416(self):
        response, body = self.get_range("bytes=999999-")
        self.assertEqual(response.status, 416)
        self.assertEqual(response.getheader("Content-Range"),
                         f"bytes */{FILE_SIZE}")
        self.assertEqual(body, b"")

    def test_range_at_file_size_gets_416(self):
        response, _ = self.get_range(f"bytes={FILE_SIZE}-")
        self.assertEqual(response.status, 416)

    def test_multiple_ranges_get_whole_file(self):
        response, body = self.get_range("bytes=0-9,20-29")
        self.assertEqual(response.status, 200)
        self.assertNotIn(MULTIPART_TYPE,
                         response.getheader("Content-Type", ""))
        self.assertEqual(body, FILE_DATA)

    def test_garbage_ranges_get_whole_file(self):
        for header in ("items=0-9", "bytes=abc", "bytes=9-1", "bytes=x-9",
                       "bytes", "0-9", ""):
            with self.subTest(range=header):
                response, body = self.get_range(header)
                self.assertEqual(response.status, 200)
                self.assertIsNone(response.getheader("Content-Range"))
                self.assertEqual(body, FILE_DATA)


class TestParseByteRange(unittest.TestCase):
    """parse_byte_range for a file of FILE_SIZE bytes."""

    SATISFIABLE = (
        ("bytes=0-99", (0, 99)),
        ("bytes=0-0", (0, 0)),
        ("bytes=100-", (100, FILE_SIZE - 1)),
        ("bytes=-50", (FILE_SIZE - 50, FILE_SIZE - 1)),
        ("bytes=-1", (FILE_SIZE - 1, FILE_SIZE - 1)),
        # A suffix longer than the file selects the whole file.
        (f"bytes=-{FILE_SIZE * 5}", (0, FILE_SIZE - 1)),
        (f"bytes=900-{FILE_SIZE * 5}", (900, FILE_SIZE - 1)),
        (f"bytes={FILE_SIZE - 1}-", (FILE_SIZE - 1, FILE_SIZE - 1)),
        # Range units are case-insensitive (RFC 9110 section 14.1).
        ("BYTES=10-19", (10, 19)),
    )
    IGNORED = (
        "items=0-9",
        "bytes=0-9,20-29",
        "bytes=0-9, 20-29",
        "bytes=abc",
        "bytes=9-1",
        "bytes=x-9",
        "bytes",
        "",
    )
    UNSATISFIABLE = (
        f"bytes={FILE_SIZE}-",
        "bytes=999999-",
        f"bytes={FILE_SIZE}-{FILE_SIZE + 10}",
        # Suffixes are the last N > 0 bytes (RFC 9110 section 14.1.2).
        "bytes=-0",
    )

    def test_satisfiable_ranges(self):
        for header, expected in self.SATISFIABLE:
            with self.subTest(header=header):
                self.assertEqual(
                    pxeserver.parse_byte_range(header, FILE_SIZE), expected)

    def test_ignored_ranges_return_none(self):
        for header in self.IGNORED:
            with self.subTest(header=header):
                self.assertIsNone(
                    pxeserver.parse_byte_range(header, FILE_SIZE))

    def test_unsatisfiable_ranges_raise(self):
        for header in self.UNSATISFIABLE:
            with self.subTest(header=header):
                with self.assertRaises(ValueError):
                    pxeserver.parse_byte_range(header, FILE_SIZE)


class TestHTTPRootConfinement(HTTPServerTestCase):
    """No request form reads a file outside the root."""

    def setUp(self):
        super().setUp()
        # A symlink out of the root to a file, one to a folder, and one
        # into the sibling folder that shares the root's name as prefix.
        os.symlink(os.path.join(self.folder, "secret.bin"),
                   os.path.join(self.root, "link-out.bin"))
        os.symlink(self.folder, os.path.join(self.root, "link-folder"))
        os.symlink("../root-private", os.path.join(self.root, "sibling"))
        # A symlink that stays inside the root must still work.
        os.symlink(FILE_NAME, os.path.join(self.root, "alias.bin"))

    def outside_paths(self):
        absolute_secret = os.path.join(self.folder, "secret.bin")
        return (
            "/../secret.bin",
            "/sub/../../secret.bin",
            "/%2e%2e/secret.bin",
            "/%2E%2E/secret.bin",
            "/..%2fsecret.bin",
            "/..%2Fsecret.bin",
            "/..%5csecret.bin",
            "/..\\secret.bin",
            "/%2e%2e%5csecret.bin",
            # Absolute paths, plain and encoded: the root-relative path
            # they name does not exist.
            absolute_secret,
            "/" + absolute_secret,
            "/%2F" + absolute_secret.lstrip("/").replace("/", "%2F"),
            # An absolute path that starts inside the root, then climbs.
            self.root + "/../secret.bin",
            # An absolute-form request target (RFC 9112 section 3.2.2).
            f"http://{LOOPBACK}:{self.port}/../secret.bin",
            "/link-out.bin",
            "/link-folder/secret.bin",
            "/../root-private/secret.bin",
            "/sibling/secret.bin",
            f"/{FILE_NAME}%00/../../secret.bin",
        )

    def test_outside_paths_rejected(self):
        for path in self.outside_paths():
            with self.subTest(path=path):
                response, body = self.get(path)
                self.assertIn(response.status, (403, 404))
                self.assertNotIn(SECRET, body)

    def test_symlink_inside_root_served(self):
        response, body = self.get("/alias.bin")
        self.assertEqual(response.status, 200)
        self.assertEqual(body, FILE_DATA)

    def test_traversal_logged_as_warning(self):
        with self.assertLogs("pxeserver.http", "INFO") as captured:
            self.get("/../secret.bin")
            self.wait_for_handlers()
        self.assertEqual(len(captured.records), 1)
        record = captured.records[0]
        self.assertEqual(record.levelno, logging.WARNING)
        self.assertIn("rejected: status=403", record.getMessage())


class TestHTTPLogging(HTTPServerTestCase):
    """One log line per request, in the house shape."""

    def logged(self, method, path, headers=None):
        """Send one request and return the records of pxeserver.http."""
        with self.assertLogs("pxeserver.http", "INFO") as captured:
            self.request(method, path, headers)
            self.wait_for_handlers()
        return captured.records

    def test_one_line_per_request(self):
        cases = (
            ("GET", f"/{FILE_NAME}", None),
            ("HEAD", f"/{FILE_NAME}", None),
            ("GET", f"/{FILE_NAME}", {"Range": "bytes=0-99"}),
            ("GET", f"/{FILE_NAME}", {"Range": "bytes=999999-"}),
            ("GET", "/no-such-file.bin", None),
            ("GET", "/../secret.bin", None),
            ("GET", "/" + "a" * pxeserver.HTTP_MAX_URL_CHARS, None),
        )
        for method, path, headers in cases:
            with self.subTest(method=method, path=path[:40],
                              headers=headers):
                records = self.logged(method, path, headers)
                self.assertEqual(len(records), 1,
                                 [record.getMessage() for record in records])

    def test_get_line_has_status_and_bytes(self):
        records = self.logged("GET", f"/{FILE_NAME}")
        self.assertRegex(
            records[0].getMessage(),
            rf"^GET /{FILE_NAME} from {LOOPBACK}:\d+ status=200 "
            rf"bytes={FILE_SIZE} seconds=\d+\.\d+$")

    def test_range_line_counts_range_bytes(self):
        records = self.logged("GET", f"/{FILE_NAME}",
                              {"Range": "bytes=0-99"})
        self.assertIn("status=206 bytes=100 ", records[0].getMessage())

    def test_head_line_counts_no_bytes(self):
        records = self.logged("HEAD", f"/{FILE_NAME}")
        self.assertIn("status=200 bytes=0 ", records[0].getMessage())

    def test_log_escapes_control_characters(self):
        # http.client refuses control characters in a URL, so the request
        # goes out on a raw socket.
        with self.assertLogs("pxeserver.http", "INFO") as captured:
            with socket.create_connection((LOOPBACK, self.port),
                                          WAIT_SECONDS) as sock:
                sock.sendall(b"GET /\x1b[2Jx\x07.bin HTTP/1.1\r\n"
                             b"Host: x\r\nConnection: close\r\n\r\n")
                while sock.recv(65536):
                    pass
            self.wait_for_handlers()
        message = captured.records[0].getMessage()
        self.assertNotIn("\x1b", message)
        self.assertNotIn("\x07", message)

    def test_aborted_download_logged_once(self):
        # The file is larger than the loopback socket buffers, so the
        # server is still sending when the client closes.
        path = os.path.join(self.root, SPARSE_NAME)
        with open(path, "wb") as stream:
            stream.truncate(ABORTED_FILE_SIZE)
        with self.assertLogs("pxeserver.http", "INFO") as captured:
            with socket.create_connection((LOOPBACK, self.port),
                                          WAIT_SECONDS) as sock:
                sock.sendall(f"GET /{SPARSE_NAME} HTTP/1.1\r\nHost: x\r\n"
                             f"\r\n".encode())
                sock.recv(65536)
            self.wait_for_handlers()
        self.assertEqual(len(captured.records), 1,
                         [record.getMessage() for record in captured.records])

    def test_client_reset_not_logged_as_error(self):
        # OVMF's UEFI HTTP Boot (Debian 12) resets its keep-alive
        # connection after the download, which is no server failure.
        with self.assertLogs("pxeserver.http", "INFO") as captured:
            sock = socket.create_connection((LOOPBACK, self.port),
                                            WAIT_SECONDS)
            sock.sendall(f"GET /{FILE_NAME} HTTP/1.1\r\nHost: x\r\n\r\n"
                         .encode())
            received = b""
            while len(received) < FILE_SIZE:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
            # SO_LINGER with a zero timeout makes close() send a RST.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            struct.pack("ii", 1, 0))
            sock.close()
            self.wait_for_handlers()
        errors = [record.getMessage() for record in captured.records
                  if record.levelno >= logging.ERROR]
        self.assertEqual(errors, [])


class TestHTTPSlowClients(HTTPServerTestCase):
    """Clients that hold connections open without finishing a request."""

    def setUp(self):
        patcher = mock.patch.object(pxeserver, "HTTP_HEAD_TIMEOUT_SECONDS",
                                    TEST_HEAD_TIMEOUT_SECONDS)
        patcher.start()
        self.addCleanup(patcher.stop)
        super().setUp()

    def test_trickled_headers_closed_at_deadline(self):
        with self.assertLogs("pxeserver.http", "WARNING") as captured:
            sock = socket.create_connection((LOOPBACK, self.port),
                                            WAIT_SECONDS)
            self.addCleanup(sock.close)
            started = time.monotonic()
            sock.sendall(f"GET /{FILE_NAME} HTTP/1.1\r\n".encode())
            sock.settimeout(TRICKLE_INTERVAL_SECONDS)
            closed_after = None
            while time.monotonic() - started < WAIT_SECONDS:
                try:
                    sock.sendall(b"X")
                    if sock.recv(65536) == b"":
                        closed_after = time.monotonic() - started
                        break
                except socket.timeout:
                    continue
                except OSError:  # reset by the server
                    closed_after = time.monotonic() - started
                    break
            self.wait_for_handlers()
        self.assertIsNotNone(closed_after, "connection still open")
        self.assertGreaterEqual(closed_after, TEST_HEAD_TIMEOUT_SECONDS)
        message = captured.records[0].getMessage()
        self.assertIn("not complete after", message)


class TestHTTPClientLimit(HTTPServerTestCase):
    """Connections from one client address are capped."""

    def test_connections_per_client_capped(self):
        limit = pxeserver.HTTP_MAX_CONNECTIONS_PER_CLIENT
        idle = []
        for _ in range(limit):
            sock = socket.create_connection((LOOPBACK, self.port),
                                            WAIT_SECONDS)
            self.addCleanup(sock.close)
            idle.append(sock)
        self.wait_for_threads_at_least(self.server_threads + limit)
        with self.assertLogs("pxeserver.http", "WARNING") as captured:
            extra = socket.create_connection((LOOPBACK, self.port),
                                             WAIT_SECONDS)
            self.addCleanup(extra.close)
            extra_reply = extra.recv(65536)
        other = http.client.HTTPConnection(
            LOOPBACK, self.port, timeout=WAIT_SECONDS,
            source_address=(OTHER_LOOPBACK, 0))
        self.addCleanup(other.close)
        other.request("GET", f"/{FILE_NAME}")
        response = other.getresponse()
        body = response.read()
        for sock in idle:
            sock.close()
        self.assertEqual(extra_reply, b"")
        self.assertIn("connections open from this address",
                      captured.records[0].getMessage())
        self.assertEqual(response.status, 200)
        self.assertEqual(body, FILE_DATA)

    def wait_for_threads_at_least(self, count):
        """Wait until at least ``count`` threads run, or fail."""
        deadline = time.monotonic() + WAIT_SECONDS
        while threading.active_count() < count:
            if time.monotonic() > deadline:
                self.fail(f"{threading.active_count()} threads after "
                          f"{WAIT_SECONDS} s, expected {count}")
            time.sleep(POLL_SECONDS)


class TestHTTPResources(HTTPServerTestCase):
    """Memory and threads while serving."""

    def test_large_file_not_read_into_memory(self):
        # VmRSS after the transfer would not show a whole-file read whose
        # buffer was already freed, so the test resets the peak resident
        # size (VmHWM) through clear_refs and reads the peak afterwards.
        # The server runs in this process, so its buffers count here.
        path = os.path.join(self.root, SPARSE_NAME)
        with open(path, "wb") as stream:
            stream.truncate(SPARSE_SIZE)
        buffer = bytearray(CLIENT_BUFFER_BYTES)
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError as exc:
            self.skipTest(f"cannot reset the peak RSS through "
                          f"/proc/self/clear_refs: {exc}")
        peak_before = read_status_kib("VmHWM")

        connection = self.connect()
        connection.request("GET", f"/{SPARSE_NAME}")
        response = connection.getresponse()
        received = 0
        while True:
            count = response.readinto(buffer)
            if not count:
                break
            received += count
        connection.close()
        growth = read_status_kib("VmHWM") - peak_before

        self.assertEqual(received, SPARSE_SIZE)
        self.assertLess(growth, SPARSE_RSS_LIMIT_BYTES,
                        f"peak RSS grew by {growth >> 20} MiB while "
                        f"serving {SPARSE_SIZE >> 20} MiB")

    def test_threads_end_after_many_requests(self):
        connections = [self.connect() for _ in range(8)]
        for connection in connections:
            connection.request("GET", f"/{FILE_NAME}")
            connection.getresponse().read()
        for connection in connections:
            connection.close()
        self.wait_for_handlers()
        self.assertEqual(threading.active_count(), self.server_threads)


# ---------------------------------------------------------------------------
# DHCP replies that point at the HTTP server
# ---------------------------------------------------------------------------

HTTP_BASE = f"http://{harness.SERVER_IP}:8080"
HTTP_VENDOR_CLASS = b"HTTPClient:Arch:00016:UNDI:003001"
HTTP_DISCOVER_XID = 0x48545450


def http_client_options():
    """Return options 93 and 60 of a UEFI HTTP Boot client (x64, arch 16)."""
    return {
        pxeserver.OPT_CLIENT_ARCH: struct.pack(
            "!H", pxeserver.ClientArch.EFI_X64_HTTP),
        pxeserver.OPT_VENDOR_CLASS_IDENTIFIER: HTTP_VENDOR_CLASS,
    }


class LoopbackProxyDHCPServer(harness.LoopbackDHCPServer,
                              pxeserver.ProxyDHCPServer):
    """ProxyDHCPServer whose replies can reach loopback only."""


class HTTPBootOfferTestCase(harness.DHCPServerTestCase):
    """Runs a DHCP server of ``server_class`` with or without http_base."""

    server_class = harness.LoopbackDHCPServer
    mode = "full"

    def start_server(self, http_base=HTTP_BASE, extra_args=()):
        args = ["--iface", "lo", "--mode", self.mode, "--root", self.root,
                "--lease-file", self.lease_file,
                "--pool-start", str(harness.POOL_START),
                "--pool-end", str(harness.POOL_END), *extra_args]
        config = pxeserver.build_config(
            pxeserver.build_parser().parse_args(args))
        interface = pxeserver.InterfaceInfo(
            "lo", 1, harness.SERVER_IP, harness.NETWORK, 1500,
            bytes.fromhex("020000000001"))
        self.server = self.server_class(
            config, interface, port=0, client_port=self.client_port,
            broadcast_address=str(harness.SERVER_IP), bind_device=False,
            bind_address=str(harness.SERVER_IP), http_base=http_base)
        self.server_thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": harness.SHUTDOWN_POLL_SECONDS},
            name=f"{self.mode}-dhcp-under-test")
        self.server_thread.start()
        self.addCleanup(self.stop_server)
        self.server_threads = threading.active_count()
        return self.server

    def settle(self):
        """Wait until every packet sent so far has been handled.

        The marker is a PXE DISCOVER, to which proxyDHCP replies too.
        """
        self.send(harness.build_request(
            pxeserver.DHCPMessageType.DHCPDISCOVER, mac=harness.MARKER_MAC,
            xid=harness.MARKER_XID, options=harness.pxe_bios_options()))
        self.receive(harness.MARKER_XID)
        self.wait_for_threads(self.server_threads)

    def ipxe_offer(self):
        return self.exchange(SEABIOS_IPXE_DISCOVER, SEABIOS_IPXE_XID)

    def http_client_offer(self):
        return self.exchange(self.http_client_discover(), HTTP_DISCOVER_XID)

    def http_client_discover(self):
        return harness.build_request(
            pxeserver.DHCPMessageType.DHCPDISCOVER, xid=HTTP_DISCOVER_XID,
            options=http_client_options())

    def assert_boot_file(self, offer, expected):
        self.assertEqual(offer.options.get(pxeserver.OPT_BOOTFILE_NAME),
                         expected.encode())
        self.assertEqual(offer.file.rstrip(b"\0"), expected.encode())


class HTTPBootOfferTests:
    """Tests that both the full-mode and the proxy server must pass.

    A mixin, so that unittest does not run them on the base class.
    """

    def test_ipxe_gets_script_url(self):
        self.start_server()
        offer = self.ipxe_offer()
        self.assert_boot_file(offer, f"{HTTP_BASE}/boot.ipxe")

    def test_http_client_gets_efi_url(self):
        self.start_server()
        offer = self.http_client_offer()
        self.assert_boot_file(offer, f"{HTTP_BASE}/ipxe.efi")

    def test_http_client_offer_says_httpclient(self):
        self.start_server()
        offer = self.http_client_offer()
        self.assertEqual(
            offer.options.get(pxeserver.OPT_VENDOR_CLASS_IDENTIFIER),
            pxeserver.HTTP_VENDOR_CLASS)

    def test_http_url_quotes_file_name(self):
        self.start_server(extra_args=["--efi64-file", "efi x64/ipxe#1.efi"])
        offer = self.http_client_offer()
        self.assert_boot_file(offer, f"{HTTP_BASE}/efi%20x64/ipxe%231.efi")

    def test_ipxe_without_http_gets_script_name(self):
        self.start_server(http_base=None)
        offer = self.ipxe_offer()
        self.assert_boot_file(offer, "boot.ipxe")


class TestHTTPBootOffer(HTTPBootOfferTests, HTTPBootOfferTestCase):
    """The full-mode DHCP server with the HTTP server on and off."""

    def test_offer_to_http_client_has_address(self):
        self.start_server()
        offer = self.http_client_offer()
        self.assertEqual(offer.yiaddr, harness.POOL_START)

    def test_http_client_without_http_gets_no_file(self):
        self.start_server(http_base=None)
        offer = self.http_client_offer()
        self.assertNotIn(pxeserver.OPT_BOOTFILE_NAME, offer.options)
        self.assertEqual(offer.file.rstrip(b"\0"), b"")
        self.assertNotIn(pxeserver.OPT_VENDOR_CLASS_IDENTIFIER,
                         offer.options)


class TestHTTPBootProxyOffer(HTTPBootOfferTests, HTTPBootOfferTestCase):
    """proxyDHCP with the HTTP server on and off."""

    server_class = LoopbackProxyDHCPServer
    mode = "proxy"

    def test_proxy_offer_has_no_address(self):
        self.start_server()
        offer = self.http_client_offer()
        self.assertEqual(offer.yiaddr, ipaddress.IPv4Address(0))

    def test_http_client_without_http_not_answered(self):
        self.start_server(http_base=None)
        self.send(self.http_client_discover())
        self.assert_no_reply(HTTP_DISCOVER_XID)


# ---------------------------------------------------------------------------
# Real HTTP clients against pxeserver.py
# ---------------------------------------------------------------------------

CLIENT_FILE = "client.bin"
CLIENT_FILE_SIZE = 3 * 1024 * 1024 + 12345
# Bytes already downloaded when a resume starts: not a multiple of any
# buffer size, so an off-by-one in the range start shows in the SHA-256.
PARTIAL_BYTES = 1024 * 1024 + 7
CURL_RANGE = (1000, 123456)
_HTTP_ENDPOINT = re.compile(r"\bhttp=(\S+):(\d+)")


class TestHTTPRealClients(unittest.TestCase):
    """curl and wget against pxeserver.py --tftp-only --http-port 0."""

    @classmethod
    def setUpClass(cls):
        support.require_tool(None, "curl")
        cls.folder = tempfile.mkdtemp(prefix="pxeserver-http-clients-")
        cls.root = os.path.join(cls.folder, "root")
        os.mkdir(cls.root)
        cls.source = support.write_random_file(
            os.path.join(cls.root, CLIENT_FILE), CLIENT_FILE_SIZE, seed=80)
        cls.expected_sha256 = support.sha256_file(cls.source)
        with open(cls.source, "rb") as stream:
            cls.source_data = stream.read()
        cls.server = support.PXEServerProcess([
            "--tftp-only", "--root", cls.root, "--tftp-address", LOOPBACK,
            "--tftp-port", "0", "--http-port", "0",
            "--http-address", LOOPBACK,
        ])
        try:
            cls.server.start()
            match = _HTTP_ENDPOINT.search(cls.server.ready_line)
            if match is None:
                raise AssertionError(f"no http=ADDR:PORT in the ready line "
                                     f"{cls.server.ready_line!r}")
        except BaseException:
            cls.server.stop()
            shutil.rmtree(cls.folder)
            raise
        cls.url = f"http://{match.group(1)}:{match.group(2)}/{CLIENT_FILE}"

    @classmethod
    def tearDownClass(cls):
        status = cls.server.stop()
        shutil.rmtree(cls.folder)
        if status != 0:
            raise AssertionError(f"pxeserver exited with status {status} "
                                 f"on SIGTERM; log:\n{cls.server.log_text()}")

    def setUp(self):
        self.outdir = tempfile.mkdtemp(dir=self.folder)
        self.output = os.path.join(self.outdir, CLIENT_FILE)

    def run_client(self, argv, **kwargs):
        result = support.run_command(argv, **kwargs)
        self.assertEqual(result.returncode, 0,
                         f"{argv} failed: {result.stderr}\nserver log:\n"
                         f"{self.server.log_text()}")
        return result

    def curl(self, *args):
        return self.run_client([
            "curl", "--silent", "--show-error", "--fail",
            "--max-time", str(support.WAIT_SECONDS), *args,
            "--output", self.output, self.url])

    def write_partial_output(self):
        with open(self.output, "wb") as stream:
            stream.write(self.source_data[:PARTIAL_BYTES])

    def assert_resumed(self, mark):
        """Check that the server sent a 206 response after log ``mark``."""
        line = self.server.wait_for_log("status=206", since=mark)
        self.assertIn(f"bytes={CLIENT_FILE_SIZE - PARTIAL_BYTES} ", line)

    def test_curl_fetches_whole_file(self):
        self.curl()
        self.assertEqual(support.sha256_file(self.output),
                         self.expected_sha256)

    def test_curl_fetches_byte_range(self):
        start, end = CURL_RANGE
        self.curl("--range", f"{start}-{end}")
        with open(self.output, "rb") as stream:
            self.assertEqual(stream.read(), self.source_data[start:end + 1])

    def test_curl_resumes_partial_file(self):
        self.write_partial_output()
        mark = self.server.log_mark()
        self.curl("--continue-at", "-")
        self.assertEqual(support.sha256_file(self.output),
                         self.expected_sha256)
        self.assert_resumed(mark)

    def test_curl_missing_file_fails_404(self):
        result = support.run_command([
            "curl", "--silent", "--show-error", "--fail",
            "--max-time", str(support.WAIT_SECONDS),
            "--output", self.output, self.url + ".missing"])
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("404", result.stderr)

    def test_wget_resumes_partial_file(self):
        support.require_tool(self, "wget")
        self.write_partial_output()
        mark = self.server.log_mark()
        self.run_client([
            "wget", "--quiet", "--continue", "--tries=1",
            f"--timeout={support.WAIT_SECONDS}", self.url,
        ], cwd=self.outdir)
        self.assertEqual(support.sha256_file(self.output),
                         self.expected_sha256)
        self.assert_resumed(mark)


if __name__ == "__main__":
    unittest.main()
