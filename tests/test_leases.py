"""Tests of LeaseStore: address choice, lease life cycle and the lease file.

The store gets a fake clock, so expiry, offer holds and quarantine are
tested without waiting.  No sockets; each test writes its lease file in a
temporary folder of its own.
"""

import ipaddress
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import unittest

from support import REPO_ROOT

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pxeserver  # noqa: E402  (needs REPO_ROOT on sys.path)


NETWORK = ipaddress.IPv4Network("192.0.2.0/24")
SERVER_ADDRESS = ipaddress.IPv4Address("192.0.2.1")
POOL_START = ipaddress.IPv4Address("192.0.2.50")
POOL_END = ipaddress.IPv4Address("192.0.2.59")
LEASE_SECONDS = 600
START_TIME = 1700000000.0
MAC_A = "52:54:00:00:00:0a"
MAC_B = "52:54:00:00:00:0b"
MAC_C = "52:54:00:00:00:0c"
# Bound on joining the threads of the concurrent-commit test.
WAIT_SECONDS = 10


def address(last_octet):
    return ipaddress.IPv4Address(f"192.0.2.{last_octet}")


class FakeClock:
    """A clock for LeaseStore that moves only when a test advances it."""

    def __init__(self, now=START_TIME):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class LeaseStoreTestCase(unittest.TestCase):
    """Creates stores on a lease file in a fresh temporary folder."""

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="pxeserver-leases-")
        self.addCleanup(shutil.rmtree, self.folder)
        self.path = os.path.join(self.folder, "leases.json")
        self.clock = FakeClock()

    def make_store(self, pool_start=POOL_START, pool_end=POOL_END,
                   reservations=None, load=True):
        store = pxeserver.LeaseStore(
            self.path, NETWORK, pool_start, pool_end, SERVER_ADDRESS,
            reservations or {}, LEASE_SECONDS, clock=self.clock)
        if load:
            with self.assertLogs("pxeserver.dhcp", "INFO"):
                store.load()
        return store

    def bind(self, store, mac, leased_address):
        """Lease ``leased_address`` to ``mac`` through offer and request."""
        self.assertEqual(store.offer(mac, leased_address), leased_address)
        result = store.request(mac, leased_address)
        self.assertEqual(result.verdict, "ack")


