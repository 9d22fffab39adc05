//! Load: N devices, each on its own TLS connection to a real `fedpref-coordinator serve` on
//! loopback, upload a 16,369-parameter f32 update at once; beside it, the same payloads sent to a
//! plain tonic server that only drains `UploadUpdate` (the transport ceiling), in the same run and
//! in a process of its own, like the coordinator.
//!
//! `cargo bench -p fedpref-coordinator --bench upload_load [-- --devices 100,1000,5000]`
//!
//! Prints, per N: uploads per second and p50/p99 latency for fedpref and for the ceiling, their
//! ratio, and the coordinator process's resident and peak memory (from /proc) after the uploads.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedpref_proto::v1 as pb;
use fedpref_proto::v1::device_service_client::DeviceServiceClient;
use fedpref_proto::v1::device_service_server::{DeviceService, DeviceServiceServer};
use fedpref_proto::v1::upload_update_request::Part;
use tokio_stream::Stream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

const ITEMS: u64 = 1023;
const FACTORS: u64 = 15;

/// DeviceService that drains uploads and answers nothing else: the transport ceiling.
struct Drain;

type Chunks = Pin<Box<dyn Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl DeviceService for Drain {
    type DownloadModelStream = Chunks;
    async fn enroll(
        &self,
        _: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        Err(Status::unimplemented("drain"))
    }
    async fn check_in(
        &self,
        _: Request<pb::CheckInRequest>,
    ) -> Result<Response<pb::CheckInResponse>, Status> {
        Err(Status::unimplemented("drain"))
    }
    async fn download_model(
        &self,
        _: Request<pb::DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        Err(Status::unimplemented("drain"))
    }
    async fn upload_update(
        &self,
        request: Request<Streaming<pb::UploadUpdateRequest>>,
    ) -> Result<Response<pb::UploadReceipt>, Status> {
        let mut stream = request.into_inner();
        let mut bytes = 0u64;
        while let Some(m) = stream.message().await? {
            if let Some(Part::Chunk(c)) = m.part {
                bytes += c.content.len() as u64;
            }
        }
        Ok(Response::new(pb::UploadReceipt {
            bytes_received: bytes,
            ..Default::default()
        }))
    }
    async fn decline_task(
        &self,
        _: Request<pb::DeclineTaskRequest>,
    ) -> Result<Response<pb::DeclineTaskResponse>, Status> {
        Err(Status::unimplemented("drain"))
    }
    async fn report_metrics(
        &self,
        _: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        Err(Status::unimplemented("drain"))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn channel(port: u16, ca: &str) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = Channel::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await;
        match attempt {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("cannot connect to 127.0.0.1:{port}: {e}"),
        }
    }
}

fn authed<T>(m: T, token: &str) -> Request<T> {
    let mut r = Request::new(m);
    r.metadata_mut().insert(
        fedpref_proto::metadata::AUTHORIZATION,
        fedpref_proto::metadata::bearer(token).parse().unwrap(),
    );
    r
}

fn messages(task: &pb::Task) -> Vec<pb::UploadUpdateRequest> {
    let mut tensors = vec![];
    let mut out = vec![];
    for spec in &task.update_tensors {
        let mut spec = spec.clone();
        spec.dtype = pb::Dtype::F32 as i32;
        tensors.push(spec);
    }
    out.push(pb::UploadUpdateRequest {
        part: Some(Part::Header(pb::UpdateHeader {
            task: Some(pb::TaskRef {
                run_id: task.run_id.clone(),
                round_id: task.round_id,
                task_token: task.task_token.clone(),
            }),
            base_model_version: task.model.as_ref().map(|m| m.model_version).unwrap_or(1),
            tensors: tensors.clone(),
            privacy_mode: task.privacy_mode,
            clip_norm: task.clip_norm,
            noise_multiplier: task.noise_multiplier,
            ..Default::default()
        })),
    });
    let step = task.max_chunk_bytes.max(4) as usize / 4 * 4;
    for (i, spec) in tensors.iter().enumerate() {
        let n: u64 = spec.shape.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|j| ((j % 7) as f32 * 0.001).to_le_bytes())
            .collect();
        for (k, piece) in bytes.chunks(step).enumerate() {
            out.push(pb::UploadUpdateRequest {
                part: Some(Part::Chunk(pb::TensorChunk {
                    tensor_index: i as u32,
                    offset: (k * step) as u64,
                    content: piece.to_vec().into(),
                })),
            });
        }
    }
    out
}

