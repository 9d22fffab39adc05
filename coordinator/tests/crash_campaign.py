#!/usr/bin/env python3
"""Crash campaigns: SIGKILL the coordinator, or a device, at random moments while real SDK
devices (`fedpref-device participate`) take part in rounds, and check what must survive.

    # the coordinator killed 100 times, local mode, SQLite:
    python3 coordinator/tests/crash_campaign.py --bin-dir target/debug --target coordinator \\
        --mode local --kills 100 --seed 1
    # the same in distributed mode (secure aggregation), and devices killed instead:
    ... --target coordinator --mode distributed --kills 100 --seed 2
    ... --target device --mode local --kills 100 --seed 3
    # two coordinator replicas on PostgreSQL, one of them killed at a time:
    ... --target coordinator --mode local --store postgres --kills 100 --seed 4 \\
        --postgres-url postgres://postgres@127.0.0.1:5432/postgres

`--target coordinator`: the coordinator is killed (SIGKILL) after a random time (uniform in
`--min-gap`..`--max-gap` seconds, from `--seed`) and restarted at once on the same ports, while
`--devices` device processes take part; a device process that exits (its retries exhausted
while the coordinator was down) is started again. After the last kill the coordinator is
left running until at least one more round commits ("the devices carry on"), then stopped,
and the campaign checks:

- `fedpref-coordinator ledger verify` passes (hash chain, every cumulative ε, signatures,
  rounds against the manifest, the budget);
- no round is committed twice (the ledger's `round_committed` entries and the `rounds` table),
  and the ledger, the `rounds` table and the run's row count the same committed rounds;
- every stored model version is whole: its snapshot's SHA-256 is the one recorded;
- the ledger's ε (δ as the devices account) is at least what every device's accountant
  recorded (`fedpref-device budget --json`).

`--store postgres`: the campaign creates a database of its own on the server `--postgres-url`
names (a superuser URL; default: the environment's `FEDPREF_TEST_POSTGRES_URL`) with `psql`,
and drops it at the end. Two replicas (`replica-a`, `replica-b`, each with its own ports and a
`[replica]` section: lease `--lease-millis`, renewed every `--renew-millis`) serve that one
database; the run is created through replica-a's AdminService, so replica-a owns it first.
Device i is always pointed at replica i mod 2 (the one that does not own the run redirects
it). Each coordinator kill SIGKILLs one replica, picked by the seeded RNG; the other keeps
running and the killed one is started again at once on the same ports, so the run's lease
changes hands. The checks are the same, reading PostgreSQL with `psql -At` instead of
SQLite, and the summary adds the redirects the devices followed and who took the lease over.
`FEDPREF_KEEP_DATABASE=1` keeps the database for a look afterwards.

`--target device`: the coordinator runs undisturbed and a device process is killed at
random moments instead; after each kill its store must open (`fedpref-device budget`), its
recorded ε and release count never go down, and at the end no device has recorded fewer
releases than the coordinator counted from it (`participations`), and every installed model
is one the coordinator published (same SHA-256).

Prints one line per kill and a summary (the figures docs/reliability.md reports); exits 1 on
the first failed check. Only the standard library is needed.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ITEMS, FACTORS = 64, 4
# Models are sent in chunks this small (the default is 256 KiB), so that a kill can land
# in the middle of a download and the device must resume it.
DOWNLOAD_CHUNK_BYTES = 16
DELTA = 1e-6  # the device accountant's δ, so that the two ε compare

MANIFEST = """
title = "Crash campaign"
purpose = "Kill processes at random moments and check what survives"
owner = "ci@example.com"
privacy_mode = "{mode}"
rounds = 100000
clip_norm = 1.0
noise_multiplier = {sigma}

[budget]
epsilon = 1000000.0
delta = {delta}

[sampling]
kind = "cohort"
target_size = {cohort}
minimum_size = {minimum}
round_seconds = {round_seconds}

[server_optimizer]
kind = "fedavg"

[model]
items = {items}
factors = {factors}