class TestLeaseOffers(LeaseStoreTestCase):

    def test_first_offer_is_pool_start(self):
        store = self.make_store()
        self.assertEqual(store.offer(MAC_A), POOL_START)

    def test_offer_prefers_reservation(self):
        reservations = {pxeserver.parse_mac(MAC_A): pxeserver.Reservation(
            pxeserver.parse_mac(MAC_A), address=address(57))}
        store = self.make_store(reservations=reservations)
        self.assertEqual(store.offer(MAC_A, address(53)), address(57))

    def test_reserved_address_outside_pool_offered(self):
        reservations = {pxeserver.parse_mac(MAC_A): pxeserver.Reservation(
            pxeserver.parse_mac(MAC_A), address=address(200))}
        store = self.make_store(reservations=reservations)
        self.assertEqual(store.offer(MAC_A), address(200))

    def test_reserved_address_not_offered_to_others(self):
        reservations = {pxeserver.parse_mac(MAC_A): pxeserver.Reservation(
            pxeserver.parse_mac(MAC_A), address=POOL_START)}
        store = self.make_store(reservations=reservations)
        self.assertNotEqual(store.offer(MAC_B, POOL_START), POOL_START)

    def test_offer_prefers_current_lease(self):
        store = self.make_store()
        self.bind(store, MAC_A, address(53))
        self.assertEqual(store.offer(MAC_A, address(57)), address(53))

    def test_offer_takes_free_requested_address(self):
        store = self.make_store()
        self.assertEqual(store.offer(MAC_A, address(57)), address(57))

    def test_offer_skips_requested_address_in_use(self):
        store = self.make_store()
        self.bind(store, MAC_A, address(57))
        self.assertEqual(store.offer(MAC_B, address(57)), POOL_START)

    def test_offer_skips_requested_address_outside_pool(self):
        store = self.make_store()
        self.assertEqual(store.offer(MAC_A, address(100)), POOL_START)

    def test_offer_takes_next_free_address(self):
        store = self.make_store()
        self.bind(store, MAC_A, POOL_START)
        self.assertEqual(store.offer(MAC_B), address(51))

    def test_server_address_never_offered(self):
        store = self.make_store(pool_start=address(1), pool_end=address(3))
        offers = [store.offer(mac, SERVER_ADDRESS)
                  for mac in (MAC_A, MAC_B, MAC_C)]
        self.assertEqual(offers, [address(2), address(3), None])

    def test_server_address_not_leased_on_request(self):
        store = self.make_store(pool_start=address(1), pool_end=address(3))
        result = store.request(MAC_A, SERVER_ADDRESS)
        self.assertEqual(result.verdict, "nak")

    def test_exhausted_pool_offers_none(self):
        store = self.make_store(pool_end=address(51))
        self.bind(store, MAC_A, address(50))
        self.bind(store, MAC_B, address(51))
        self.assertIsNone(store.offer(MAC_C))

    def test_full_pool_takes_over_oldest_offer(self):
        store = self.make_store(pool_end=address(51))
        self.assertEqual(store.offer(MAC_A), address(50))
        self.clock.advance(1)
        self.assertEqual(store.offer(MAC_B), address(51))
        self.clock.advance(pxeserver.OFFER_TAKEOVER_SECONDS)
        self.assertEqual(store.offer(MAC_C), address(50))

    def test_recent_offer_not_taken_over(self):
        store = self.make_store(pool_end=address(51))
        store.offer(MAC_A)
        store.offer(MAC_B)
        self.clock.advance(pxeserver.OFFER_TAKEOVER_SECONDS - 1)
        self.assertIsNone(store.offer(MAC_C))

    def test_taken_over_offer_gets_nak(self):
        store = self.make_store(pool_end=address(51))
        store.offer(MAC_A)
        self.clock.advance(1)
        store.offer(MAC_B)
        self.clock.advance(pxeserver.OFFER_TAKEOVER_SECONDS)
        store.offer(MAC_C)
        self.assertEqual(store.request(MAC_A, address(50)).verdict,
                         "nak")
        self.assertEqual(store.request(MAC_C, address(50)).verdict,
                         "ack")

    def test_leased_address_never_taken_over(self):
        store = self.make_store(pool_end=address(51))
        self.bind(store, MAC_A, address(50))
        store.offer(MAC_B)
        self.clock.advance(pxeserver.OFFER_TAKEOVER_SECONDS)
        self.assertEqual(store.offer(MAC_C), address(51))
        self.assertEqual(store.lease_for(MAC_A).address, address(50))

    def test_expired_lease_reclaimed(self):
        store = self.make_store(pool_end=address(51))
        self.bind(store, MAC_A, address(50))
        self.clock.advance(10)
        self.bind(store, MAC_B, address(51))
        self.clock.advance(LEASE_SECONDS + 10)
        # Both leases expired; the one that expired first is taken.
        self.assertEqual(store.offer(MAC_C), address(50))
        self.assertEqual(store.request(MAC_C, address(50)).verdict,
                         "ack")
        self.assertIsNone(store.lease_for(MAC_A))

    def test_repeated_offer_keeps_address(self):
        # Firmware retransmits DHCPDISCOVER; each must not take an address.
        store = self.make_store()
        first = store.offer(MAC_A)
        self.assertEqual(store.offer(MAC_A), first)

    def test_offer_hold_blocks_other_clients(self):
        store = self.make_store(pool_end=POOL_START)
        self.assertEqual(store.offer(MAC_A), POOL_START)
        self.assertIsNone(store.offer(MAC_B))

    def test_offer_hold_ends_after_timeout(self):
        store = self.make_store(pool_end=POOL_START)
        store.offer(MAC_A)
        self.clock.advance(pxeserver.OFFER_HOLD_SECONDS + 1)
        self.assertEqual(store.offer(MAC_B), POOL_START)

    def test_cancelled_offer_frees_address(self):
        store = self.make_store(pool_end=POOL_START)
        store.offer(MAC_A)
        store.cancel_offer(MAC_A)
        self.assertEqual(store.offer(MAC_B), POOL_START)