/// Uploads every device's messages at once; returns (uploads/s, p50, p99) in ms.
async fn blast(
    clients: Vec<(
        DeviceServiceClient<Channel>,
        String,
        Vec<pb::UploadUpdateRequest>,
    )>,
) -> (f64, f64, f64) {
    let n = clients.len();
    let start = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut handles = vec![];
    for (mut client, token, msgs) in clients {
        let start = Arc::clone(&start);
        handles.push(tokio::spawn(async move {
            start.wait().await;
            let t = Instant::now();
            client
                .upload_update(authed(tokio_stream::iter(msgs), &token))
                .await
                .expect("upload accepted");
            t.elapsed()
        }));
    }
    start.wait().await;
    let t0 = Instant::now();
    let mut latencies = vec![];
    for h in handles {
        latencies.push(h.await.unwrap());
    }
    let total = t0.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| latencies[((n as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3;
    (n as f64 / total, pct(0.5), pct(0.99))
}

fn proc_memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time the process has run on all its threads so far, in nanoseconds (the first field of
/// each thread's `/proc/PID/task/TID/schedstat`). Unlike a rate, it hardly depends on what
/// else the machine is doing, so it shows the coordinator's cost per upload even on a busy
/// machine.
fn proc_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Minor page faults of the whole process (`/proc/PID/stat`) and context switches summed over
/// its threads (`/proc/PID/task/*/status`): counts, so they barely depend on the machine's load.
fn proc_faults_and_switches(pid: u32) -> (u64, u64) {
    let faults = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = &s[s.rfind(')')? + 2..];
            rest.split_whitespace().nth(7)?.parse().ok()
        })
        .unwrap_or(0);
    let switches = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
                .flat_map(|s| {
                    s.lines()
                        .filter(|l| l.contains("ctxt_switches:"))
                        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                        .collect::<Vec<_>>()
                })
                .sum()
        })
        .unwrap_or(0);
    (faults, switches)
}

fn write_setup(dir: &Path, n: usize, device_port: u16, admin_port: u16) -> String {
    let cert = fedpref_coordinator::config::self_signed_localhost().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write("cert.pem", &cert.certificate_pem);
    write("key.pem", &cert.private_key_pem);
    write("app.key", "load-test-app-key-0123456789");
    write("admin.token", "load-test-admin-token-0123456789");
    write(
        "coordinator.toml",
        &format!(
            "[listen]\ndevice = \"127.0.0.1:{device_port}\"\nadmin = \"127.0.0.1:{admin_port}\"\n\
             [store]\npath = \"coordinator.db\"\n[tls]\ncertificate = \"cert.pem\"\nprivate_key = \"key.pem\"\n\
             [auth]\napp_key_file = \"app.key\"\nadmin_token_file = \"admin.token\"\n\
             [limits]\nmax_upload_bytes = 1048576\nmax_upload_chunks = 64\nmax_chunk_bytes = 65536\n\
             download_chunk_bytes = 65536\ndevice_requests_per_second = 1000.0\ndevice_burst = 100\n\
             max_concurrent_requests = 20000\ntick_millis = 50\n"
        ),
    );
    let manifest = format!(
        r#"title = "Load"
purpose = "Measure uploads"
owner = "bench@example.com"
privacy_mode = "local"
rounds = 10
clip_norm = 1.0
noise_multiplier = 2.0
[budget]
epsilon = 1000000.0
delta = 1e-6
[sampling]
kind = "cohort"
target_size = {n}
minimum_size = 1
round_seconds = 600
[server_optimizer]
kind = "fedavg"
[model]
items = {ITEMS}
factors = {FACTORS}
[opt_out_policy]
consent_model = "opt-in"
"#
    );
    let m = fedpref_coordinator::manifest::RunManifest::from_toml(&manifest, "load.toml").unwrap();
    let mut store = fedpref_coordinator::store::Store::open(&dir.join("coordinator.db")).unwrap();
    fedpref_coordinator::coordinator::create_run(&mut store, "load", &m, 1).unwrap();
    cert.certificate_pem
}