[opt_out_policy]
consent_model = "opt-in"
"""

DISTRIBUTED = """
[secure_aggregation]
noise = "discrete_gaussian"
dropout_rate = 0.3
corruption_rate = 0.0
# Short stages, so that a round lost to a kill is abandoned within seconds.
advertise_keys_seconds = 3
share_keys_seconds = 3
masked_input_seconds = 4
unmasking_seconds = 3
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sql_literal(value) -> str:
    """A SQL string literal (the same in SQLite and PostgreSQL)."""
    return "'" + str(value).replace("'", "''") + "'"


def with_database(url: str, database: str) -> str:
    """`url` (postgres://user@host:port/db?…) naming `database` instead."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


def psql(url: str, sql: str) -> list[tuple[str, ...]]:
    """Runs `sql` with `psql -At`; the rows, each a tuple of text fields."""
    done = subprocess.run(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-F", "\x1f",
                           "-d", url, "-c", sql], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"psql failed ({sql!r}): {done.stderr.strip()}")
    return [tuple(line.split("\x1f")) for line in done.stdout.splitlines() if line]


def events() -> str:
    lines = [json.dumps({"type": "item", "item": f"i{i}", "topics": ["t"], "title": f"Item {i}"})
             for i in range(ITEMS)]
    lines += [json.dumps({"type": "rating", "item": f"i{i}", "value": float(1 + i % 5),
                          "at": "2026-01-01T00:00:00Z"}) for i in range(0, ITEMS, 2)]
    return "\n".join(lines) + "\n"


class Server:
    """One `fedpref-coordinator serve` process: its configuration, ports and log."""

    def __init__(self, name: str, config: Path, log: Path):
        self.name = name
        self.config = config
        self.ports = (free_port(), free_port(), free_port())  # device, admin, metrics
        self.log_path = log
        self.log = open(log, "ab")
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"https://localhost:{self.ports[0]}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Campaign:
    def __init__(self, args, tmp: Path):
        self.args = args
        self.bin = Path(args.bin_dir).resolve()
        self.tmp = tmp
        self.rng = random.Random(args.seed)
        self.dir = tmp / "fp"
        self.db = self.dir / "coordinator.db"
        self.postgres = args.store == "postgres"
        # With PostgreSQL: a database of the campaign's own, and two replicas on it.
        self.database = f"crash_{args.seed}_{os.getpid()}".replace("-", "m")
        self.url = with_database(args.postgres_url, self.database) if self.postgres else None
        self.database_created = False
        self.run_id = "campaign"
        if self.postgres:
            self.servers = [Server(name, self.dir / f"{name}.toml", tmp / f"{name}.log")
                            for name in ("replica-a", "replica-b")]
        else:
            self.servers = [Server("coordinator", self.dir / "coordinator.toml", tmp / "coordinator.log")]
        self.devices: list[subprocess.Popen | None] = []
        self.device_starts = 0
        self.device_exits = {}

    @property
    def db_location(self) -> str:
        """What `--db` takes: the SQLite file or the PostgreSQL URL."""
        return self.url if self.postgres else str(self.db)

    def coordinator(self, *args, check=True, **kw):
        return subprocess.run([str(self.bin / "fedpref-coordinator"), *args], check=check,
                              capture_output=True, text=True, **kw)

    def device_cli(self, index: int, *args, check=True):
        return subprocess.run([str(self.bin / "fedpref-device"), "--store", str(self.store(index)), *args],
                              check=check, capture_output=True, text=True)

    def store(self, index: int) -> Path:
        return self.tmp / f"device-{index}.db"

    # -- the coordinator's store, read directly ------------------------------------------
    def query(self, sql: str) -> list[tuple]:
        """Rows of `sql` from the coordinator's store (read-only for SQLite). PostgreSQL's
        fields come back as text: callers convert."""
        if self.postgres:
            return psql(self.url, sql)
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()

    def blob(self, column: str) -> str:
        """`column` (a BLOB/BYTEA) as `query` should select it; `as_bytes` reads it back."""
        return f"encode({column}, 'hex')" if self.postgres else column

    @staticmethod
    def as_bytes(value) -> bytes:
        return bytes.fromhex(value.removeprefix("\\x")) if isinstance(value, str) else value

    def create_database(self):
        try:
            psql(self.args.postgres_url, f"CREATE DATABASE {self.database}")
        except (RuntimeError, OSError) as e:
            fail(f"cannot create the campaign's database on --postgres-url: {e}")
        self.database_created = True

    def drop_database(self):
        if not self.database_created:
            return
        if os.environ.get("FEDPREF_KEEP_DATABASE"):
            print(f"database kept (FEDPREF_KEEP_DATABASE): {self.url}", flush=True)
            return
        try:
            psql(self.args.postgres_url, f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")
        except (RuntimeError, OSError) as e:
            print(f"warning: could not drop the campaign's database {self.database}: {e}", flush=True)

    def set_up(self):
        a = self.args
        self.coordinator("init", "--dir", str(self.dir))
        config = (self.dir / "coordinator.toml").read_text()
        assert "download_chunk_bytes = 262144" in config
        config = config.replace("download_chunk_bytes = 262144", f"download_chunk_bytes = {DOWNLOAD_CHUNK_BYTES}")
        if self.postgres:
            sqlite_store = '[store]\npath = "coordinator.db"\n'
            assert sqlite_store in config
            for s in self.servers:
                s.config.write_text(config.replace(sqlite_store, (
                    f'[store]\nurl = "{self.url}"\n\n'
                    f'[replica]\nid = "{s.name}"\nadvertise = "{s.endpoint}"\n'
                    f'lease_millis = {a.lease_millis}\nrenew_millis = {a.renew_millis}\n')))
        else:
            (self.dir / "coordinator.toml").write_text(config)
        distributed = a.mode == "distributed"
        manifest = MANIFEST.format(
            mode=a.mode, sigma=50.0 if not distributed else 20.0, delta=DELTA,
            cohort=a.devices, minimum=max(1, a.devices - 1) if not distributed else 3,
            round_seconds=2 if not distributed else 4, items=ITEMS, factors=FACTORS,
        ) + (DISTRIBUTED if distributed else "")
        (self.tmp / "run.toml").write_text(manifest)
        if self.postgres:
            self.create_database()
            self.start_coordinator(0)
            self.run_id = self.create_run_at(self.servers[0])
        else:
            self.coordinator("run", "create", "--db", str(self.db), "--manifest", str(self.tmp / "run.toml"),
                             "--id", "campaign")
        (self.tmp / "events.jsonl").write_text(events())
        for i in range(a.devices):
            self.device_cli(i, "ingest", str(self.tmp / "events.jsonl"))
        self.devices = [None] * a.devices

    def create_run_at(self, s: Server) -> str:
        """Creates the run through `s`'s AdminService (which takes the run's lease as it
        creates it), retrying while `s` starts; returns the run's id (derived from the request
        id). `run create --db` opens SQLite files only."""
        deadline = time.time() + 60
        while True:
            done = self.coordinator(
                "admin", "runs", "create", "--endpoint", f"https://localhost:{s.ports[1]}",
                "--token-file", str(self.dir / "admin.token"), "--ca-cert", str(self.dir / "tls" / "cert.pem"),
                "--manifest", str(self.tmp / "run.toml"), "--request-id", "campaign", check=False)
            if done.returncode == 0:
                return done.stdout.split("\t")[0].strip()
            if not s.running() or time.time() > deadline:
                fail(f"creating the run through {s.name}'s AdminService failed:\n{done.stdout}{done.stderr}\n"
                     + s.log_path.read_text(errors="replace")[-5000:])
            time.sleep(0.2)

    def start_coordinator(self, i: int = 0):
        s = self.servers[i]
        device, admin, metrics = s.ports
        s.process = subprocess.Popen(
            [str(self.bin / "fedpref-coordinator"), "serve", "--config", str(s.config),
             "--device-addr", f"127.0.0.1:{device}", "--admin-addr", f"127.0.0.1:{admin}",
             "--metrics-addr", f"127.0.0.1:{metrics}"],
            stdout=s.log, stderr=subprocess.STDOUT)

    def start_coordinators(self):
        for i, s in enumerate(self.servers):
            if not s.running():
                self.start_coordinator(i)

    def kill_coordinator(self, i: int = 0):
        s = self.servers[i]
        s.process.send_signal(signal.SIGKILL)
        s.process.wait()

    def stop_coordinators(self):
        """SIGTERM to every coordinator process (a replica releases its leases), then waits."""
        for s in self.servers:
            if s.running():
                s.process.send_signal(signal.SIGTERM)
        for s in self.servers:
            if s.process is not None:
                s.process.wait(timeout=30)

    def start_device(self, i: int):
        log = open(self.tmp / f"device-{i}.log", "ab")
        # With replicas, device i always starts at replica i mod 2 (as an app has one address
        # configured; its enrolment is kept for that address): it reaches the run's owner
        # directly or through a redirect.
        server = self.servers[i % len(self.servers)]
        self.devices[i] = subprocess.Popen(
            [str(self.bin / "fedpref-device"), "--store", str(self.store(i)), "participate",
             "--coordinator", server.endpoint, "--ca-cert", str(self.dir / "tls" / "cert.pem"),
             "--app-key", (self.dir / "app.key").read_text().strip(), "--rounds", "100000"],
            stdout=log, stderr=subprocess.STDOUT)
        self.device_starts += 1

    def keep_devices_running(self):
        for i, p in enumerate(self.devices):
            if p is None or p.poll() is not None:
                if p is not None:
                    self.device_exits[p.returncode] = self.device_exits.get(p.returncode, 0) + 1
                self.start_device(i)

    def sleep_keeping_devices(self, seconds: float):
        end = time.time() + seconds
        while time.time() < end:
            self.keep_devices_running()
            time.sleep(min(0.1, max(0.0, end - time.time())))

    def stop_devices(self):
        for p in self.devices:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()

    def rounds_committed(self) -> int:
        rows = self.query(f"SELECT rounds_committed FROM runs WHERE id = {sql_literal(self.run_id)}")
        return int(rows[0][0]) if rows else 0

    def lease_owner(self) -> str:
        """The replica that holds the run's lease now ('' when nobody holds a live one)."""
        rows = self.query("SELECT owner, expires_at_ms > (extract(epoch from clock_timestamp()) * 1000)::bigint "
                          f"FROM run_leases WHERE run_id = {sql_literal(self.run_id)}")
        if not rows or rows[0][1] != "t":
            return ""
        return rows[0][0]

    def replica_figures(self) -> dict:
        """How the run's lease changed hands (from the replicas' logs and the lease row) and
        how often devices followed a redirect."""
        ansi = re.compile(r"\x1b\[[0-9;]*m")
        taken = {"free_or_released": 0, "from_the_other_replica": 0, "from_its_own_killed_process": 0}
        for s in self.servers:
            for line in s.log_path.read_text(errors="replace").splitlines():
                line = ansi.sub("", line)
                if "run lease taken" not in line:
                    continue
                previous = re.search(r'from=Some\("([^"]*)"\)', line)
                if previous is None:
                    taken["free_or_released"] += 1
                elif previous.group(1) == s.name:
                    taken["from_its_own_killed_process"] += 1
                else:
                    taken["from_the_other_replica"] += 1
        token = self.query(f"SELECT token FROM run_leases WHERE run_id = {sql_literal(self.run_id)}")
        logs = [(self.tmp / f"device-{i}.log").read_text(errors="replace") for i in range(self.args.devices)]
        return {"lease_taken": taken, "lease_token_at_end": int(token[0][0]) if token else 0,
                "redirects_followed": sum(log.count("redirected to ") for log in logs),
                "devices_stopped_after_redirects_in_a_row": sum(log.count("times in a row") for log in logs),
                "enrolments": sum(log.count("enrolled as ") for log in logs)}

    def device_budget(self, i: int):
        out = self.device_cli(i, "budget", "--json")
        return json.loads(out.stdout)

    # -- checks -------------------------------------------------------------------------
    def check_ledger(self) -> dict:
        verify = self.coordinator("ledger", "verify", "--db", self.db_location, check=False)
        if verify.returncode != 0:
            fail(f"ledger verify failed:\n{verify.stdout}{verify.stderr}")
        shown = self.coordinator("ledger", "show", "--db", self.db_location, "--run", self.run_id).stdout
        entries = [json.loads(line) for line in shown.splitlines() if line.strip()]
        committed, abandoned = {}, 0
        for e in entries:
            event = e.get("event", {})
            if event.get("kind") == "round_committed":
                r = event.get("round")
                committed[r] = committed.get(r, 0) + 1
            elif event.get("kind") == "round_abandoned":
                abandoned += 1
        twice = {r: n for r, n in committed.items() if n > 1}
        if twice:
            fail(f"rounds committed more than once in the ledger: {twice}")
        run = sql_literal(self.run_id)
        dup = self.query(f"SELECT round, count(*) FROM rounds WHERE run_id = {run} "
                         "GROUP BY round HAVING count(*) > 1")
        if dup:
            fail(f"rounds stored twice: {dup}")
        outcomes = {outcome: int(n) for outcome, n in self.query(
            f"SELECT outcome, count(*) FROM rounds WHERE run_id = {run} GROUP BY outcome")}
        committed_rows = outcomes.get("committed", 0)
        run_row = self.rounds_committed()
        if not len(committed) == committed_rows == run_row:
            fail(f"committed rounds disagree: {len(committed)} in the ledger, {committed_rows} in the rounds "
                 f"table, {run_row} in the run's row")
        versions = 0
        for version, sha, snapshot in self.query(
                f"SELECT version, sha256, {self.blob('snapshot')} FROM model_versions WHERE run_id = {run}"):
            versions += 1
            if hashlib.sha256(self.as_bytes(snapshot)).hexdigest() != sha:
                fail(f"model version {version} is half-written: its snapshot's SHA-256 is not the recorded one")
        return {"entries": len(entries), "rounds_committed": len(committed), "committed_rows": committed_rows,
                "rounds_abandoned": outcomes.get("abandoned", 0), "ledger_rounds_abandoned": abandoned,
                "model_versions": versions, "verify": verify.stdout.strip()}

    def ledger_epsilon(self) -> float:
        """The run's ε for `anyone` at the manifest's δ, as `ledger verify` recomputes it."""
        verify = self.coordinator("ledger", "verify", "--db", self.db_location).stdout
        # "run campaign: ok — N entries, … ε = X (anyone) at δ = …"
        for part in verify.split(","):
            part = part.strip()
            if part.startswith("ε = "):
                return float(part.split()[2])
        fail(f"no ε in `ledger verify`'s output: {verify}")

    def ledger_spending_rounds(self) -> set:
        """Rounds whose ε the ledger spent: charged (an update arrived), committed, or whose
        release was recorded (distributed mode)."""
        shown = self.coordinator("ledger", "show", "--db", self.db_location, "--run", self.run_id).stdout
        rounds = set()
        for line in shown.splitlines():
            event = json.loads(line).get("event", {}) if line.strip() else {}
            kind = event.get("kind", "")
            if kind in ("round_charged", "round_committed") or "release" in kind:
                if event.get("round") is not None:
                    rounds.add(event["round"])
        return rounds

    def check_epsilon(self) -> dict:
        """The ledger's ε is at least the ε of every device's releases that reached it.

        A device records a release before sending it (the accountant must never record less
        than what left the device). When the coordinator is down at that moment the release
        never arrives, the device gives up and, restarted, takes the same round again: it then
        holds two records for one round, of which the coordinator saw at most one. So the
        comparison is with the ε the device records after as many releases as there are
        distinct rounds it released in that the ledger spent; every round has the same σ and
        C here, so that ε is the device's own `epsilon_after` of its m-th release. What the
        device recorded beyond that is reported as its conservative excess."""
        ledger = self.ledger_epsilon()
        spending = self.ledger_spending_rounds()
        worst, excess, undelivered = 0.0, 0.0, 0
        for i in range(self.args.devices):
            budget = self.device_budget(i)
            spent = float(budget["epsilon_spent"])
            updates = [u for u in budget["uploads"] if u["kind"] == "update"]
            if len(updates) != len(budget["uploads"]):
                fail(f"device {i} made releases other than updates; the comparison assumes one kind")
            reached = {u["round_id"] for u in updates} & spending
            m = len(reached)
            undelivered += len(updates) - m
            needed = updates[m - 1]["epsilon_after"] if m else 0.0
            worst = max(worst, needed)
            excess = max(excess, spent - needed)
            # `ledger verify` prints ε to 6 decimals.
            if needed > ledger + 5e-7:
                fail(f"device {i}'s {m} releases that reached the coordinator cost ε = {needed}, "
                     f"more than the ledger's {ledger}; its uploads: "
                     f"{[(u['round_id'], u['epsilon_after']) for u in updates]}; ledger rounds: {sorted(spending)}")
        return {"ledger_epsilon": ledger, "largest_device_epsilon_reached": round(worst, 6),
                "releases_not_reaching_the_coordinator": undelivered,
                "largest_conservative_device_excess": round(excess, 6)}


