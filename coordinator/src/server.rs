//! `fedpref-coordinator serve`: the device and admin services on their own ports, over TLS
//! (rustls with ring), each with gRPC health and server reflection, plus the ticker that
//! closes rounds at their deadlines.
//!
//! [`start`] binds, opens the store and returns a [`Running`] server (tests use it with port
//! 0); [`Running::shutdown`] stops accepting, lets requests in progress finish (up to a grace
//! period), stops the ticker and finally takes the coordinator's lock, so a store transaction
//! in progress completes before the process exits. [`serve`] does all that until SIGINT or
//! SIGTERM.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedpref_proto::v1::admin_service_server::AdminServiceServer;
use fedpref_proto::v1::device_service_server::DeviceServiceServer;
use fedpref_proto::v1::secure_aggregation_service_server::SecureAggregationServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::{Config, ConfigError, MAX_CHUNK, read_secret};
use crate::coordinator::{Coordinator, CoordinatorError};
use crate::service::admin::AdminApi;
use crate::service::device::DeviceApi;
use crate::service::secagg::SecureAggregationApi;
use crate::service::{Shared, now_ms};

/// How long shutdown waits for requests in progress.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Longest a request may take until its response starts (a whole upload, since its answer
/// comes after the last chunk), so a stalled client cannot hold a concurrency permit forever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// A server that did not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration or a file it names.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Coordinator(#[from] CoordinatorError),
    /// A flag or setting is not allowed.
    #[error("{0}")]
    Refused(String),
    /// Binding or serving failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS identity or the gRPC transport failed.
    #[error("{what}: {message}")]
    Transport {
        /// What was being done.
        what: String,
        /// The error.
        message: String,
    },
}

/// Overrides from the command line.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// Replaces `listen.device`.
    pub device_addr: Option<SocketAddr>,
    /// Replaces `listen.admin`.
    pub admin_addr: Option<SocketAddr>,
    /// Replaces `listen.metrics`.
    pub metrics_addr: Option<SocketAddr>,
    /// Serve without TLS; refused unless both addresses are loopback.
    pub insecure_plaintext: bool,
}

/// A running server.
pub struct Running {
    /// Where DeviceService listens.
    pub device_addr: SocketAddr,
    /// Where AdminService listens.
    pub admin_addr: SocketAddr,
    /// Where `GET /metrics` is served, if a metrics address is configured.
    pub metrics_addr: Option<SocketAddr>,
    metrics_server: Option<JoinHandle<std::io::Result<()>>>,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    ticker: JoinHandle<()>,
    /// A replica's lease loop, which releases its leases when it stops.
    leases: Option<JoinHandle<()>>,
    coordinator: Arc<Mutex<Coordinator>>,
}

fn transport(what: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::Transport {
        what: what.to_string(),
        message: e.to_string(),
    }
}