async fn measure(n: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (device_port, admin_port) = (free_port(), free_port());
    let ca = write_setup(dir.path(), n, device_port, admin_port);
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_fedpref-coordinator"))
        .args(["serve", "--config"])
        .arg(dir.path().join("coordinator.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let idle = {
        channel(device_port, &ca).await;
        proc_memory(server.id()).0
    };

    // N devices, each its own TLS connection: enrol, check in, take a task.
    let mut setup = vec![];
    for _ in 0..n {
        let ca = ca.clone();
        setup.push(tokio::spawn(async move {
            let mut client = DeviceServiceClient::new(channel(device_port, &ca).await);
            // Enrolment is rate-limited per peer address, and every simulated device shares
            // 127.0.0.1: back off as the server says, as the SDK does.
            let token = loop {
                let attempt = client
                    .enroll(pb::EnrollRequest {
                        app_key: "load-test-app-key-0123456789".into(),
                        sdk_version: "0.1.0".into(),
                        grant: None,
                    })
                    .await;
                match attempt {
                    Ok(r) => break r.into_inner().device_token,
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err(s) => panic!("enrol: {s:?}"),
                }
            };
            let answer = client
                .check_in(authed(
                    pb::CheckInRequest {
                        sdk_version: "0.1.0".into(),
                        held_model: None,
                        eligibility: Some(pb::Eligibility {
                            device_conditions_met: true,
                            privacy_budget_available: true,
                        }),
                    },
                    &token,
                ))
                .await
                .unwrap()
                .into_inner();
            let Some(pb::check_in_response::Outcome::Task(task)) = answer.outcome else {
                panic!("no task: {answer:?}")
            };
            (client, token, messages(&task))
        }));
    }
    let mut clients = vec![];
    for s in setup {
        clients.push(s.await.unwrap());
    }
    let payloads: Vec<Vec<pb::UploadUpdateRequest>> = clients.iter().map(|c| c.2.clone()).collect();
    // N devices connected (enrolled, holding a task), none uploading yet.
    let connected = proc_memory(server.id()).0;
    let cpu_before = proc_cpu_ns(server.id());
    let counts_before = proc_faults_and_switches(server.id());
    let (fed_rate, fed_p50, fed_p99) = blast(clients).await;
    let fed_cpu = (proc_cpu_ns(server.id()) - cpu_before) as f64 / n as f64 / 1e3;
    let counts = proc_faults_and_switches(server.id());
    let fed_faults = (counts.0 - counts_before.0) as f64 / n as f64;
    let fed_switches = (counts.1 - counts_before.1) as f64 / n as f64;
    let (rss, peak) = proc_memory(server.id());
    let _ = server.kill();
    let _ = server.wait();

    // The ceiling: the same payloads to a server that only drains them, same TLS, in its own
    // process (this binary again) so that it competes for the cores as the coordinator did.
    let echo_port = free_port();
    let mut echo = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--serve-drain")
        .arg(echo_port.to_string())
        .arg(dir.path().join("cert.pem"))
        .arg(dir.path().join("key.pem"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut echo_clients = vec![];
    for msgs in payloads {
        let mut client = DeviceServiceClient::new(channel(echo_port, &ca).await);
        // The same two calls a fedpref device made before uploading (the drain answers
        // UNIMPLEMENTED), so that each connection's HTTP/2 state matches.
        let _ = client
            .enroll(pb::EnrollRequest {
                app_key: "load-test-app-key-0123456789".into(),
                sdk_version: "0.1.0".into(),
                grant: None,
            })
            .await;
        let _ = client
            .check_in(authed(
                pb::CheckInRequest {
                    sdk_version: "0.1.0".into(),
                    held_model: None,
                    eligibility: Some(pb::Eligibility {
                        device_conditions_met: true,
                        privacy_budget_available: true,
                    }),
                },
                "dev-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ))
            .await;
        echo_clients.push((client, "x".to_string(), msgs));
    }
    // Its memory with N connected after two calls each: what TLS and HTTP/2 themselves hold
    // per connection.
    let echo_connected = proc_memory(echo.id()).0;
    let cpu_before = proc_cpu_ns(echo.id());
    let counts_before = proc_faults_and_switches(echo.id());
    let (echo_rate, echo_p50, echo_p99) = blast(echo_clients).await;
    let echo_cpu = (proc_cpu_ns(echo.id()) - cpu_before) as f64 / n as f64 / 1e3;
    let counts = proc_faults_and_switches(echo.id());
    let echo_faults = (counts.0 - counts_before.0) as f64 / n as f64;
    let echo_switches = (counts.1 - counts_before.1) as f64 / n as f64;
    let echo_after = proc_memory(echo.id()).0;
    let _ = echo.kill();
    let _ = echo.wait();
    format!(
        "| {n} | {fed_rate:.0} | {fed_p50:.1} / {fed_p99:.1} | {echo_rate:.0} | {echo_p50:.1} / {echo_p99:.1} | {:.0} % | {fed_cpu:.0} / {echo_cpu:.0} | {:.0} % | {fed_faults:.1} / {echo_faults:.1} | {fed_switches:.1} / {echo_switches:.1} | {idle:.0} | {connected:.0} | {rss:.0} | {peak:.0} | {echo_connected:.0} / {echo_after:.0} |",
        100.0 * fed_rate / echo_rate,
        100.0 * echo_cpu / fed_cpu,
    )
}

/// The ceiling's server process: `--serve-drain PORT CERT KEY`, on a runtime built like the
/// coordinator's (`#[tokio::main]`'s default multi-thread runtime).
fn serve_drain(args: &[String]) {
    let [port, cert, key, ..] = args else {
        panic!("--serve-drain PORT CERT KEY")
    };
    let identity = Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap());
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(
            Server::builder()
                .tls_config(ServerTlsConfig::new().identity(identity))
                .unwrap()
                .max_concurrent_streams(Some(20_000))
                .tcp_nodelay(true)
                .add_service(DeviceServiceServer::new(Drain).max_decoding_message_size(1 << 20))
                .serve(addr),
        )
        .unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let devices: Vec<usize> = args
        .iter()
        .position(|a| a == "--devices")
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.split(',')
                .map(|x| x.parse().expect("--devices takes numbers"))
                .collect()
        })
        .unwrap_or_else(|| vec![100, 1000, 5000]);
    if let Some(i) = args.iter().position(|a| a == "--serve-drain") {
        serve_drain(&args[i + 1..]);
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` (criterion's convention): nothing to list.
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "16,369-parameter f32 update ({} bytes) per device, TLS on loopback, one connection per device\n",
        (ITEMS * (FACTORS + 1) + 1) * 4
    );
    println!(
        "| devices | fedpref uploads/s | fedpref p50 / p99 ms | ceiling uploads/s | ceiling p50 / p99 ms | fedpref / ceiling | server CPU µs per upload: fedpref / ceiling | ceiling / fedpref CPU | page faults per upload: fedpref / ceiling | context switches per upload: fedpref / ceiling | coordinator RSS idle MiB | RSS with N connected MiB | RSS after uploads MiB | peak RSS MiB | ceiling RSS: N connected / after uploads MiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in devices {
        println!("{}", runtime.block_on(measure(n)));
    }
}