def fail(message: str):
    print(f"FAIL: {message}", flush=True)
    sys.exit(1)


def coordinator_campaign(c: Campaign) -> dict:
    a = c.args
    c.start_coordinators()
    c.sleep_keeping_devices(3.0)
    started = time.time()
    owner_kills = 0
    for k in range(1, a.kills + 1):
        gap = c.rng.uniform(a.min_gap, a.max_gap)
        c.sleep_keeping_devices(gap)
        before = c.rounds_committed()
        if not c.postgres:
            c.kill_coordinator()
            c.start_coordinator()
            print(f"kill {k}/{a.kills} after {gap:.2f} s: {before} rounds committed", flush=True)
            continue
        i = c.rng.randrange(len(c.servers))
        owner = c.lease_owner()
        owner_kills += owner == c.servers[i].name
        c.kill_coordinator(i)
        c.start_coordinator(i)
        print(f"kill {k}/{a.kills} of {c.servers[i].name} after {gap:.2f} s "
              f"(lease: {owner or 'none live'}): {before} rounds committed", flush=True)
    # The devices carry on: a round commits after the last restart.
    target = c.rounds_committed() + 1
    deadline = time.time() + a.carry_on_seconds
    while c.rounds_committed() < target:
        if time.time() > deadline:
            fail(f"no round committed within {a.carry_on_seconds} s of the last restart")
        c.sleep_keeping_devices(0.5)
    elapsed = time.time() - started
    c.stop_devices()
    c.stop_coordinators()
    figures = c.check_ledger()
    figures.update(c.check_epsilon())
    figures.update({"seconds": round(elapsed, 1), "device_starts": c.device_starts,
                    "device_exits": c.device_exits})
    if c.postgres:
        figures.update({"kills_of_the_lease_owner": owner_kills})
        figures.update(c.replica_figures())
    return figures