/// Opens the store, binds both services and starts serving and ticking.
pub async fn start(config: &Config, options: &ServeOptions) -> Result<Running, ServerError> {
    let device_addr = options.device_addr.unwrap_or(config.listen.device);
    let admin_addr = options.admin_addr.unwrap_or(config.listen.admin);
    if device_addr == admin_addr && device_addr.port() != 0 {
        return Err(ServerError::Refused(
            "the device and admin services need different addresses".into(),
        ));
    }
    let tls = if options.insecure_plaintext {
        for (flag, addr) in [("device", device_addr), ("admin", admin_addr)] {
            if !addr.ip().is_loopback() {
                return Err(ServerError::Refused(format!(
                    "--insecure-plaintext is only allowed on loopback addresses; the {flag} address is {addr}"
                )));
            }
        }
        tracing::warn!(
            "serving WITHOUT TLS (--insecure-plaintext): tokens cross the loopback interface in clear text; never use this beyond local testing"
        );
        None
    } else {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| ServerError::Io {
                what: path.display().to_string(),
                source,
            })
        };
        let identity = Identity::from_pem(
            read(&config.tls.certificate)?,
            read(&config.tls.private_key)?,
        );
        Some(ServerTlsConfig::new().identity(identity))
    };
    // The admin port alone may ask for a client certificate; presenting one is optional (the
    // token still works), but one that the CA did not sign fails the handshake.
    let admin_tls = match (&tls, &config.auth.admin_client_ca) {
        (Some(tls), Some(ca)) => {
            let pem = std::fs::read(ca).map_err(|source| ServerError::Io {
                what: format!("auth.admin_client_ca ({})", ca.display()),
                source,
            })?;
            Some(
                tls.clone()
                    .client_ca_root(Certificate::from_pem(pem))
                    .client_auth_optional(true),
            )
        }
        (tls, _) => tls.clone(),
    };
    let app_key = read_secret(&config.auth.app_key_file, "auth.app_key_file")?;
    let admin_token = read_secret(&config.auth.admin_token_file, "auth.admin_token_file")?;
    // Opening the store and the first reads block (PostgreSQL's client too): off the runtime.
    let store_config = config.clone();
    let shared = tokio::task::spawn_blocking(move || {
        let mut coordinator = crate::replica::open(&store_config)?;
        // Checked when the configuration was read.
        let keys = crate::enrolment::GrantKeys::parse(&store_config.auth.enrolment_grant_keys)
            .map_err(|e| CoordinatorError::Refused(format!("auth.enrolment_grant_keys{e}")))?;
        let keys = match store_config
            .person_key()
            .map_err(|e| CoordinatorError::Refused(e.to_string()))?
        {
            Some(person_key) => keys.with_person_key(&person_key),
            None => keys,
        };
        if !keys.required() {
            let runs = coordinator.runs_counting_per_person()?;
            if !runs.is_empty() {
                return Err(CoordinatorError::Refused(format!(
                    "auth.enrolment_grant_keys is empty, but runs {runs:?} were created to count participation per person, which only enrolment grants make true: configure the keys again (a coordinator with them can also stop those runs)"
                )));
            }
        }
        coordinator.set_grant_keys(keys);
        Shared::new(
            coordinator,
            &app_key,
            &admin_token,
            store_config.limits.clone(),
        )
    })
    .await
    .map_err(|e| transport("opening the store", e))??;

    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Io {
                what: format!("binding the {what} service to {addr}"),
                source,
            })
    };
    let device_listener = bind(device_addr, "device").await?;
    let admin_listener = bind(admin_addr, "admin").await?;
    let device_addr = device_listener
        .local_addr()
        .map_err(|source| ServerError::Io {
            what: "device address".into(),
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| ServerError::Io {
            what: "admin address".into(),
            source,
        })?;

    let (shutdown, _) = watch::channel(false);
    let signal = |tx: &watch::Sender<bool>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.changed().await;
        }
    };
    // One chunk plus the message's framing.
    let max_message = MAX_CHUNK as usize + 64 * 1024;
    let builder = |tls: &Option<ServerTlsConfig>| -> Result<Server, ServerError> {
        let mut b = Server::builder()
            .max_concurrent_streams(Some(config.limits.max_concurrent_requests.max(1)))
            .http2_keepalive_interval(Some(Duration::from_secs(60)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = &tls {
            b = b.tls_config(tls.clone()).map_err(|e| {
                transport(
                    "tls.certificate / tls.private_key / auth.admin_client_ca",
                    e,
                )
            })?;
        }
        Ok(b)
    };
    let reflection = || -> Result<_, ServerError> {
        let v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(fedpref_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| transport("reflection", e))?;
        let v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(fedpref_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| transport("reflection", e))?;
        Ok((v1, v1alpha))
    };

    let (device_health_reporter, device_health) = tonic_health::server::health_reporter();
    device_health_reporter
        .set_serving::<DeviceServiceServer<DeviceApi>>()
        .await;
    let (v1, v1alpha) = reflection()?;
    let device = builder(&tls)?
        .add_service(device_health)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(
            DeviceServiceServer::new(DeviceApi::new(Arc::clone(&shared)))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            SecureAggregationServiceServer::new(SecureAggregationApi::new(Arc::clone(&shared)))
                .max_decoding_message_size(max_message),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(device_listener), signal(&shutdown));

    let (admin_health_reporter, admin_health) = tonic_health::server::health_reporter();
    admin_health_reporter
        .set_serving::<AdminServiceServer<AdminApi>>()
        .await;
    let (v1, v1alpha) = reflection()?;
    let admin = builder(&admin_tls)?
        .add_service(admin_health)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(AdminServiceServer::new(AdminApi::new(Arc::clone(&shared))))
        .serve_with_incoming_shutdown(TcpListenerStream::new(admin_listener), signal(&shutdown));

    let (metrics_addr, metrics_server) = match options.metrics_addr.or(config.listen.metrics) {
        Some(addr) => {
            let listener = bind(addr, "metrics").await?;
            let local = listener.local_addr().map_err(|source| ServerError::Io {
                what: "metrics address".into(),
                source,
            })?;
            let metrics = Arc::clone(&shared.metrics);
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let metrics = Arc::clone(&metrics);
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4; charset=utf-8",
                            )],
                            metrics.render(),
                        )
                    }
                }),
            );
            let stop = signal(&shutdown);
            let task = tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
            });
            (Some(local), Some(task))
        }
        None => (None, None),
    };
    let servers = vec![tokio::spawn(device), tokio::spawn(admin)];
    let ticker = tokio::spawn(tick(
        Arc::clone(&shared),
        Duration::from_millis(config.limits.tick_millis),
        shutdown.subscribe(),
    ));
    let leases = config
        .replica
        .as_ref()
        .map(|r| crate::replica::spawn(&shared, r, shutdown.subscribe()));
    tracing::info!(%device_addr, %admin_addr, ?metrics_addr, tls = tls.is_some(), "serving");
    Ok(Running {
        device_addr,
        admin_addr,
        metrics_addr,
        metrics_server,
        shutdown,
        servers,
        ticker,
        leases,
        coordinator: shared.coordinator(),
    })
}

