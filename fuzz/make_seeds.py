#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs into fuzz/corpus/<target>/seed-*.

The protobuf seeds are real traffic: a coordinator is started on 127.0.0.1 (as the README sets
it up), runs of each privacy mode are created, and what devices and administrators receive —
check-in answers, model snapshots, stage views, stored manifests — is written as it arrives.
Upload streams are built for the targets' own manifests (fuzz/src/lib.rs). The TOML and JSON
Lines seeds are the repository's example manifests, `init`'s configuration and the SDK's
documented records.

    python3 fuzz/make_seeds.py --bin target/debug/fedpref-coordinator

Needs `grpcio-tools` (as coordinator/tests/python/device_round.py does).
"""

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "coordinator" / "tests" / "python"))
from device_round import free_port, generate_stubs, wait_for  # noqa: E402

SMALL = """
title = "Seeds"
purpose = "Fuzz seeds"
owner = "fuzz@example.com"
privacy_mode = "{mode}"
rounds = 5
clip_norm = 1.0
noise_multiplier = 1.0

[budget]
epsilon = 20.0
delta = 1e-6

[sampling]
kind = "cohort"
target_size = 3
minimum_size = 3
round_seconds = 600

[server_optimizer]
kind = "fedavg"

[model]
items = 3
factors = 2

