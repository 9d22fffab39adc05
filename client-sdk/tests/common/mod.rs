//! A coordinator for SDK tests: started in-process on 127.0.0.1 with TLS from a freshly
//! generated certificate, a fixed app key and admin token, and limits small enough to make
//! devices chunk their downloads and uploads.

#![allow(dead_code)] // each test file uses its own part of it

use fedpref_client_sdk::{CoordinatorClient, ParticipationConfig};
use fedpref_coordinator::config::{Config, Limits, self_signed_localhost};
use fedpref_coordinator::server::{Running, ServeOptions, start};
use fedpref_proto::metadata::bearer;
use fedpref_proto::v1::admin_service_client::AdminServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// The app key devices enrol with.
pub const APP_KEY: &str = "participation-app-key-0123456789";
/// The admin token.
pub const ADMIN_TOKEN: &str = "participation-admin-token-012345";

/// A running coordinator and the CA certificate devices trust.
pub struct TestServer {
    pub running: Running,
    pub ca_pem: String,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with_grant_keys(&[]).await
    }

    /// A coordinator that enrols only devices with an enrolment grant signed by one of `keys`
    /// (Ed25519 public keys, hex); none: grants are neither needed nor accepted.
    pub async fn start_with_grant_keys(keys: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cert = self_signed_localhost().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("cert.pem", &cert.certificate_pem);
        write("key.pem", &cert.private_key_pem);
        write("app.key", APP_KEY);
        write("admin.token", ADMIN_TOKEN);
        write("person.key", "test-person-key-0123456789abcdef-0123456789");
        let text = format!(
            r#"
[listen]
device = "127.0.0.1:0"
admin = "127.0.0.1:1"
[store]
path = "coordinator.db"
[tls]
certificate = "cert.pem"
private_key = "key.pem"
[auth]
app_key_file = "app.key"
admin_token_file = "admin.token"
enrolment_grant_keys = {keys:?}
person_key_file = "person.key"
"#
        );
        let mut config = Config::from_toml(&text, "test.toml", dir.path()).unwrap();
        config.limits = Limits {
            max_upload_bytes: 1 << 20,
            max_upload_chunks: 64,
            max_chunk_bytes: 1024,
            download_chunk_bytes: 1000,
            device_requests_per_second: 10_000.0,
            device_burst: 10_000,
            max_concurrent_requests: 64,
            tick_millis: 20,
            ..Limits::default()
        };
        let options = ServeOptions {
            admin_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let running = start(&config, &options).await.unwrap();
        Self {
            running,
            ca_pem: cert.certificate_pem,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.running.device_addr.port())
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        let channel = Channel::from_shared(format!(
            "https://127.0.0.1:{}",
            self.running.admin_addr.port()
        ))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem)))
        .unwrap()
        .connect()
        .await
        .unwrap();
        AdminServiceClient::new(channel)
    }

    pub async fn client(&self, config: ParticipationConfig) -> CoordinatorClient {
        CoordinatorClient::connect(&self.url(), self.ca_pem.as_bytes(), config)
            .await
            .unwrap()
    }
}

/// A request carrying the admin token.
pub fn admin<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        fedpref_proto::metadata::AUTHORIZATION,
        bearer(ADMIN_TOKEN).parse().unwrap(),
    );
    r
}