/// Ticks every engine (round deadlines) until shutdown.
async fn tick(shared: Arc<Shared>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Any change (or the sender gone) means stop.
            _ = stop.changed() => break,
            _ = interval.tick() => {
                let result = shared
                    .blocking(|c| {
                        c.tick_all(now_ms())
                            .map_err(|e| tonic::Status::internal(e.to_string()))
                    })
                    .await;
                if let Err(e) = result {
                    tracing::error!(error = %e.message(), "ticking the engines failed");
                }
            }
        }
    }
}

impl Running {
    /// The coordinator behind the services (for embedding programs and tests that read the
    /// store or an engine; take the lock only briefly, never across an await).
    pub fn coordinator(&self) -> Arc<Mutex<Coordinator>> {
        Arc::clone(&self.coordinator)
    }

    /// Stops accepting, waits up to [`SHUTDOWN_GRACE`] for requests in progress, stops the
    /// ticker, then waits for any store transaction in progress by taking the lock.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let _ = self.shutdown.send(true);
        let mut first_error = None;
        for server in self.servers {
            match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    first_error.get_or_insert(transport("serving", e));
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(transport("serving", e));
                }
                Err(_) => tracing::warn!("requests still in progress after the grace period"),
            }
        }
        if let Some(m) = self.metrics_server {
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, m).await;
        }
        let _ = self.ticker.await;
        if let Some(leases) = self.leases {
            let _ = leases.await;
        }
        let coordinator = self.coordinator;
        let _ = tokio::task::spawn_blocking(move || {
            // Whoever holds the lock is inside a store transaction; wait for it.
            drop(coordinator.lock());
        })
        .await;
        tracing::info!("stopped");
        first_error.map_or(Ok(()), Err)
    }
}

/// Serves until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn serve(config: &Config, options: &ServeOptions) -> Result<(), ServerError> {
    let running = start(config, options).await?;
    eprintln!(
        "fedpref-coordinator: devices on {}, admin on {} ({}); Ctrl-C to stop",
        running.device_addr,
        running.admin_addr,
        if options.insecure_plaintext {
            "PLAINTEXT"
        } else {
            "TLS"
        }
    );
    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; finishing requests in progress");
    running.shutdown().await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
