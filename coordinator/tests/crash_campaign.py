#!/usr/bin/env python3
"""Crash campaigns: SIGKILL the coordinator, or a device, at random moments while real SDK
devices (`fedpref-device participate`) take part in rounds, and check what must survive.

    # the coordinator killed 100 times, local mode, SQLite:
    python3 coordinator/tests/crash_campaign.py --bin-dir target/debug --target coordinator \\
        --mode local --kills 100 --seed 1
    # the same in distributed mode (secure aggregation), and devices killed instead:
    ... --target coordinator --mode distributed --kills 100 --seed 2
    ... --target device --mode local --kills 100 --seed 3

`--target coordinator`: the coordinator is killed (SIGKILL) after a random time (uniform in
`--min-gap`..`--max-gap` seconds, from `--seed`) and restarted at once on the same ports, while
`--devices` device processes take part; a device process that exits (its retries exhausted
while the coordinator was down) is started again. After the last kill the coordinator is
left running until at least one more round commits ("the devices carry on"), then stopped,
and the campaign checks:

- `fedpref-coordinator ledger verify` passes (hash chain, every cumulative ε, signatures,
  rounds against the manifest, the budget);
- no round is committed twice (the ledger's `round_committed` entries and the `rounds` table);
- every stored model version is whole: its snapshot's SHA-256 is the one recorded;
- the ledger's ε (δ as the devices account) is at least what every device's accountant
  recorded (`fedpref-device budget --json`).

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
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
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


def events() -> str:
    lines = [json.dumps({"type": "item", "item": f"i{i}", "topics": ["t"], "title": f"Item {i}"})
             for i in range(ITEMS)]
    lines += [json.dumps({"type": "rating", "item": f"i{i}", "value": float(1 + i % 5),
                          "at": "2026-01-01T00:00:00Z"}) for i in range(0, ITEMS, 2)]
    return "\n".join(lines) + "\n"


class Campaign:
    def __init__(self, args, tmp: Path):
        self.args = args
        self.bin = Path(args.bin_dir).resolve()
        self.tmp = tmp
        self.rng = random.Random(args.seed)
        self.dir = tmp / "fp"
        self.db = self.dir / "coordinator.db"
        self.ports = (free_port(), free_port(), free_port())
        self.server = None
        self.server_log = open(tmp / "coordinator.log", "ab")
        self.devices: list[subprocess.Popen | None] = []
        self.device_starts = 0
        self.device_exits = {}

    def coordinator(self, *args, check=True, **kw):
        return subprocess.run([str(self.bin / "fedpref-coordinator"), *args], check=check,
                              capture_output=True, text=True, **kw)

    def device_cli(self, index: int, *args, check=True):
        return subprocess.run([str(self.bin / "fedpref-device"), "--store", str(self.store(index)), *args],
                              check=check, capture_output=True, text=True)

    def store(self, index: int) -> Path:
        return self.tmp / f"device-{index}.db"

    def set_up(self):
        a = self.args
        self.coordinator("init", "--dir", str(self.dir))
        config = (self.dir / "coordinator.toml").read_text()
        assert "download_chunk_bytes = 262144" in config
        (self.dir / "coordinator.toml").write_text(
            config.replace("download_chunk_bytes = 262144", f"download_chunk_bytes = {DOWNLOAD_CHUNK_BYTES}"))
        distributed = a.mode == "distributed"
        manifest = MANIFEST.format(
            mode=a.mode, sigma=50.0 if not distributed else 20.0, delta=DELTA,
            cohort=a.devices, minimum=max(1, a.devices - 1) if not distributed else 3,
            round_seconds=2 if not distributed else 4, items=ITEMS, factors=FACTORS,
        ) + (DISTRIBUTED if distributed else "")
        (self.tmp / "run.toml").write_text(manifest)
        self.coordinator("run", "create", "--db", str(self.db), "--manifest", str(self.tmp / "run.toml"),
                         "--id", "campaign")
        (self.tmp / "events.jsonl").write_text(events())
        for i in range(a.devices):
            self.device_cli(i, "ingest", str(self.tmp / "events.jsonl"))
        self.devices = [None] * a.devices

    def start_coordinator(self):
        device, admin, metrics = self.ports
        self.server = subprocess.Popen(
            [str(self.bin / "fedpref-coordinator"), "serve", "--config", str(self.dir / "coordinator.toml"),
             "--device-addr", f"127.0.0.1:{device}", "--admin-addr", f"127.0.0.1:{admin}",
             "--metrics-addr", f"127.0.0.1:{metrics}"],
            stdout=self.server_log, stderr=subprocess.STDOUT)

    def kill_coordinator(self):
        self.server.send_signal(signal.SIGKILL)
        self.server.wait()

    def start_device(self, i: int):
        log = open(self.tmp / f"device-{i}.log", "ab")
        self.devices[i] = subprocess.Popen(
            [str(self.bin / "fedpref-device"), "--store", str(self.store(i)), "participate",
             "--coordinator", f"https://localhost:{self.ports[0]}", "--ca-cert", str(self.dir / "tls" / "cert.pem"),
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
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            row = con.execute("SELECT rounds_committed FROM runs WHERE id = 'campaign'").fetchone()
            return int(row[0]) if row else 0
        finally:
            con.close()

    def device_budget(self, i: int):
        out = self.device_cli(i, "budget", "--json")
        return json.loads(out.stdout)

    # -- checks -------------------------------------------------------------------------
    def check_ledger(self) -> dict:
        verify = self.coordinator("ledger", "verify", "--db", str(self.db), check=False)
        if verify.returncode != 0:
            fail(f"ledger verify failed:\n{verify.stdout}{verify.stderr}")
        shown = self.coordinator("ledger", "show", "--db", str(self.db), "--run", "campaign").stdout
        entries = [json.loads(line) for line in shown.splitlines() if line.strip()]
        committed = {}
        for e in entries:
            event = e.get("event", {})
            if event.get("kind") == "round_committed":
                r = event.get("round")
                committed[r] = committed.get(r, 0) + 1
        twice = {r: n for r, n in committed.items() if n > 1}
        if twice:
            fail(f"rounds committed more than once in the ledger: {twice}")
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            dup = con.execute("SELECT round, count(*) FROM rounds WHERE run_id = 'campaign' "
                              "GROUP BY round HAVING count(*) > 1").fetchall()
            if dup:
                fail(f"rounds stored twice: {dup}")
            committed_rows = con.execute("SELECT count(*) FROM rounds WHERE run_id = 'campaign' "
                                         "AND outcome = 'committed'").fetchone()[0]
            versions = 0
            for version, sha, snapshot in con.execute(
                    "SELECT version, sha256, snapshot FROM model_versions WHERE run_id = 'campaign'"):
                versions += 1
                if hashlib.sha256(snapshot).hexdigest() != sha:
                    fail(f"model version {version} is half-written: its snapshot's SHA-256 is not the recorded one")
        finally:
            con.close()
        return {"entries": len(entries), "rounds_committed": len(committed), "committed_rows": committed_rows,
                "model_versions": versions, "verify": verify.stdout.strip()}

    def ledger_epsilon(self) -> float:
        """The run's ε for `anyone` at the manifest's δ, as `ledger verify` recomputes it."""
        verify = self.coordinator("ledger", "verify", "--db", str(self.db)).stdout
        # "run campaign: ok — N entries, … ε = X (anyone) at δ = …"
        for part in verify.split(","):
            part = part.strip()
            if part.startswith("ε = "):
                return float(part.split()[2])
        fail(f"no ε in `ledger verify`'s output: {verify}")

    def ledger_spending_rounds(self) -> set:
        """Rounds whose ε the ledger spent: charged (an update arrived), committed, or whose
        release was recorded (distributed mode)."""
        shown = self.coordinator("ledger", "show", "--db", str(self.db), "--run", "campaign").stdout
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
    c.start_coordinator()
    c.sleep_keeping_devices(3.0)
    started = time.time()
    for k in range(1, a.kills + 1):
        gap = c.rng.uniform(a.min_gap, a.max_gap)
        c.sleep_keeping_devices(gap)
        before = c.rounds_committed()
        c.kill_coordinator()
        c.start_coordinator()
        print(f"kill {k}/{a.kills} after {gap:.2f} s: {before} rounds committed", flush=True)
    # The devices carry on: a round commits after the last restart.
    target = c.rounds_committed() + 1
    deadline = time.time() + a.carry_on_seconds
    while c.rounds_committed() < target:
        if time.time() > deadline:
            fail(f"no round committed within {a.carry_on_seconds} s of the last restart")
        c.sleep_keeping_devices(0.5)
    elapsed = time.time() - started
    c.stop_devices()
    c.server.send_signal(signal.SIGTERM)
    c.server.wait(timeout=30)
    figures = c.check_ledger()
    figures.update(c.check_epsilon())
    figures.update({"seconds": round(elapsed, 1), "device_starts": c.device_starts,
                    "device_exits": c.device_exits})
    return figures


def device_campaign(c: Campaign) -> dict:
    a = c.args
    c.start_coordinator()
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
    c.server.send_signal(signal.SIGTERM)
    c.server.wait(timeout=30)
    figures = c.check_ledger()
    figures.update(c.check_epsilon())
    con = sqlite3.connect(f"file:{c.db}?mode=ro", uri=True)
    published = {v: sha for v, sha in con.execute(
        "SELECT version, sha256 FROM model_versions WHERE run_id = 'campaign'")}
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
            n = con.execute("SELECT count(*) FROM participations WHERE run_id = 'campaign' AND device_id = ?",
                            (enrolment[0],)).fetchone()[0]
            counted[i] = n
            released = len(c.device_budget(i)["uploads"])
            if released < n:
                fail(f"device {i} recorded {released} releases, the coordinator counted {n} of its updates")
    con.close()
    resumed = sum((c.tmp / f"device-{i}.log").read_text(errors="replace").count("resumed from byte")
                  for i in range(a.devices))
    figures.update({"seconds": round(elapsed, 1), "device_starts": c.device_starts,
                    "downloads_resumed": resumed, "participations_counted": counted})
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", required=True, help="where fedpref-coordinator and fedpref-device are")
    parser.add_argument("--target", choices=["coordinator", "device"], default="coordinator")
    parser.add_argument("--mode", choices=["local", "distributed"], default="local")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--min-gap", type=float, default=0.2, help="shortest time before a kill, s")
    parser.add_argument("--max-gap", type=float, default=3.0, help="longest time before a kill, s")
    parser.add_argument("--carry-on-seconds", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        c = Campaign(args, Path(tmp))
        try:
            c.set_up()
            figures = coordinator_campaign(c) if args.target == "coordinator" else device_campaign(c)
        finally:
            c.stop_devices()
            if c.server is not None and c.server.poll() is None:
                c.server.kill()
            if os.environ.get("FEDPREF_SHOW_LOG"):
                print((Path(tmp) / "coordinator.log").read_text(errors="replace")[-20000:])
                for i in range(args.devices):
                    print((Path(tmp) / f"device-{i}.log").read_text(errors="replace")[-3000:])
    print(f"crash campaign ({args.target}, {args.mode}, {args.kills} kills, seed {args.seed}): ok "
          + json.dumps(figures, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