class TestLeaseLifeCycle(LeaseStoreTestCase):

    def test_request_binds_lease(self):
        store = self.make_store()
        self.bind(store, MAC_A, address(52))
        lease = store.lease_for(MAC_A)
        self.assertEqual(lease.address, address(52))
        self.assertEqual(lease.expires, START_TIME + LEASE_SECONDS)

    def test_request_for_leased_address_naks(self):
        store = self.make_store()
        self.bind(store, MAC_A, address(52))
        result = store.request(MAC_B, address(52))
        self.assertEqual(result.verdict, "nak")
        self.assertIn("in use", result.reason)

    def test_request_off_reservation_naks(self):
        reservations = {pxeserver.parse_mac(MAC_A): pxeserver.Reservation(
            pxeserver.parse_mac(MAC_A), address=address(57))}
        store = self.make_store(reservations=reservations)
        result = store.request(MAC_A, address(52))
        self.assertEqual(result.verdict, "nak")
        self.assertIn("reserved", result.reason)

    def test_release_keeps_address_for_client(self):
        store = self.make_store()
        self.bind(store, MAC_A, POOL_START)
        self.assertTrue(store.release(MAC_A, POOL_START))
        self.assertLessEqual(store.lease_for(MAC_A).expires, self.clock.now)
        self.assertEqual(store.offer(MAC_B), address(51))
        self.assertEqual(store.offer(MAC_A), POOL_START)

    def test_release_of_other_address_ignored(self):
        store = self.make_store()
        self.bind(store, MAC_A, POOL_START)
        self.assertFalse(store.release(MAC_A, address(51)))
        self.assertGreater(store.lease_for(MAC_A).expires, self.clock.now)

    def test_decline_quarantines_address(self):
        store = self.make_store(pool_end=POOL_START)
        self.bind(store, MAC_A, POOL_START)
        self.assertTrue(store.decline(MAC_A, POOL_START))
        self.assertIsNone(store.offer(MAC_A))
        self.assertIsNone(store.offer(MAC_B))

    def test_decline_quarantine_ends(self):
        store = self.make_store(pool_end=POOL_START)
        self.bind(store, MAC_A, POOL_START)
        store.decline(MAC_A, POOL_START)
        self.clock.advance(pxeserver.DECLINE_QUARANTINE_SECONDS + 1)
        self.assertEqual(store.offer(MAC_B), POOL_START)

    def test_decline_without_lease_ignored(self):
        store = self.make_store(pool_end=POOL_START)
        self.assertFalse(store.decline(MAC_A, POOL_START))
        self.assertEqual(store.offer(MAC_B), POOL_START)