[opt_out_policy]
consent_model = "opt-in"
"""

DISTRIBUTED_EXTRA = """
[secure_aggregation]
noise = "discrete_gaussian"
dropout_rate = 0.3
corruption_rate = 0.0
"""

JSONL = [
    '{"type":"rating","item":"i0","value":5.0,"at":"2026-05-30T20:00:00Z"}',
    '{"type":"thumbs","item":"i1","value":"up","at":"2026-05-30T20:00:00Z"}',
    '{"type":"dwell","item":"i2","seconds":31.5,"at":"2026-05-30T20:00:00Z"}',
    '{"type":"save","item":"i4","at":"2026-05-30T20:00:00Z"}',
    '{"type":"dismiss","item":"i5","at":"2026-05-30T20:00:00Z"}',
    '{"type":"interest","topic":"Comedy"}',
    '{"type":"role","value":"student"}',
    '{"type":"goal","value":"learn"}',
    '{"type":"consent","topic":"Health","personalise":false}',
    '{"type":"item","item":"i9","topics":["Comedy"],"sensitive":false,"title":"A film","popularity":0.5}',
]


def ld(message) -> bytes:
    """A length-delimited message, as prost's decode_length_delimited reads it."""
    from google.protobuf.internal.encoder import _VarintBytes
    body = message.SerializeToString()
    return _VarintBytes(len(body)) + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True, help="the fedpref-coordinator binary")
    args = parser.parse_args()
    binary = str(Path(args.bin).resolve())
    corpus = ROOT / "fuzz" / "corpus"

    def seed(target: str, name: str, data: bytes) -> None:
        (corpus / target).mkdir(parents=True, exist_ok=True)
        (corpus / target / f"seed-{name}").write_bytes(data)

    for toml in sorted((ROOT / "coordinator" / "manifests").glob("*.toml")):
        seed("manifest_toml", toml.stem, toml.read_bytes())
    seed("ingest_jsonl", "records", ("\n".join(JSONL) + "\n").encode())
    for i, line in enumerate(JSONL):
        seed("ingest_jsonl", f"record-{i}", line.encode())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_stubs(ROOT / "proto", tmp / "gen")
        from fedpref.v1 import (admin_pb2, admin_pb2_grpc, common_pb2, device_pb2, device_pb2_grpc,
                                secagg_pb2, secagg_pb2_grpc)

        # Uploads for the fuzz targets' manifests (3 items, 2 factors): local, central,
        # distributed; default limits, then the small ones (first byte | 0x80).
        def upload_seed(select: int, mode: int, tensors, data: list, step: int) -> bytes:
            out = bytes([select]) + ld(device_pb2.UploadUpdateRequest(header=device_pb2.UpdateHeader(
                task=device_pb2.TaskRef(run_id="r", round_id=1, task_token="t"), base_model_version=1,
                tensors=tensors, privacy_mode=mode, clip_norm=1.0, noise_multiplier=1.0)))
            for index, blob in enumerate(data):
                for offset in range(0, len(blob), step):
                    out += ld(device_pb2.UploadUpdateRequest(chunk=device_pb2.TensorChunk(
                        tensor_index=index, offset=offset, content=blob[offset:offset + step])))
            return out

        plain = [common_pb2.TensorSpec(name="item_factors", shape=[3, 2], dtype=common_pb2.DTYPE_F64),
                 common_pb2.TensorSpec(name="item_biases", shape=[3], dtype=common_pb2.DTYPE_F64),
                 common_pb2.TensorSpec(name="global_offset", shape=[], dtype=common_pb2.DTYPE_F64)]
        plain_data = [struct.pack("<6d", *[0.1] * 6), struct.pack("<3d", *[0.2] * 3), struct.pack("<d", 0.3)]
        masked = [common_pb2.TensorSpec(name="masked_update", shape=[10], dtype=common_pb2.DTYPE_U32)]
        masked_data = [struct.pack("<10I", *range(10))]
        for small in (0, 0x80):
            step = 16 if small else 1024
            seed("upload", f"local-{small}", upload_seed(0 | small, common_pb2.PRIVACY_MODE_LOCAL, plain,
                                                         plain_data, step))
            seed("upload", f"central-{small}", upload_seed(1 | small, common_pb2.PRIVACY_MODE_CENTRAL, plain,
                                                           plain_data, step))
            seed("upload", f"distributed-{small}", upload_seed(
                2 | small, common_pb2.PRIVACY_MODE_DISTRIBUTED, masked, masked_data, step))

        d = tmp / "fp"
        subprocess.run([binary, "init", "--dir", str(d)], check=True, stdout=subprocess.DEVNULL)
        seed("config_toml", "init", (d / "coordinator.toml").read_bytes())
        db = d / "coordinator.db"
        runs = [("central", SMALL.format(mode="central")),
                ("distributed", SMALL.format(mode="distributed") + DISTRIBUTED_EXTRA)]
        for toml in sorted((ROOT / "coordinator" / "manifests").glob("*.toml")):
            # Only their manifests are wanted; created last, check-ins reach them last.
            runs.append((f"example-{toml.stem}".replace("_", "-"), toml.read_text()))
        for run_id, text in runs:
            (tmp / f"{run_id}.toml").write_text(text)
            subprocess.run([binary, "run", "create", "--db", str(db), "--manifest", str(tmp / f"{run_id}.toml"),
                            "--id", run_id], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        device_port, admin_port, metrics_port = free_port(), free_port(), free_port()
        server = subprocess.Popen(
            [binary, "serve", "--config", str(d / "coordinator.toml"),
             "--device-addr", f"127.0.0.1:{device_port}", "--admin-addr", f"127.0.0.1:{admin_port}",
             "--metrics-addr", f"127.0.0.1:{metrics_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=(d / "tls" / "cert.pem").read_bytes())
            options = [("grpc.ssl_target_name_override", "localhost")]
            device_channel = grpc.secure_channel(f"127.0.0.1:{device_port}", creds, options)
            admin_channel = grpc.secure_channel(f"127.0.0.1:{admin_port}", creds, options)
            wait_for(device_channel)
            wait_for(admin_channel)
            devices = device_pb2_grpc.DeviceServiceStub(device_channel)
            secagg = secagg_pb2_grpc.SecureAggregationServiceStub(device_channel)
            admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
            app_key = (d / "app.key").read_text().strip()
            admin_auth = [("authorization", f"Bearer {(d / 'admin.token').read_text().strip()}")]

            for run_id, _ in runs:
                run = admin.GetRun(admin_pb2.GetRunRequest(run_id=run_id), metadata=admin_auth)
                seed("admin_manifest", run_id, run.manifest.SerializeToString())

            def device():
                r = devices.Enroll(device_pb2.EnrollRequest(app_key=app_key, sdk_version="0.1.0"))
                return [("authorization", f"Bearer {r.device_token}")]

            def check_in(auth):
                return devices.CheckIn(device_pb2.CheckInRequest(
                    sdk_version="0.1.0",
                    eligibility=device_pb2.Eligibility(device_conditions_met=True, privacy_budget_available=True)),
                    metadata=auth)

            # Central: three devices take the round's three places.
            for i in range(3):
                auth = device()
                answer = check_in(auth)
                assert answer.task.run_id == "central", answer
                if i == 0:
                    seed("device_task", "central", answer.SerializeToString())
                    content = b"".join(c.content for c in devices.DownloadModel(device_pb2.DownloadModelRequest(
                        run_id="central", model_version=answer.task.model.model_version), metadata=auth))
                    seed("model_snapshot", "central", content)
            # Distributed: three devices advertise keys, then read their key directories.
            members = []
            for i in range(3):
                auth = device()
                answer = check_in(auth)
                assert answer.task.run_id == "distributed", answer
                members.append((auth, answer.task))
                seed("device_task", f"distributed-{i}", answer.SerializeToString())
            for i, (auth, task) in enumerate(members):
                ref = device_pb2.TaskRef(run_id=task.run_id, round_id=task.round_id, task_token=task.task_token)
                secagg.AdvertiseKeys(secagg_pb2.AdvertiseKeysRequest(
                    task=ref, encryption_public_key=os.urandom(32), masking_public_key=os.urandom(32)),
                    metadata=auth)
            deadline = time.time() + 30
            for i, (auth, task) in enumerate(members):
                ref = device_pb2.TaskRef(run_id=task.run_id, round_id=task.round_id, task_token=task.task_token)
                while True:
                    stage = secagg.GetStage(secagg_pb2.GetStageRequest(task=ref), metadata=auth)
                    if stage.WhichOneof("input") == "key_directory" or time.time() > deadline:
                        break
                    time.sleep(0.2)
                assert stage.WhichOneof("input") == "key_directory", stage
                dimension = task.secure_aggregation_round.dimension
                assert 1 <= dimension <= 16, dimension
                seed("stage_views", f"directory-{i}",
                     bytes([dimension - 1]) + ld(task) + ld(stage.key_directory)
                     + ld(secagg_pb2.ShareInbox()) + ld(secagg_pb2.UnmaskingPlan()))
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    for target in sorted(p.name for p in corpus.iterdir()):
        print(f"{target}: {len(list((corpus / target).iterdir()))} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
