#!/usr/bin/env python3
"""Benchmark TFTP downloads from pxeserver against tftpd-hpa and atftpd.

Run as root from the repository root::

    python3 tests/benchmarks/bench_tftp.py

Part one fetches a 64 MiB random file from pxeserver and from a C server
in the same run, one fetch each in turn.  It prints the median MB/s (10^6
bytes per second) of each server, the server's CPU time per block counted
in a cgroup, and the ratio of the median MB/s:

- lock-step with blksize 1468, clients curl and atftp, against tftpd-hpa;
- blksize 1468 and windowsize 16 (RFC 7440), client atftp, against atftpd.

Each comparison runs over two links: a veth pair between a server
namespace (192.0.2.1/24) and a client namespace (192.0.2.2/24), and
loopback inside a namespace of its own.  Each link runs with two CPU
placements set by taskset, the same for every server.  In "same", the
client shares the server's vCPU, which measures CPU cost per block.  In
"cross", it runs on the other vCPU and wake-up latency sets the pace, as
on a LAN.  In "free", neither is pinned and the scheduler places them.

Part two starts 200 curl clients at once, each fetching a 4 MiB file from
one pxeserver over the veth link, and prints how many got the right
SHA-256 and the server's peak resident memory (VmHWM).

The script checks the SHA-256 of every fetch, bounds every wait, kills
the processes it started by process group and deletes its namespaces,
also on failure.  tftpd-hpa and atftpd conflict as Debian packages, so
when either is missing the script fetches it with `apt-get download` and
unpacks it with `dpkg -x` into a temporary folder; neither is installed.
`--pxeserver FILE` measures another copy of pxeserver.py, such as one
with a change under test.  Exit status: 0 when every fetch succeeded, 1
when one failed, 2 when the benchmark could not run.
"""

import argparse
import atexit
import collections
import glob
import hashlib
import itertools
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
PXESERVER_PATH = os.path.join(REPO_ROOT, "pxeserver.py")

FILE_BYTES = 64 << 20
BLKSIZE = 1468  # 1468 + 4 (TFTP) + 8 (UDP) + 20 (IPv4) = MTU 1500
WINDOWSIZE = 16
DEFAULT_RUNS = 5
MEGABYTE = 10 ** 6

CONCURRENT_CLIENTS = 200
CONCURRENT_FILE_BYTES = 4 << 20
CONCURRENT_MAX_TRANSFERS = 256
RSS_GOAL_BYTES = 64 * MEGABYTE

# Ratio of pxeserver's median MB/s to the C server's.
RATIO_GOAL = 1.0

SERVER_ADDRESS = "192.0.2.1"
CLIENT_ADDRESS = "192.0.2.2"
PREFIX_LENGTH = 24
LOOPBACK_ADDRESS = "127.0.0.1"

# The namespaces are created by this script, so these ports are free.
PXESERVER_PORT = 69
TFTPD_HPA_PORT = 6969
ATFTPD_PORT = 6970

SERVER_CPU = 0
CLIENT_CPUS = {"same": 0, "cross": 1, "free": None}  # None: not pinned

# Bounds on every wait, far above what a healthy run needs: a 64 MiB
# lock-step fetch took about 7 s on a 2-vCPU VM with the client and the
# server on different vCPUs.
COMMAND_TIMEOUT_SECONDS = 60
STARTUP_TIMEOUT_SECONDS = 15
FETCH_TIMEOUT_SECONDS = 120
CONCURRENT_TIMEOUT_SECONDS = 300
STOP_TIMEOUT_SECONDS = 10
POLL_SECONDS = 0.02

CGROUP_V1_CPUACCT = "/sys/fs/cgroup/cpuacct"
CGROUP_V2_ROOT = "/sys/fs/cgroup"

# Debian packages unpacked when the server is not installed.  Both
# servers link against libwrap.so.0 from libwrap0.
SERVER_PACKAGES = {"in.tftpd": "tftpd-hpa", "atftpd": "atftpd"}
LIBRARY_PACKAGE = "libwrap0"

LARGE_FILE = "large.bin"
SMALL_FILE = "small.bin"


class BenchmarkError(Exception):
    """The benchmark cannot go on; the message states why."""


class FetchError(BenchmarkError):
    """A fetch failed, timed out or wrote the wrong bytes."""


