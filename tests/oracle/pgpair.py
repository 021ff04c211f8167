"""A Postgres primary and a physical standby of its own, for the oracle's
`pg_failover` fault (Postgres 17+ failover slots; README "Postgres
failover").

Why a pair of its own instead of the stack's Postgres: promoting a standby
leaves the old primary behind on another timeline, and the primary must
name the standby's slot in `synchronized_standby_slots`, which would hold
back every other logical walsender on the server while the standby is
down. Neither may leak into the stack that other tests share, so the pair
lives in the run's folder and is removed with it.

The pair is set up as the README's recipe says: a physical slot on the
primary for the standby (`primary_slot_name`), `hot_standby_feedback`,
`sync_replication_slots = on` on the standby, and
`synchronized_standby_slots` on the primary, so that walcast never receives
a change the standby has not flushed. The standby is a cold copy of the
primary's data folder (the zonky builds have no pg_basebackup), as in
tests/failover.rs. The failover is the one an operator fears most: the
primary stopped with an immediate shutdown under load, the standby
promoted. Clients reach the pair through libpq's host list with
`target_session_attrs`, as walcast does (`host = "a,b"`).
"""

import os
import shutil
import socket
import subprocess
import time

STANDBY_SLOT = "oracle_standby"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_major(bin_dir):
    """The major version of the Postgres binaries in `bin_dir`."""
    out = subprocess.run([f"{bin_dir}/postgres", "--version"], capture_output=True, text=True).stdout
    return int(out.split()[-1].split(".")[0])


def as_postgres(args, **kw):
    return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True, **kw)


class PgPair:
    def __init__(self, folder, bin_dir, log):
        self.dir = os.path.join(folder, "pgpair")
        self.bin = bin_dir
        self.log = log
        self.ports = (free_port(), free_port())

    def data(self, i):
        return os.path.join(self.dir, f"data{i}")

    def logfile(self, i):
        return os.path.join(self.dir, f"postgres{i}.log")

    def pg_ctl(self, i, *args):
        return as_postgres([f"{self.bin}/pg_ctl", "-D", self.data(i), "-l", self.logfile(i), "-t", "120", *args])

    def psql(self, i, sql):
        res = as_postgres([f"{self.bin}/psql", "-X", "-q", "-t", "-A", "-h", "127.0.0.1", "-p", str(self.ports[i]), "-U", "postgres",
                           "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql])
        if res.returncode != 0:
            raise RuntimeError(f"psql on server {i} failed: {res.stderr.strip()}")
        return res.stdout

    def start(self):
        os.makedirs(self.dir, exist_ok=True)
        subprocess.run(["chown", "-R", "postgres", self.dir], check=True)
        res = as_postgres([f"{self.bin}/initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8",
                           "--no-sync", "-D", self.data(0)])
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed: {res.stderr.strip()[-500:]}")
        with open(os.path.join(self.data(0), "postgresql.auto.conf"), "a") as f:
            f.write(f"port = {self.ports[0]}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.dir}'\n"
                    "fsync = off\nwal_level = logical\nmax_wal_senders = 20\nmax_replication_slots = 20\n"
                    "wal_keep_size = '1GB'\nmax_connections = 100\n"
                    f"synchronized_standby_slots = '{STANDBY_SLOT}'\n")
        self.must(self.pg_ctl(0, "-w", "start"), "the primary did not start", 0)
        self.psql(0, f"SELECT pg_create_physical_replication_slot('{STANDBY_SLOT}', true)")
        # The standby: a copy of the primary's folder taken while it is down.
        self.must(self.pg_ctl(0, "-m", "fast", "-w", "stop"), "stopping the primary for the copy failed", 0)
        subprocess.run(["cp", "-a", self.data(0), self.data(1)], check=True)
        # Its own copy of the physical slot would pin WAL after its promotion.
        shutil.rmtree(os.path.join(self.data(1), "pg_replslot", STANDBY_SLOT), ignore_errors=True)
        open(os.path.join(self.data(1), "standby.signal"), "w").close()
        with open(os.path.join(self.data(1), "postgresql.auto.conf"), "a") as f:
            f.write(f"port = {self.ports[1]}\n"
                    f"primary_conninfo = 'host=127.0.0.1 port={self.ports[0]} user=postgres dbname=postgres application_name=standby'\n"
                    f"primary_slot_name = '{STANDBY_SLOT}'\nhot_standby_feedback = on\nsync_replication_slots = on\n"
                    "synchronized_standby_slots = ''\n")
        subprocess.run(["chown", "-R", "postgres", self.dir], check=True)
        self.must(self.pg_ctl(0, "-w", "start"), "the primary did not start again", 0)
        self.must(self.pg_ctl(1, "-w", "start"), "the standby did not start", 1)
        self.log(f"Postgres pair: primary on {self.ports[0]}, physical standby on {self.ports[1]} "
                 f"(slot {STANDBY_SLOT}, sync_replication_slots on)")

    def must(self, res, what, i):
        if res.returncode != 0:
            tail = ""
            try:
                tail = open(self.logfile(i), errors="replace").read()[-1500:]
            except OSError:
                pass
            raise RuntimeError(f"{what}: {res.stderr.strip()[-300:]}\n{tail}")

    def conn_params(self):
        """What psycopg needs to reach whichever server is the primary."""
        return dict(host="127.0.0.1,127.0.0.1", port=f"{self.ports[0]},{self.ports[1]}", user="postgres",
                    target_session_attrs="read-write", connect_timeout=3)

    def slot_synced(self, slot):
        """The standby has `slot` as a persistent synchronised copy that has
        confirmed something (what a failover then resumes from)."""
        try:
            out = self.psql(1, f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' "
                               "AND synced AND NOT temporary AND confirmed_flush_lsn > '0/0'")
        except RuntimeError:
            return False
        return out.strip() == "1"

    def failover(self):
        """Immediate shutdown of the primary, promotion of the standby."""
        t0 = time.time()
        self.must(self.pg_ctl(0, "-m", "immediate", "-w", "stop"), "the primary's immediate stop failed", 0)
        self.must(self.pg_ctl(1, "-w", "promote"), "pg_ctl promote failed", 1)
        self.log(f"primary (port {self.ports[0]}) stopped -m immediate, standby (port {self.ports[1]}) "
                 f"promoted in {time.time() - t0:.1f}s")

    def stop(self, remove=True):
        for i in (0, 1):
            if os.path.exists(os.path.join(self.data(i), "postmaster.pid")):
                self.pg_ctl(i, "-m", "immediate", "-w", "stop")
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