class TestLeaseFile(LeaseStoreTestCase):

    def write_lease_file(self, text):
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.write(text)

    def test_missing_file_starts_empty(self):
        store = self.make_store(load=False)
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            store.load()
        self.assertEqual(store.leases(), [])
        self.assertIn("not found", logs.output[0])

    def test_leases_survive_reload(self):
        store = self.make_store()
        self.assertEqual(store.offer(MAC_A), POOL_START)
        store.request(MAC_A, POOL_START, hostname="node1")
        self.assertTrue(store.commit())
        reloaded = self.make_store()
        self.assertEqual(
            reloaded.lease_for(MAC_A),
            pxeserver.Lease(MAC_A, POOL_START, START_TIME + LEASE_SECONDS,
                            "node1"))

    def test_damaged_file_moved_aside(self):
        self.write_lease_file("{not json")
        store = self.make_store(load=False)
        with self.assertLogs("pxeserver.dhcp", "WARNING") as logs:
            store.load()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(START_TIME))
        damaged = f"{self.path}.damaged-{stamp}"
        self.assertIn("damaged", logs.output[0])
        self.assertIn(damaged, logs.output[0])
        self.assertTrue(os.path.exists(damaged))
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(store.leases(), [])

    def test_store_works_after_damaged_file(self):
        self.write_lease_file(json.dumps({"format": "other", "leases": []}))
        store = self.make_store(load=False)
        with self.assertLogs("pxeserver.dhcp", "WARNING"):
            store.load()
        self.bind(store, MAC_A, POOL_START)
        self.assertTrue(store.commit())
        self.assertEqual(self.make_store().lease_for(MAC_A).address,
                         POOL_START)

    def test_lease_outside_new_pool_dropped(self):
        store = self.make_store()
        self.bind(store, MAC_A, address(50))
        self.bind(store, MAC_B, address(58))
        self.assertTrue(store.commit())
        smaller = self.make_store(load=False, pool_end=address(55))
        with self.assertLogs("pxeserver.dhcp", "INFO") as logs:
            smaller.load()
        warnings = [line for line in logs.output
                    if line.startswith("WARNING")]
        self.assertEqual(len(warnings), 2)
        self.assertIn("192.0.2.58", warnings[0])
        self.assertIn("outside the pool", warnings[0])
        self.assertIn("kept in", warnings[1])
        self.assertEqual([lease.mac for lease in smaller.leases()], [MAC_A])

    def test_dropped_leases_kept_in_copy(self):
        store = self.make_store()
        self.bind(store, MAC_B, address(58))
        self.assertTrue(store.commit())
        smaller = self.make_store(load=False, pool_end=address(55))
        with self.assertLogs("pxeserver.dhcp", "WARNING"):
            smaller.load()
        copies = [name for name in os.listdir(os.path.dirname(self.path))
                  if ".before-" in name]
        self.assertEqual(len(copies), 1)
        with open(os.path.join(os.path.dirname(self.path), copies[0])) as f:
            kept = json.load(f)
        self.assertEqual(kept["leases"][0]["address"], "192.0.2.58")

    def test_infinite_expiry_dropped(self):
        for value in ("1e400", "NaN"):
            with self.subTest(expires=value):
                with open(self.path, "w") as handle:
                    handle.write(
                        '{"format": "pxeserver-leases", "version": 1, '
                        '"leases": [{"mac": "52:54:00:99:99:99", '
                        '"address": "192.0.2.55", "expires": %s}]}' % value)
                store = self.make_store(load=False)
                with self.assertLogs("pxeserver.dhcp", "WARNING"):
                    store.load()
                self.assertEqual(store.leases(), [])
                store.request(MAC_A, POOL_START)
                self.assertTrue(store.commit())

    def test_lease_file_folder_rejected(self):
        os.makedirs(self.path)
        store = self.make_store(load=False)
        with self.assertRaises(pxeserver.ConfigError):
            store.load()

    def test_bad_entry_dropped_others_kept(self):
        document = {"format": pxeserver.LEASE_FILE_FORMAT, "version": 1,
                    "leases": [{"mac": "zz", "address": "192.0.2.50",
                                "expires": 1},
                               {"mac": MAC_B, "address": "192.0.2.51",
                                "expires": START_TIME + 5}]}
        self.write_lease_file(json.dumps(document))
        store = self.make_store(load=False)
        with self.assertLogs("pxeserver.dhcp", "WARNING") as logs:
            store.load()
        self.assertIn("dropped", logs.output[0])
        self.assertEqual([lease.mac for lease in store.leases()], [MAC_B])

    def test_commit_replaces_file_atomically(self):
        store = self.make_store()
        for count, mac in enumerate((MAC_A, MAC_B, MAC_C)):
            self.bind(store, mac, address(50 + count))
            self.assertTrue(store.commit())
        self.assertEqual(os.listdir(self.folder), ["leases.json"])
        with open(self.path, encoding="utf-8") as handle:
            document = json.load(handle)
        self.assertEqual(document["format"], pxeserver.LEASE_FILE_FORMAT)
        self.assertEqual(len(document["leases"]), 3)

    def test_failed_commit_leaves_no_temp(self):
        store = self.make_store()
        # A folder in the place of the lease file makes the rename fail.
        os.mkdir(self.path)
        self.bind(store, MAC_A, POOL_START)
        with self.assertLogs("pxeserver.dhcp", "ERROR") as logs:
            self.assertFalse(store.commit())
        self.assertIn("cannot write lease file", logs.output[0])
        self.assertEqual(os.listdir(self.folder), ["leases.json"])

    def test_concurrent_commits_all_persisted(self):
        store = self.make_store(pool_end=address(99))
        macs = [f"52:54:00:00:01:{number:02x}" for number in range(40)]
        results = {}

        def lease_and_commit(mac):
            leased = store.offer(mac)
            store.request(mac, leased)
            results[mac] = store.commit()

        threads = [threading.Thread(target=lease_and_commit, args=(mac,))
                   for mac in macs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_SECONDS)
        self.assertFalse(any(thread.is_alive() for thread in threads))
        self.assertEqual(results, {mac: True for mac in macs})
        reloaded = self.make_store(pool_end=address(99))
        self.assertEqual(sorted(lease.mac for lease in reloaded.leases()),
                         sorted(macs))
        self.assertEqual(len({lease.address
                              for lease in reloaded.leases()}), len(macs))
        self.assertEqual(os.listdir(self.folder), ["leases.json"])


if __name__ == "__main__":
    unittest.main()