Case = collections.namedtuple("Case", "label client windowsize servers")

CASES = (
    Case("lock-step, curl", "curl", None, ("pxeserver", "tftpd-hpa")),
    Case("lock-step, atftp", "atftp", None, ("pxeserver", "tftpd-hpa")),
    Case(f"windowsize {WINDOWSIZE}, atftp", "atftp", WINDOWSIZE,
         ("pxeserver", "atftpd")),
)

Link = collections.namedtuple("Link", "name server_ns client_ns address")

Sample = collections.namedtuple("Sample", "seconds cpu_seconds")


# ---------------------------------------------------------------------------
# Processes and namespaces
# ---------------------------------------------------------------------------


class Processes:
    """Child processes, each in its own session so its group can be killed.

    `ip netns exec` and `taskset` replace themselves with the command, so
    the PID of each process is that of the command it runs.
    """

    def __init__(self):
        self._running = []

    def start(self, argv, **kwargs):
        process = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self._running.append(process)
        return process

    def forget(self, process):
        """Drop a process that has exited and been reaped."""
        self._running.remove(process)

    def stop(self, process, sig=signal.SIGTERM):
        """Send `sig` to the group, and SIGKILL if it is still running."""
        for current in (sig, signal.SIGKILL):
            if process.poll() is not None:
                break
            try:
                os.killpg(process.pid, current)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                continue
        if process in self._running:
            self._running.remove(process)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    def stop_all(self):
        while self._running:
            self.stop(self._running[-1], signal.SIGKILL)


