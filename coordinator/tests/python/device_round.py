#!/usr/bin/env python3
"""fedpref.v1 from a second gRPC implementation (Python grpcio).

Generates Python stubs from proto/ with grpcio-tools, sets a coordinator up the way docs/operators.md
does (`init`, `run create`, `serve` on free loopback ports), then over TLS: the gRPC health
check, and one full device round (Enroll, CheckIn, DownloadModel with its SHA-256 checked,
UploadUpdate), and finally, over the admin service, the committed round and an intact ledger.

    python3 coordinator/tests/python/device_round.py --bin target/debug/fedpref-coordinator

Needs `grpcio-tools` and `grpcio-health-checking` (`.ci/run` installs them). Exit 0 and
"python client: ok" on success; any failure raises with what went wrong.
"""

import argparse
import hashlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import grpc_tools
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

MANIFEST = """
title = "Python client check"
purpose = "Prove fedpref.v1 against a second gRPC implementation"
owner = "ci@example.com"
privacy_mode = "central"
rounds = 1
clip_norm = 1.0
noise_multiplier = 1.0

[budget]
epsilon = 10.0
delta = 1e-6

[sampling]
kind = "cohort"
target_size = 1
minimum_size = 1
round_seconds = 2

[server_optimizer]
kind = "fedavg"

[model]
items = 5
factors = 2

[opt_out_policy]
consent_model = "opt-in"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_stubs(proto_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(proto_dir)) for p in (proto_dir / "fedpref" / "v1").glob("*.proto"))
    args = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *files]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {files}")
    for pkg in (out / "fedpref", out / "fedpref" / "v1"):
        (pkg / "__init__.py").touch()
    sys.path.insert(0, str(out))


def wait_for(channel: grpc.Channel, seconds: float = 30.0) -> None:
    grpc.channel_ready_future(channel).result(timeout=seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True, help="the fedpref-coordinator binary")
    parser.add_argument("--proto-dir", default=str(Path(__file__).resolve().parents[3] / "proto"))
    args = parser.parse_args()
    binary = str(Path(args.bin).resolve())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_stubs(Path(args.proto_dir), tmp / "gen")
        from fedpref.v1 import admin_pb2, admin_pb2_grpc, common_pb2, device_pb2, device_pb2_grpc

        d = tmp / "fp"
        subprocess.run([binary, "init", "--dir", str(d)], check=True, stdout=subprocess.DEVNULL)
        (tmp / "check.toml").write_text(MANIFEST)
        subprocess.run(
            [binary, "run", "create", "--db", str(d / "coordinator.db"), "--manifest", str(tmp / "check.toml"),
             "--id", "python-check"],
            check=True, stdout=subprocess.DEVNULL,
        )
        device_port, admin_port, metrics_port = free_port(), free_port(), free_port()
        server = subprocess.Popen(
            [binary, "serve", "--config", str(d / "coordinator.toml"),
             "--device-addr", f"127.0.0.1:{device_port}", "--admin-addr", f"127.0.0.1:{admin_port}",
             "--metrics-addr", f"127.0.0.1:{metrics_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=(d / "tls" / "cert.pem").read_bytes())
            options = [("grpc.ssl_target_name_override", "localhost")]
            device_channel = grpc.secure_channel(f"127.0.0.1:{device_port}", creds, options)
            admin_channel = grpc.secure_channel(f"127.0.0.1:{admin_port}", creds, options)
            wait_for(device_channel)
            wait_for(admin_channel)

            health = health_pb2_grpc.HealthStub(device_channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="fedpref.v1.DeviceService")).status
            assert status == health_pb2.HealthCheckResponse.SERVING, f"health: {status}"

            devices = device_pb2_grpc.DeviceServiceStub(device_channel)
            app_key = (d / "app.key").read_text().strip()
            enrolled = devices.Enroll(device_pb2.EnrollRequest(app_key=app_key, sdk_version="0.1.0"))
            auth = [("authorization", f"Bearer {enrolled.device_token}")]

            answer = devices.CheckIn(
                device_pb2.CheckInRequest(
                    sdk_version="0.1.0",
                    eligibility=device_pb2.Eligibility(device_conditions_met=True, privacy_budget_available=True),
                ),
                metadata=auth,
            )
            assert answer.WhichOneof("outcome") == "task", f"expected a task, got {answer}"
            task = answer.task

            content, sha = b"", b""
            for chunk in devices.DownloadModel(
                device_pb2.DownloadModelRequest(run_id=task.run_id, model_version=task.model.model_version),
                metadata=auth,
            ):
                assert chunk.offset == len(content), "chunks arrive in order"
                content += chunk.content
                sha = chunk.model_sha256
            assert hashlib.sha256(content).digest() == sha == task.model.sha256, "model SHA-256"
            assert len(content) == task.model.size_bytes

            def upload_messages():
                yield device_pb2.UploadUpdateRequest(
                    header=device_pb2.UpdateHeader(
                        task=device_pb2.TaskRef(run_id=task.run_id, round_id=task.round_id, task_token=task.task_token),
                        base_model_version=task.model.model_version,
                        tensors=list(task.update_tensors),
                        privacy_mode=task.privacy_mode,
                        clip_norm=task.clip_norm,
                        noise_multiplier=task.noise_multiplier,
                    )
                )
                step = max(8, min(task.max_chunk_bytes or 1024, 1024))
                for index, spec in enumerate(task.update_tensors):
                    n = 1
                    for dim in spec.shape:
                        n *= dim
                    fmt = "d" if spec.dtype == common_pb2.DTYPE_F64 else "f"
                    data = struct.pack(f"<{n}{fmt}", *([0.01] * n))
                    for offset in range(0, len(data), step):
                        yield device_pb2.UploadUpdateRequest(
                            chunk=device_pb2.TensorChunk(
                                tensor_index=index, offset=offset, content=data[offset:offset + step]
                            )
                        )

            receipt = devices.UploadUpdate(upload_messages(), metadata=auth)
            assert receipt.round_id == task.round_id, f"receipt {receipt}"

            admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
            admin_auth = [("authorization", f"Bearer {(d / 'admin.token').read_text().strip()}")]
            deadline = time.time() + 30
            while True:
                run = admin.GetRun(admin_pb2.GetRunRequest(run_id="python-check"), metadata=admin_auth)
                if run.rounds_committed >= 1:
                    break
                if time.time() > deadline:
                    raise SystemExit(f"the round never committed: {run}")
                time.sleep(0.2)
            verification = admin.VerifyLedger(admin_pb2.VerifyLedgerRequest(run_id="python-check"), metadata=admin_auth)
            assert verification.intact, f"ledger: {verification}"
            print(f"python client: ok (grpcio {grpc.__version__}; round {task.round_id} committed, "
                  f"{verification.entries_checked} ledger entries intact)")
            return 0
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main())