def device_campaign(c: Campaign) -> dict:
    a = c.args
    c.start_coordinators()
    c.sleep_keeping_devices(3.0)
    started = time.time()
    last = [(0.0, 0)] * a.devices
    for k in range(1, a.kills + 1):
        gap = c.rng.uniform(a.min_gap, a.max_gap)
        c.sleep_keeping_devices(gap)
        i = c.rng.randrange(a.devices)
        p = c.devices[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
        c.devices[i] = None
        try:
            budget = c.device_budget(i)
        except subprocess.CalledProcessError as e:
            fail(f"device {i}'s store does not open after kill {k}: {e.stderr}")
        spent, released = float(budget["epsilon_spent"]), len(budget["uploads"])
        if spent < last[i][0] or released < last[i][1]:
            fail(f"device {i}'s accountant went down after kill {k}: {last[i]} -> {(spent, released)}")
        last[i] = (spent, released)
        print(f"kill {k}/{a.kills} of device {i} after {gap:.2f} s: ε {spent:.4f}, {released} released", flush=True)
        c.start_device(i)
    elapsed = time.time() - started
    c.stop_devices()
    c.stop_coordinators()
    figures = c.check_ledger()
    figures.update(c.check_epsilon())
    run = sql_literal(c.run_id)
    published = {int(v): sha for v, sha in c.query(
        f"SELECT version, sha256 FROM model_versions WHERE run_id = {run}")}
    counted = {}
    for i in range(a.devices):
        dcon = sqlite3.connect(f"file:{c.store(i)}?mode=ro", uri=True)
        try:
            row = dcon.execute("SELECT model_version, sha256 FROM installed_snapshot").fetchone()
            enrolment = dcon.execute("SELECT device_id FROM enrolment").fetchone()
        finally:
            dcon.close()
        if row is not None:
            version, sha = row
            sha = sha.hex() if isinstance(sha, bytes) else sha
            if published.get(version) != sha:
                fail(f"device {i} installed model version {version} with SHA-256 {sha}, "
                     f"not the published {published.get(version)}")
        if enrolment is not None:
            n = int(c.query(f"SELECT count(*) FROM participations WHERE run_id = {run} "
                            f"AND device_id = {sql_literal(enrolment[0])}")[0][0])
            counted[i] = n
            released = len(c.device_budget(i)["uploads"])
            if released < n:
                fail(f"device {i} recorded {released} releases, the coordinator counted {n} of its updates")
    resumed = sum((c.tmp / f"device-{i}.log").read_text(errors="replace").count("resumed from byte")
                  for i in range(a.devices))
    figures.update({"seconds": round(elapsed, 1), "device_starts": c.device_starts,
                    "downloads_resumed": resumed, "participations_counted": counted})
    if c.postgres:
        figures.update(c.replica_figures())
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", required=True, help="where fedpref-coordinator and fedpref-device are")
    parser.add_argument("--target", choices=["coordinator", "device"], default="coordinator")
    parser.add_argument("--mode", choices=["local", "distributed"], default="local")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite",
                        help="the coordinator's store: one SQLite file, or PostgreSQL with two replicas")
    parser.add_argument("--postgres-url", default=os.environ.get("FEDPREF_TEST_POSTGRES_URL"),
                        help="with --store postgres: a superuser URL of the server to create the campaign's "
                             "database on (default: $FEDPREF_TEST_POSTGRES_URL)")
    parser.add_argument("--lease-millis", type=int, default=2000,
                        help="with --store postgres: how long a replica's lease on the run lasts, ms")
    parser.add_argument("--renew-millis", type=int, default=500,
                        help="with --store postgres: how often the replicas renew and look for leases, ms")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--min-gap", type=float, default=0.2, help="shortest time before a kill, s")
    parser.add_argument("--max-gap", type=float, default=3.0, help="longest time before a kill, s")
    parser.add_argument("--carry-on-seconds", type=float, default=60.0)
    args = parser.parse_args()
    if args.store == "postgres":
        if not args.postgres_url:
            parser.error("--store postgres needs --postgres-url (or FEDPREF_TEST_POSTGRES_URL in the environment)")
        if not args.postgres_url.startswith(("postgres://", "postgresql://")):
            parser.error(f"--postgres-url {args.postgres_url}: must start with postgres:// or postgresql://")
        if shutil.which("psql") is None:
            parser.error("--store postgres needs the `psql` client on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        c = Campaign(args, Path(tmp))
        try:
            c.set_up()
            figures = coordinator_campaign(c) if args.target == "coordinator" else device_campaign(c)
        finally:
            c.stop_devices()
            for s in c.servers:
                if s.running():
                    s.process.kill()
                    s.process.wait()
            if os.environ.get("FEDPREF_SHOW_LOG"):
                for s in c.servers:
                    print(s.log_path.read_text(errors="replace")[-20000:])
                for i in range(args.devices):
                    print((Path(tmp) / f"device-{i}.log").read_text(errors="replace")[-3000:])
            c.drop_database()
    store = ", PostgreSQL, two replicas" if args.store == "postgres" else ""
    print(f"crash campaign ({args.target}, {args.mode}{store}, {args.kills} kills, seed {args.seed}): ok "
          + json.dumps(figures, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