def run_command(argv, timeout=COMMAND_TIMEOUT_SECONDS):
    """Run argv to completion; raise BenchmarkError if it fails."""
    result = subprocess.run(argv, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        output = result.stdout.decode(errors="replace").strip()
        raise BenchmarkError(f"{' '.join(argv)!r} failed with status "
                             f"{result.returncode}: {output}")
    return result.stdout.decode(errors="replace")


class Namespaces:
    """The network namespaces of one run, named with the script's PID."""

    def __init__(self):
        self.prefix = f"tb{os.getpid()}"
        self._names = []

    def add(self, suffix):
        """Create namespace PREFIX-SUFFIX with loopback up; return its name."""
        name = f"{self.prefix}-{suffix}"
        run_command(["ip", "netns", "add", name])
        self._names.append(name)
        run_command(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def build_veth_link(self):
        """Join a server and a client namespace with one veth pair."""
        server_ns = self.add("srv")
        client_ns = self.add("cli")
        server_end = f"{self.prefix}s"
        client_end = f"{self.prefix}c"
        run_command(["ip", "-n", server_ns, "link", "add", server_end,
                     "type", "veth", "peer", "name", client_end,
                     "netns", client_ns])
        for namespace, device, address in (
                (server_ns, server_end, SERVER_ADDRESS),
                (client_ns, client_end, CLIENT_ADDRESS)):
            run_command(["ip", "-n", namespace, "address", "add",
                         f"{address}/{PREFIX_LENGTH}", "dev", device])
            run_command(["ip", "-n", namespace, "link", "set", device, "up"])
        return Link("veth", server_ns, client_ns, SERVER_ADDRESS)

    def build_loopback_link(self):
        """Create a namespace with only loopback for server and client."""
        namespace = self.add("lo")
        return Link("loopback", namespace, namespace, LOOPBACK_ADDRESS)

    def close(self):
        while self._names:
            subprocess.run(["ip", "netns", "delete", self._names.pop()],
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL,
                           timeout=COMMAND_TIMEOUT_SECONDS)


class CPUCgroup:
    """A cgroup that counts the CPU time of one server and its children.

    tftpd-hpa serves each transfer in a forked child whose CPU time did not
    show in the parent's /proc/PID/stat (tftpd-hpa 5.2), so each server
    runs in a cgroup of its own, which counts every process and thread
    in it.
    """

    def __init__(self, path, version):
        self.path = path
        self.version = version
        self.idle_tasks = None

    def join(self):
        """Move the calling process into the cgroup (run before exec)."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))

    def _tasks(self):
        name = "tasks" if self.version == 1 else "cgroup.threads"
        with open(os.path.join(self.path, name)) as tasks:
            return len(tasks.read().split())

    def mark_idle(self):
        """Remember the thread count of the server waiting for requests."""
        self.idle_tasks = self._tasks()

    def cpu_seconds(self):
        """Wait until the server is idle again; return its CPU seconds.

        The server may still be finishing a transfer (a log line, a
        child's exit) when the client exits.
        """
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while (self._tasks() > self.idle_tasks
               and time.monotonic() < deadline):
            time.sleep(POLL_SECONDS)
        if self.version == 1:
            with open(os.path.join(self.path, "cpuacct.usage")) as usage:
                return int(usage.read()) / 1e9
        with open(os.path.join(self.path, "cpu.stat")) as stat:
            for line in stat:
                key, value = line.split()
                if key == "usage_usec":
                    return int(value) / 1e6
        raise BenchmarkError(f"no usage_usec in {self.path}/cpu.stat")


class Cgroups:
    """The cgroups of one run, under cgroup v1 cpuacct or cgroup v2."""

    def __init__(self):
        self.prefix = f"bench_tftp.{os.getpid()}"
        self._groups = []
        if os.path.exists(os.path.join(CGROUP_V1_CPUACCT, "cpuacct.usage")):
            self.base, self.version = CGROUP_V1_CPUACCT, 1
        elif os.path.exists(os.path.join(CGROUP_V2_ROOT,
                                         "cgroup.controllers")):
            self.base, self.version = CGROUP_V2_ROOT, 2
        else:
            raise BenchmarkError(f"neither {CGROUP_V1_CPUACCT} nor a cgroup "
                                 f"v2 hierarchy at {CGROUP_V2_ROOT} exists; "
                                 f"the benchmark counts CPU time in cgroups")

    def create(self, name):
        path = os.path.join(self.base, f"{self.prefix}.{name}")
        os.mkdir(path)
        self._groups.append(path)
        return CPUCgroup(path, self.version)

    def close(self):
        """Remove the cgroups; call after their processes were killed."""
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while self._groups:
            try:
                os.rmdir(self._groups[-1])
            except FileNotFoundError:
                pass
            except OSError:
                # Killed processes leave the cgroup once they are reaped.
                if time.monotonic() < deadline:
                    time.sleep(POLL_SECONDS)
                    continue
                print(f"bench_tftp: cannot remove cgroup {self._groups[-1]}",
                      file=sys.stderr)
            self._groups.pop()


def in_namespace(namespace, cpu, argv):
    """Return argv wrapped to run in `namespace` pinned to vCPU `cpu`, or
    on any vCPU when `cpu` is None."""
    pin = [] if cpu is None else ["taskset", "--cpu-list", str(cpu)]
    return ["ip", "netns", "exec", namespace, *pin, *argv]


def pin_server(server, cpu):
    """Pin every thread of a running server to vCPU `cpu`, or let them
    run on any vCPU when `cpu` is None.  Processes and threads that the
    server starts later inherit the setting."""
    cpus = set(range(os.cpu_count())) if cpu is None else {cpu}
    for task in os.listdir(f"/proc/{server.pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:
            pass  # a thread that ended meanwhile


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------


class Server:
    """A running TFTP server: its name, process, port, log file and cgroup."""

    def __init__(self, name, process, port, log_path, cgroup):
        self.name = name
        self.process = process
        self.port = port
        self.log_path = log_path
        self.cgroup = cgroup

    @property
    def pid(self):
        return self.process.pid


def unpack_reference_servers(workdir):
    """Return (paths by program, environment) for in.tftpd and atftpd.

    Uses installed programs where there are some; otherwise downloads the
    Debian packages and unpacks them under `workdir`.
    """
    paths = {program: shutil.which(program) for program in SERVER_PACKAGES}
    missing = [SERVER_PACKAGES[program]
               for program, path in paths.items() if path is None]
    environment = dict(os.environ)
    if not missing:
        return paths, environment

    debs = os.path.join(workdir, "debs")
    unpacked = os.path.join(workdir, "unpacked")
    os.makedirs(debs)
    # apt-get downloads as user _apt, which must be able to write the
    # folder; otherwise it warns and downloads as root.
    os.chmod(workdir, 0o755)
    os.chmod(debs, 0o777)
    try:
        subprocess.run(["apt-get", "download", *missing, LIBRARY_PACKAGE],
                       cwd=debs, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, check=True,
                       timeout=COMMAND_TIMEOUT_SECONDS)
    except subprocess.CalledProcessError as exc:
        output = exc.stdout.decode(errors="replace").strip()
        raise BenchmarkError(f"apt-get download {' '.join(missing)} failed: "
                             f"{output}; run apt-get update first") from None
    for deb in sorted(glob.glob(os.path.join(debs, "*.deb"))):
        run_command(["dpkg", "-x", deb, unpacked])
    for program in paths:
        if paths[program] is None:
            paths[program] = os.path.join(unpacked, "usr", "sbin", program)
    library_dirs = glob.glob(os.path.join(unpacked, "usr", "lib", "*-linux-*"))
    environment["LD_LIBRARY_PATH"] = os.pathsep.join(library_dirs)
    return paths, environment


class ServerStarter:
    """Start the three servers in a namespace, pinned to SERVER_CPU."""

    def __init__(self, processes, cgroups, root, logdir, reference_paths,
                 reference_environment, pxeserver_path=PXESERVER_PATH):
        self.processes = processes
        self.cgroups = cgroups
        self.root = root
        self.logdir = logdir
        self.reference_paths = reference_paths
        self.reference_environment = reference_environment
        self.pxeserver_path = pxeserver_path
        self._starts = itertools.count()

    def _start(self, name, namespace, port, argv, environment=None):
        # A new log file for each start, so that a wait for the ready line
        # cannot find the line of an earlier server.
        number = next(self._starts)
        log_path = os.path.join(self.logdir, f"{number}-{name}.log")
        cgroup = self.cgroups.create(f"{number}-{name}")
        with open(log_path, "ab") as log:
            process = self.processes.start(
                in_namespace(namespace, SERVER_CPU, argv),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=environment, preexec_fn=cgroup.join)
        return Server(name, process, port, log_path, cgroup)

    def pxeserver(self, namespace, address, max_transfers=None):
        argv = [sys.executable, self.pxeserver_path, "--tftp-only",
                "--root", self.root, "--tftp-address", address,
                "--tftp-port", str(PXESERVER_PORT)]
        if max_transfers:
            argv += ["--max-transfers", str(max_transfers)]
        server = self._start("pxeserver", namespace, PXESERVER_PORT, argv)
        wait_for_log_text(server, "ready: mode=")
        server.cgroup.mark_idle()
        return server

    def tftpd_hpa(self, namespace, address):
        # --secure serves the folder as /.  --user root keeps it running
        # as root, like the other two servers here, instead of "nobody".
        #
        # In a namespace with only loopback, in.tftpd 5.2 fails to resolve
        # "127.0.0.1" and exits with status 66, so it listens on the
        # wildcard address there, which reaches loopback only.
        host = "" if address == LOOPBACK_ADDRESS else address
        argv = [self.reference_paths["in.tftpd"], "--foreground",
                "--secure", "--user", "root",
                "--address", f"{host}:{TFTPD_HPA_PORT}", self.root]
        server = self._start("tftpd-hpa", namespace, TFTPD_HPA_PORT, argv,
                             self.reference_environment)
        wait_for_udp_port(server, namespace, host or "0.0.0.0")
        server.cgroup.mark_idle()
        return server

    def atftpd(self, namespace, address):
        log_path = os.path.join(self.logdir,
                                f"atftpd-transfers-{namespace}.log")
        argv = [self.reference_paths["atftpd"], "--daemon", "--no-fork",
                "--port", str(ATFTPD_PORT), "--bind-address", address,
                "--user", "root", "--group", "root",
                "--logfile", log_path, self.root]
        server = self._start("atftpd", namespace, ATFTPD_PORT, argv,
                             self.reference_environment)
        wait_for_udp_port(server, namespace, address)
        server.cgroup.mark_idle()
        return server


def _check_alive(server):
    if server.process.poll() is not None:
        raise BenchmarkError(
            f"{server.name} exited with status {server.process.returncode} "
            f"at start-up; last log lines:\n{tail(server.log_path)}")


def wait_for_log_text(server, text):
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        _check_alive(server)
        with open(server.log_path, errors="replace") as log:
            if text in log.read():
                return
        time.sleep(POLL_SECONDS)
    raise BenchmarkError(f"{server.name} did not log {text!r} within "
                         f"{STARTUP_TIMEOUT_SECONDS} s")


def wait_for_udp_port(server, namespace, address):
    endpoint = f"{address}:{server.port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        _check_alive(server)
        sockets = run_command(["ip", "netns", "exec", namespace,
                               "ss", "--udp", "--listening", "--numeric",
                               "--no-header"])
        if endpoint in sockets.split():
            return
        time.sleep(POLL_SECONDS)
    raise BenchmarkError(f"{server.name} did not bind {endpoint} within "
                         f"{STARTUP_TIMEOUT_SECONDS} s")


def tail(path, lines=10):
    try:
        with open(path, errors="replace") as log:
            return "".join(log.readlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"


def peak_rss_bytes(pid):
    """Return VmHWM, the peak resident set size, of `pid` in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise BenchmarkError(f"no VmHWM line in /proc/{pid}/status")


# ---------------------------------------------------------------------------
# Clients and fetches
# ---------------------------------------------------------------------------


def client_argv(client, address, port, name, output, windowsize=None):
    if client == "curl":
        return ["curl", "--silent", "--show-error",
                "--max-time", str(FETCH_TIMEOUT_SECONDS),
                "--tftp-blksize", str(BLKSIZE), "--output", output,
                f"tftp://{address}:{port}/{name}"]
    argv = ["atftp", "--get", "--remote-file", name, "--local-file", output,
            "--option", f"blksize {BLKSIZE}"]
    if windowsize:
        argv += ["--option", f"windowsize {windowsize}"]
    return argv + [address, str(port)]


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for chunk in iter(lambda: data.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_random_file(path, size):
    """Write `size` random bytes to `path`; return their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as output:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 1 << 20))
            output.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
    os.chmod(path, 0o644)
    return digest.hexdigest()


class Fetcher:
    """Run one client fetch and check what it wrote."""

    def __init__(self, processes, outdir):
        self.processes = processes
        self.outdir = outdir

    def fetch(self, link, client_cpu, case, server, name, expected_sha256):
        """Fetch `name` from `server`; return a Sample, or raise on failure.

        The time runs from the start of the client process to its exit, so
        it includes the client's start-up (a few ms, printed once).
        """
        output = os.path.join(self.outdir, "fetch.bin")
        argv = in_namespace(link.client_ns, client_cpu, client_argv(
            case.client, link.address, server.port, name, output,
            case.windowsize))
        cpu_before = server.cgroup.cpu_seconds()
        started = time.perf_counter()
        process = self.processes.start(argv, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)
        try:
            text, _ = process.communicate(timeout=FETCH_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.processes.stop(process, signal.SIGKILL)
            raise FetchError(f"{case.client} fetch from {server.name} "
                             f"timed out after {FETCH_TIMEOUT_SECONDS} s"
                             ) from None
        seconds = time.perf_counter() - started
        self.processes.forget(process)
        cpu = server.cgroup.cpu_seconds() - cpu_before
        try:
            if process.returncode != 0:
                raise FetchError(
                    f"{case.client} fetch from {server.name} exited with "
                    f"status {process.returncode}: "
                    f"{text.decode(errors='replace').strip()}")
            if sha256_of(output) != expected_sha256:
                raise FetchError(f"{case.client} fetch from "
                                 f"{server.name}: wrong SHA-256")
        finally:
            if os.path.exists(output):
                os.unlink(output)
        return Sample(seconds, cpu)


def client_startup_seconds(processes, link, client_cpu, client):
    """Return the median time to start a client that does nothing."""
    version_flag = "--version" if client == "curl" else "-V"
    argv = in_namespace(link.client_ns, client_cpu, [client, version_flag])
    times = []
    for _ in range(5):
        started = time.perf_counter()
        process = processes.start(argv, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        process.wait(timeout=COMMAND_TIMEOUT_SECONDS)
        processes.forget(process)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ---------------------------------------------------------------------------
# Part one: throughput
# ---------------------------------------------------------------------------


def run_throughput(processes, starter, fetcher, link, placements, runs,
                   expected_sha256):
    """Fetch LARGE_FILE from each server in every case and placement.

    Returns a dict from (placement, case, server name) to Samples.
    """
    servers = {
        "pxeserver": starter.pxeserver(link.server_ns, link.address),
        "tftpd-hpa": starter.tftpd_hpa(link.server_ns, link.address),
        "atftpd": starter.atftpd(link.server_ns, link.address),
    }
    samples = collections.defaultdict(list)
    try:
        for placement in placements:
            client_cpu = CLIENT_CPUS[placement]
            server_cpu = SERVER_CPU if client_cpu is not None else None
            for server in servers.values():
                pin_server(server, server_cpu)
            for run in range(runs):
                for case in CASES:
                    # Alternate which server goes first, so a drift in
                    # machine speed does not favour one of them.
                    order = case.servers if run % 2 == 0 else \
                        tuple(reversed(case.servers))
                    for name in order:
                        sample = fetcher.fetch(link, client_cpu, case,
                                               servers[name], LARGE_FILE,
                                               expected_sha256)
                        samples[placement, case, name].append(sample)
                        print(f"  {link.name} {placement} run {run + 1}: "
                              f"{case.label}, {name}: "
                              f"{FILE_BYTES / sample.seconds / MEGABYTE:.1f}"
                              f" MB/s", flush=True)
    finally:
        for server in servers.values():
            processes.stop(server.process)
    return samples


def blocks_per_file():
    # The last block is short; a file that is a multiple of BLKSIZE ends
    # with an empty block.
    return FILE_BYTES // BLKSIZE + 1


def print_throughput(link, placement, runs, samples):
    client_cpu = CLIENT_CPUS[placement]
    if client_cpu is None:
        where = "server and client on any vCPU (free)"
    else:
        where = (f"server on vCPU {SERVER_CPU}, client on vCPU "
                 f"{client_cpu} ({placement} vCPU)")
    print(f"\n{link.name}, {where}, median of {runs} fetches of "
          f"{FILE_BYTES >> 20} MiB")
    print(f"  {'case':<22} {'server':<10} {'MB/s':>7} {'seconds':>8} "
          f"{'server CPU us/block':>20}")
    ratios = []
    for case in CASES:
        rates = {}
        for name in case.servers:
            runs_of_server = samples[placement, case, name]
            seconds = statistics.median(s.seconds for s in runs_of_server)
            cpu = statistics.median(s.cpu_seconds for s in runs_of_server)
            rates[name] = statistics.median(
                FILE_BYTES / s.seconds / MEGABYTE for s in runs_of_server)
            print(f"  {case.label:<22} {name:<10} {rates[name]:>7.1f} "
                  f"{seconds:>8.2f} {cpu / blocks_per_file() * 1e6:>20.1f}")
        reference = case.servers[1]
        ratio = rates["pxeserver"] / rates[reference]
        verdict = "met" if ratio >= RATIO_GOAL else "MISSED"
        print(f"  {'':<22} pxeserver / {reference}: {ratio:.2f}x "
              f"(goal >= {RATIO_GOAL:.1f}x: {verdict})")
        ratios.append((link.name, placement, case.label, reference, ratio))
    return ratios


# ---------------------------------------------------------------------------
# Part two: many clients at once
# ---------------------------------------------------------------------------


def start_waiting_clients(processes, link, count, outdir, logdir):
    """Start `count` curl clients that wait for a line on stdin.

    Returns the processes once every one has printed "ready", so one write
    to each stdin starts all fetches within a few milliseconds.
    """
    clients = []
    for number in range(count):
        argv = client_argv("curl", link.address, PXESERVER_PORT, SMALL_FILE,
                           os.path.join(outdir, f"client{number}.bin"))
        argv[argv.index("--max-time") + 1] = str(CONCURRENT_TIMEOUT_SECONDS)
        wrapper = ["sh", "-c", 'echo ready; read line; exec "$@"', "sh",
                   *argv]
        with open(os.path.join(logdir, f"client{number}.log"), "wb") as log:
            clients.append(processes.start(
                in_namespace(link.client_ns, CLIENT_CPUS["cross"], wrapper),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log))
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    for client in clients:
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([client.stdout], [], [],
                                       max(0.0, remaining))
        if not readable or client.stdout.readline() != b"ready\n":
            raise BenchmarkError(f"{count} clients did not start within "
                                 f"{STARTUP_TIMEOUT_SECONDS} s")
    return clients


def wait_for_clients(processes, clients):
    """Wait for every client to exit; return the seconds taken."""
    started = time.perf_counter()
    for client in clients:
        client.stdin.write(b"go\n")
        client.stdin.close()
    deadline = time.monotonic() + CONCURRENT_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if all(client.poll() is not None for client in clients):
            break
        time.sleep(POLL_SECONDS)
    seconds = time.perf_counter() - started
    for client in clients:
        processes.stop(client, signal.SIGKILL)
    return seconds


def run_concurrent(processes, starter, link, count, outdir, logdir,
                   expected_sha256):
    server = starter.pxeserver(link.server_ns, link.address,
                               max_transfers=CONCURRENT_MAX_TRANSFERS)
    try:
        idle_rss = peak_rss_bytes(server.pid)
        clients = start_waiting_clients(processes, link, count, outdir,
                                        logdir)
        seconds = wait_for_clients(processes, clients)
        peak_rss = peak_rss_bytes(server.pid)
    finally:
        processes.stop(server.process)
    good = 0
    for number, client in enumerate(clients):
        path = os.path.join(outdir, f"client{number}.bin")
        if not os.path.exists(path):
            continue
        if client.returncode == 0 and sha256_of(path) == expected_sha256:
            good += 1
        os.unlink(path)

    verdict = "met" if peak_rss < RSS_GOAL_BYTES else "MISSED"
    print(f"\n{count} curl clients at once, {CONCURRENT_FILE_BYTES >> 20} "
          f"MiB each, blksize {BLKSIZE}, veth, server on vCPU {SERVER_CPU}, "
          f"clients on vCPU {CLIENT_CPUS['cross']}")
    print(f"  right SHA-256: {good} of {count}")
    print(f"  all done in {seconds:.1f} s, "
          f"{good * CONCURRENT_FILE_BYTES / seconds / MEGABYTE:.1f} MB/s "
          f"in total")
    print(f"  pxeserver VmHWM: {idle_rss / MEGABYTE:.1f} MB idle, "
          f"{peak_rss / MEGABYTE:.1f} MB peak (goal < "
          f"{RSS_GOAL_BYTES / MEGABYTE:.0f} MB: {verdict})")
    return good == count


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _count(low):
    def parse(text):
        try:
            number = int(text)
        except ValueError:
            number = low - 1
        if number < low:
            raise argparse.ArgumentTypeError(
                f"invalid count {text!r}; use a whole number of at least "
                f"{low}")
        return number
    return parse


def _names(choices):
    def parse(text):
        names = text.split(",")
        for name in names:
            if name not in choices:
                raise argparse.ArgumentTypeError(
                    f"invalid name {name!r}; use one or more of "
                    f"{', '.join(choices)}, separated by commas")
        return names
    return parse


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=_count(1), default=DEFAULT_RUNS,
                        help="fetches per server and case (default: "
                             "%(default)s)")
    parser.add_argument("--links", type=_names(("veth", "loopback")),
                        default=["veth", "loopback"],
                        help="links to measure: veth, loopback or both "
                             "(default: both)")
    parser.add_argument("--placements", type=_names(tuple(CLIENT_CPUS)),
                        default=list(CLIENT_CPUS),
                        help="vCPU placements: same, cross, free, or "
                             "several separated by commas (default: all)")
    parser.add_argument("--clients", type=_count(0),
                        default=CONCURRENT_CLIENTS,
                        help="clients in part two, 0 to skip it (default: "
                             "%(default)s)")
    parser.add_argument("--no-throughput", action="store_true",
                        help="skip part one")
    parser.add_argument("--pxeserver", metavar="FILE",
                        default=PXESERVER_PATH,
                        help="pxeserver.py to measure, for example a copy "
                             "with a change (default: the one in this "
                             "repository)")
    return parser


def check_machine():
    if os.geteuid() != 0:
        raise BenchmarkError("network namespaces need root; run as root")
    if os.cpu_count() < 2:
        raise BenchmarkError("the cross-vCPU placement needs 2 vCPUs")
    for tool in ("ip", "taskset", "ss", "curl", "atftp"):
        if shutil.which(tool) is None:
            raise BenchmarkError(f"{tool} not found; install it (Debian: "
                                 f"iproute2, util-linux, curl, atftp)")


def describe_machine():
    with open("/proc/cpuinfo") as cpuinfo:
        models = [line.split(":", 1)[1].strip() for line in cpuinfo
                  if line.startswith("model name")]
    return (f"{os.cpu_count()} vCPU ({models[0] if models else 'unknown'}), "
            f"Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def describe_file(path):
    """Return `path` with the start of its SHA-256 and the git commit.

    The commit alone does not identify a file with uncommitted changes.
    """
    text = f"{path} (sha256 {sha256_of(path)[:12]}"
    try:
        result = subprocess.run(
            ["git", "-C", os.path.dirname(path), "log", "-1",
             "--format=%h %cd", "--date=short"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            timeout=COMMAND_TIMEOUT_SECONDS)
    except FileNotFoundError:
        result = None
    if result is not None and result.returncode == 0:
        text += f", git HEAD {result.stdout.decode().strip()}"
    return text + ")"


def load_average():
    """Return the 1, 5 and 15 minute load averages as text.

    Other work on the machine skews the figures.  A load near 0 at start
    and end shows that the run had the machine to itself.
    """
    with open("/proc/loadavg") as loadavg:
        return " ".join(loadavg.read().split()[:3])


def main(argv=None):
    args = build_parser().parse_args(argv)
    processes = Processes()
    namespaces = Namespaces()
    cgroups = None
    workdir = tempfile.mkdtemp(prefix="bench_tftp.")
    # tmpfs keeps client writes out of the timings where it exists.
    outdir = tempfile.mkdtemp(prefix="bench_tftp.",
                              dir="/dev/shm" if os.path.isdir("/dev/shm")
                              else None)

    def clean_up():
        processes.stop_all()
        namespaces.close()
        if cgroups is not None:
            cgroups.close()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(outdir, ignore_errors=True)

    atexit.register(clean_up)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(2))
    try:
        check_machine()
        cgroups = Cgroups()
        return run(args, processes, namespaces, cgroups, workdir, outdir)
    except BenchmarkError as exc:
        print(f"bench_tftp: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, FetchError) else 2
    finally:
        clean_up()


def run(args, processes, namespaces, cgroups, workdir, outdir):
    if not os.path.isfile(args.pxeserver):
        raise BenchmarkError(f"--pxeserver {args.pxeserver}: file not found")
    root = os.path.join(workdir, "root")
    logdir = os.path.join(workdir, "logs")
    os.makedirs(root)
    os.makedirs(logdir)
    os.chmod(root, 0o755)
    large_sha256 = write_random_file(os.path.join(root, LARGE_FILE),
                                     FILE_BYTES)
    small_sha256 = write_random_file(os.path.join(root, SMALL_FILE),
                                     CONCURRENT_FILE_BYTES)
    paths, environment = unpack_reference_servers(workdir)
    starter = ServerStarter(processes, cgroups, root, logdir, paths,
                            environment, os.path.abspath(args.pxeserver))
    fetcher = Fetcher(processes, outdir)

    print(f"machine: {describe_machine()}")
    print(f"pxeserver: {describe_file(os.path.abspath(args.pxeserver))}")
    print(f"load average at start: {load_average()}")
    links = {}
    if "veth" in args.links or args.clients:
        links["veth"] = namespaces.build_veth_link()
    if "loopback" in args.links:
        links["loopback"] = namespaces.build_loopback_link()
    some_link = next(iter(links.values()))
    for client in ("curl", "atftp"):
        startup = client_startup_seconds(processes, some_link,
                                         CLIENT_CPUS["same"], client)
        print(f"start-up of {client} through ip netns exec and taskset: "
              f"{startup * 1e3:.1f} ms, included in each fetch time")

    ratios = []
    if not args.no_throughput:
        for name in args.links:
            samples = run_throughput(processes, starter, fetcher,
                                     links[name], args.placements, args.runs,
                                     large_sha256)
            for placement in args.placements:
                ratios += print_throughput(links[name], placement,
                                           args.runs, samples)
        print("\nratios, pxeserver / C server (goal >= "
              f"{RATIO_GOAL:.1f}x):")
        for link_name, placement, label, reference, ratio in ratios:
            print(f"  {link_name:<9} {placement:<6} {label:<22} "
                  f"vs {reference:<10} {ratio:.2f}x")

    all_good = True
    if args.clients:
        all_good = run_concurrent(processes, starter, links["veth"],
                                  args.clients, outdir, logdir, small_sha256)
    print(f"\nload average at end: {load_average()}")
    return 0 if all_good else 1


if __name__ == "__main__":
    sys.exit(main())
