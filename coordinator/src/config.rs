//! The coordinator's configuration file (`coordinator.toml`) and `fedpref-coordinator init`,
//! which writes a working one with everything it refers to.
//!
//! ```toml
//! [listen]
//! device = "127.0.0.1:7443"   # DeviceService (TLS)
//! admin = "127.0.0.1:7444"    # AdminService (TLS), on its own port
//! metrics = "127.0.0.1:9464"  # Prometheus text on GET /metrics (optional)
//!
//! [store]
//! path = "coordinator.db"     # a SQLite file, or instead:
//! # url = "postgres://fedpref@db.internal/fedpref"
//!
//! [replica]                   # optional: one of several replicas sharing a PostgreSQL store
//! id = "coordinator-1"
//! advertise = "https://coordinator-1.internal:7443"  # where devices reach this replica
//! lease_millis = 10000        # a run's lease lasts this long unless renewed
//! renew_millis = 3000         # how often leases are renewed and free runs looked for
//!
//! [tls]
//! certificate = "tls/cert.pem"
//! private_key = "tls/key.pem"
//!
//! [auth]
//! app_key_file = "app.key"
//! admin_token_file = "admin.token"
//! admin_client_ca = "tls/admin-ca.pem"  # optional: admin client certificates it signed
//! enrolment_grant_keys = []   # optional: the app backend's Ed25519 public keys (hex); set,
//!                             # every enrolment needs a grant and privacy counts per person
//! person_key_file = "person.key" # required with grant keys: keys each person's principal
//!
//! [ledger]                    # optional: without it, ledger heads are not signed
//! signing_key_file = "ledger.key"  # Ed25519 seed, hex, mode 0600 (see docs/ledger.md)
//!
//! [limits]
//! max_upload_bytes = 16777216
//! max_upload_chunks = 4096
//! max_chunk_bytes = 1048576
//! download_chunk_bytes = 262144
//! device_requests_per_second = 5.0
//! device_burst = 20
//! max_concurrent_requests = 256
//! tick_millis = 250
//! max_enrolments_per_window = 10000   # enrolments with the app key, all devices together …
//! enrolment_window_seconds = 60       # … per this many seconds
//! max_enrolments_per_person = 10      # with enrolment grants: enrolments of one person …
//! person_enrolment_window_seconds = 2592000  # … per this many seconds (30 days)
//! ```
//!
//! Relative paths are relative to the directory of the configuration file. Unknown keys and
//! bad values are errors naming the file and the key. Every section but `[limits]` is
//! required; each limit has the default shown.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rand::rngs::SysRng;
use rand_core::TryRng;
use serde::Deserialize;

/// A configuration problem, naming the file (and the key where there is one).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a wrong type (toml's message names the key).
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: String,
        /// What is wrong, with the key and line.
        message: String,
    },
    /// A value out of range.
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// The key, dotted (`limits.max_upload_bytes`).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// `init` would overwrite a file.
    #[error(
        "{0}: exists already; init never overwrites a file (choose another --dir or remove it)"
    )]
    Exists(String),
    /// Generating the certificate or a secret failed.
    #[error("{0}")]
    Generate(String),
}

/// Where the services listen.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// DeviceService.
    pub device: SocketAddr,
    /// AdminService.
    pub admin: SocketAddr,
    /// Where to serve Prometheus metrics (`GET /metrics`, plain HTTP); absent: not served.
    pub metrics: Option<SocketAddr>,
}

/// The store: a SQLite file (`path`) or a PostgreSQL database (`url`), exactly one.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The SQLite file (created if missing); empty when `url` is set.
    #[serde(default)]
    pub path: PathBuf,
    /// A PostgreSQL URL (`postgres://user[:password]@host[:port]/database`).
    #[serde(default)]
    pub url: Option<String>,
}

impl StoreConfig {
    /// What [`crate::store::Store::open_location`] opens: the URL, or else the path.
    pub fn location(&self) -> String {
        match &self.url {
            Some(url) => url.clone(),
            None => self.path.display().to_string(),
        }
    }
}

/// This process as one of several replicas sharing one store: each run is owned by one
/// replica at a time through a lease in the database.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// The replica's id, unique among the replicas (letters, digits, `-`, `_`, `.`).
    pub id: String,
    /// The device endpoint other replicas redirect devices to for the runs this one owns,
    /// e.g. `https://coordinator-1.internal:7443`.
    pub advertise: String,
    /// How long a lease lasts unless renewed, in ms.
    #[serde(default = "default_lease_millis")]
    pub lease_millis: u64,
    /// How often leases are renewed and unowned runs looked for, in ms; below a third of
    /// `lease_millis`.
    #[serde(default = "default_renew_millis")]
    pub renew_millis: u64,
}

fn default_lease_millis() -> u64 {
    10_000
}

fn default_renew_millis() -> u64 {
    3_000
}

/// The server's certificate chain and key, PEM.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, PEM.
    pub certificate: PathBuf,
    /// The private key, PEM.
    pub private_key: PathBuf,
}

/// The files that hold the deployment's secrets.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The app key devices enrol with (one line).
    pub app_key_file: PathBuf,
    /// The admin token (one line).
    pub admin_token_file: PathBuf,
    /// Optional: a CA certificate (PEM). An admin client presenting a certificate it signed
    /// is authenticated by that certificate alone, without the token; the device port never
    /// asks for client certificates.
    #[serde(default)]
    pub admin_client_ca: Option<PathBuf>,
    /// Optional: the app backend's Ed25519 public keys, hex (more than one while rotating).
    /// Set, `Enroll` requires an enrolment grant signed by one of them, and the device acts as
    /// the person the grant names: participation, its limits and every ε count per person
    /// (see [`crate::enrolment`]). Empty: per enrolment, and grants are refused.
    #[serde(default)]
    pub enrolment_grant_keys: Vec<String>,
    /// With enrolment grants, required: a secret file (one line, at least 32 characters; mode
    /// 0600; `init` writes one) that keys the hash turning a grant's pseudonym into the
    /// person's principal, so that the store holds nothing a guessed pseudonym can be checked
    /// against without it. Every replica of a deployment needs the same file.
    #[serde(default)]
    pub person_key_file: Option<PathBuf>,
}

/// The privacy ledger.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// The Ed25519 key that signs each run's ledger head after every entry (one line: the
    /// 32-byte seed in hex; mode 0600). `init` writes one.
    pub signing_key_file: PathBuf,
}

/// Bounds on what one request, one device and the whole server may take.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest upload, in bytes of tensor data.
    pub max_upload_bytes: u64,
    /// Most chunks in one upload.
    pub max_upload_chunks: u32,
    /// Largest `TensorChunk.content` accepted, in bytes.
    pub max_chunk_bytes: u32,
    /// Largest `ModelChunk.content` sent, in bytes.
    pub download_chunk_bytes: u32,
    /// Sustained requests per second one device may make (token bucket rate).
    pub device_requests_per_second: f64,
    /// Requests one device may make in a burst (token bucket size).
    pub device_burst: u32,
    /// Requests in progress over both services together; more are refused at once.
    pub max_concurrent_requests: u32,
    /// How often the engines are ticked (round deadlines), in milliseconds.
    pub tick_millis: u64,
    /// Most enrolments (with the app key, from all addresses together) in any window of
    /// `enrolment_window_seconds`; more are refused with `RESOURCE_EXHAUSTED`. Whoever
    /// extracts the app key can enrol devices; this bounds how fast.
    pub max_enrolments_per_window: u32,
    /// The enrolment window, in seconds.
    pub enrolment_window_seconds: u64,
    /// With enrolment grants: most enrolments of one person (across their devices and
    /// re-enrolments) in any window of `person_enrolment_window_seconds`; more are refused
    /// with `RESOURCE_EXHAUSTED`.
    pub max_enrolments_per_person: u32,
    /// That window, in seconds.
    pub person_enrolment_window_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 16 * 1024 * 1024,
            max_upload_chunks: 4096,
            max_chunk_bytes: 1024 * 1024,
            download_chunk_bytes: 256 * 1024,
            device_requests_per_second: 5.0,
            device_burst: 20,
            max_concurrent_requests: 256,
            tick_millis: 250,
            max_enrolments_per_window: 10_000,
            enrolment_window_seconds: 60,
            max_enrolments_per_person: 10,
            person_enrolment_window_seconds: 30 * 86_400,
        }
    }
}

/// The whole configuration, with paths resolved against the file's directory.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listen addresses.
    pub listen: Listen,
    /// The store.
    pub store: StoreConfig,
    /// Optional: this process as one replica of several.
    #[serde(default)]
    pub replica: Option<ReplicaConfig>,
    /// TLS.
    pub tls: TlsConfig,
    /// Secrets.
    pub auth: AuthConfig,
    /// The ledger's signing key (optional: without it, heads are not signed and checkpoints
    /// cannot be written).
    #[serde(default)]
    pub ledger: Option<LedgerConfig>,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
}

impl Config {
    /// Reads, validates and resolves a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, &file, base)
    }

    /// Parses and validates configuration text; `file` names it in errors and relative paths
    /// are resolved against `base`.
    pub fn from_toml(text: &str, file: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate(file)?;
        let store_path = (!config.store.path.as_os_str().is_empty())
            .then_some(&mut config.store.path)
            .into_iter();
        for p in store_path
            .chain([
                &mut config.tls.certificate,
                &mut config.tls.private_key,
                &mut config.auth.app_key_file,
                &mut config.auth.admin_token_file,
            ])
            .chain(config.auth.admin_client_ca.as_mut())
            .chain(config.auth.person_key_file.as_mut())
            .chain(config.ledger.as_mut().map(|l| &mut l.signing_key_file))
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| ConfigError::Invalid {
            file: file.to_string(),
            key: key.to_string(),
            message: message.to_string(),
        };
        let l = &self.limits;
        if l.max_upload_bytes == 0 {
            return Err(bad("limits.max_upload_bytes", "must be at least 1"));
        }
        if l.max_upload_chunks == 0 {
            return Err(bad("limits.max_upload_chunks", "must be at least 1"));
        }
        // Bounded so that one chunk always fits gRPC's default 4 MiB message limit.
        for (key, v) in [
            ("limits.max_chunk_bytes", l.max_chunk_bytes),
            ("limits.download_chunk_bytes", l.download_chunk_bytes),
        ] {
            if !(1..=MAX_CHUNK).contains(&v) {
                return Err(bad(key, &format!("{v} is outside 1..={MAX_CHUNK}")));
            }
        }
        if !(l.device_requests_per_second.is_finite() && l.device_requests_per_second > 0.0) {
            return Err(bad(
                "limits.device_requests_per_second",
                "must be a finite number > 0",
            ));
        }
        if l.device_burst == 0 {
            return Err(bad("limits.device_burst", "must be at least 1"));
        }
        if l.max_concurrent_requests == 0 {
            return Err(bad("limits.max_concurrent_requests", "must be at least 1"));
        }
        if !(10..=60_000).contains(&l.tick_millis) {
            return Err(bad("limits.tick_millis", "must be in 10..=60000"));
        }
        if l.max_enrolments_per_window == 0 {
            return Err(bad(
                "limits.max_enrolments_per_window",
                "must be at least 1",
            ));
        }
        if !(1..=604_800).contains(&l.enrolment_window_seconds) {
            return Err(bad(
                "limits.enrolment_window_seconds",
                "must be in 1..=604800 (a week)",
            ));
        }
        if l.max_enrolments_per_person == 0 {
            return Err(bad(
                "limits.max_enrolments_per_person",
                "must be at least 1",
            ));
        }
        if !(1..=31_622_400).contains(&l.person_enrolment_window_seconds) {
            return Err(bad(
                "limits.person_enrolment_window_seconds",
                "must be in 1..=31622400 (a year)",
            ));
        }
        if let Err(e) = crate::enrolment::GrantKeys::parse(&self.auth.enrolment_grant_keys) {
            // `[i]: what is wrong`
            let (index, message) = e.split_once(": ").unwrap_or(("", e.as_str()));
            return Err(bad(&format!("auth.enrolment_grant_keys{index}"), message));
        }
        if !self.auth.enrolment_grant_keys.is_empty() && self.auth.person_key_file.is_none() {
            return Err(bad(
                "auth.person_key_file",
                "required when auth.enrolment_grant_keys is set: the secret that keys each person's principal (`init` writes one; every replica needs the same file)",
            ));
        }
        if self.listen.device == self.listen.admin {
            return Err(bad(
                "listen.admin",
                "must differ from listen.device: the admin service has its own port",
            ));
        }
        match (&self.store.url, self.store.path.as_os_str().is_empty()) {
            (Some(_), false) => {
                return Err(bad(
                    "store.url",
                    "set either store.path (SQLite) or store.url (PostgreSQL), not both",
                ));
            }
            (None, true) => return Err(bad("store.path", "must not be empty")),
            (Some(url), true) if !crate::store::is_postgres_url(url) => {
                return Err(bad(
                    "store.url",
                    "must start with postgres:// or postgresql://",
                ));
            }
            _ => {}
        }
        if let Some(r) = &self.replica {
            if r.id.is_empty()
                || r.id.len() > 64
                || !r
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(bad(
                    "replica.id",
                    "must be 1 to 64 letters, digits, '-', '_' or '.'",
                ));
            }
            if !(r.advertise.starts_with("https://") || r.advertise.starts_with("http://")) {
                return Err(bad(
                    "replica.advertise",
                    "must be an http:// or https:// endpoint",
                ));
            }
            if !(500..=600_000).contains(&r.lease_millis) {
                return Err(bad("replica.lease_millis", "must be in 500..=600000"));
            }
            if r.renew_millis == 0 || r.renew_millis.saturating_mul(3) > r.lease_millis {
                return Err(bad(
                    "replica.renew_millis",
                    "must be at least 1 and at most a third of replica.lease_millis",
                ));
            }
        }
        for (key, p) in [
            ("tls.certificate", &self.tls.certificate),
            ("tls.private_key", &self.tls.private_key),
            ("auth.app_key_file", &self.auth.app_key_file),
            ("auth.admin_token_file", &self.auth.admin_token_file),
        ]
        .into_iter()
        .chain(
            self.auth
                .admin_client_ca
                .as_ref()
                .map(|p| ("auth.admin_client_ca", p)),
        )
        .chain(
            self.auth
                .person_key_file
                .as_ref()
                .map(|p| ("auth.person_key_file", p)),
        )
        .chain(
            self.ledger
                .as_ref()
                .map(|l| ("ledger.signing_key_file", &l.signing_key_file)),
        ) {
            if p.as_os_str().is_empty() {
                return Err(bad(key, "must not be empty"));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The key of the person principal's hash (`auth.person_key_file`, at least 32
    /// characters); `None` when the configuration names none.
    pub fn person_key(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.auth.person_key_file else {
            return Ok(None);
        };
        let key = read_secret(path, "auth.person_key_file")?;
        if key.len() < 32 {
            return Err(ConfigError::Invalid {
                file: path.display().to_string(),
                key: "auth.person_key_file".into(),
                message: "the key must be at least 32 characters".into(),
            });
        }
        Ok(Some(key))
    }

    /// The ledger signing key the configuration names, read and checked (`None` without a
    /// `[ledger]` section).
    pub fn ledger_signer(&self) -> Result<Option<crate::checkpoint::LedgerSigner>, ConfigError> {
        let Some(l) = &self.ledger else {
            return Ok(None);
        };
        crate::checkpoint::LedgerSigner::read_file(&l.signing_key_file)
            .map(Some)
            .map_err(|e| ConfigError::Invalid {
                file: l.signing_key_file.display().to_string(),
                key: "ledger.signing_key_file".into(),
                message: e.to_string(),
            })
    }
}

/// The largest chunk either way, in bytes (3 MiB: below gRPC's default 4 MiB message limit).
pub const MAX_CHUNK: u32 = 3 * 1024 * 1024;

/// Reads a one-line secret file (app key, admin token), refusing an empty one.
pub fn read_secret(path: &Path, key: &str) -> Result<String, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        file: file.clone(),
        source,
    })?;
    let secret = text.trim().to_string();
    if secret.len() < 16 {
        return Err(ConfigError::Invalid {
            file,
            key: key.to_string(),
            message: "the secret must be at least 16 characters".into(),
        });
    }
    Ok(secret)
}

/// 256 random bits from the operating system, base64url without padding.
pub fn random_secret() -> Result<String, ConfigError> {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| ConfigError::Generate(format!("the operating system's random source: {e}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// A certificate and its private key, PEM.
pub struct SelfSigned {
    /// The certificate, PEM.
    pub certificate_pem: String,
    /// The private key, PKCS#8 PEM.
    pub private_key_pem: String,
}

/// A self-signed certificate for `localhost`, `127.0.0.1` and `::1` (rcgen, ECDSA P-256).
pub fn self_signed_localhost() -> Result<SelfSigned, ConfigError> {
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let cert = rcgen::generate_simple_self_signed(names)
        .map_err(|e| ConfigError::Generate(format!("self-signed certificate: {e}")))?;
    Ok(SelfSigned {
        certificate_pem: cert.cert.pem(),
        private_key_pem: cert.signing_key.serialize_pem(),
    })
}

/// A certificate authority made for one deployment's admin clients, and one client
/// certificate it signed. The CA's key is not kept: to issue more admin certificates, point
/// `auth.admin_client_ca` at your own CA.
pub struct AdminClientCertificates {
    /// The CA certificate (`auth.admin_client_ca`), PEM.
    pub ca_pem: String,
    /// The client's certificate, PEM.
    pub client_certificate_pem: String,
    /// The client's private key, PKCS#8 PEM.
    pub client_private_key_pem: String,
}

/// A fresh admin CA (ECDSA P-256, valid for the CA purpose only) and one client certificate
/// signed by it for TLS client authentication (common name `fedpref admin`).
pub fn admin_client_certificates() -> Result<AdminClientCertificates, ConfigError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let generate = |what: &str, e: rcgen::Error| ConfigError::Generate(format!("{what}: {e}"));
    let ca_key = KeyPair::generate().map_err(|e| generate("admin CA key", e))?;
    let mut ca =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| generate("admin CA", e))?;
    ca.distinguished_name
        .push(DnType::CommonName, "fedpref admin client CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|e| generate("admin CA", e))?;
    let issuer = Issuer::new(ca, ca_key);
    let client_key = KeyPair::generate().map_err(|e| generate("admin client key", e))?;
    let mut client = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| generate("admin client certificate", e))?;
    client
        .distinguished_name
        .push(DnType::CommonName, "fedpref admin");
    client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client
        .signed_by(&client_key, &issuer)
        .map_err(|e| generate("admin client certificate", e))?;
    Ok(AdminClientCertificates {
        ca_pem: ca_cert.pem(),
        client_certificate_pem: client_cert.pem(),
        client_private_key_pem: client_key.serialize_pem(),
    })
}

/// The configuration `init` writes (paths relative to its directory).
pub const INIT_CONFIG: &str = r#"# fedpref-coordinator configuration, written by `fedpref-coordinator init`.
# Relative paths are relative to this file's directory. Unknown keys are errors.

[listen]
# DeviceService (TLS). Use 0.0.0.0:7443 to accept devices from other machines.
device = "127.0.0.1:7443"
# AdminService (TLS), on its own port; keep it on a private network.
admin = "127.0.0.1:7444"
# Prometheus metrics, plain HTTP on GET /metrics (keep it on loopback or a private network).
metrics = "127.0.0.1:9464"

[store]
path = "coordinator.db"

[tls]
# A self-signed certificate for localhost, 127.0.0.1 and ::1. Replace it with one from your
# certificate authority for devices on other machines.
certificate = "tls/cert.pem"
private_key = "tls/key.pem"

[auth]
# The app key devices enrol with (ship it in the app) and the admin token (keep it secret).
app_key_file = "app.key"
admin_token_file = "admin.token"
# Admin clients may instead present a certificate signed by this CA (init wrote one:
# tls/admin-client.pem with its key tls/admin-client.key). Remove the line to allow tokens only.
admin_client_ca = "tls/admin-ca.pem"
# Enrolment grants: set the app backend's Ed25519 public key(s), hex, and every enrolment needs
# a grant the backend signed for the signed-in person; participation, its limits and every ε
# then count per person, across their devices and re-enrolments. Empty: per enrolment.
# `fedpref-coordinator grant keygen` makes a key pair.
enrolment_grant_keys = []
# The secret that keys each person's principal (a keyed hash of the grant's pseudonym); every
# replica needs the same file. Keep it 0600.
person_key_file = "person.key"

[ledger]
# The Ed25519 key that signs each run's ledger head after every entry (keep it 0600 and back
# it up; `fedpref-coordinator ledger checkpoint` exports signed heads for safekeeping).
signing_key_file = "ledger.key"

[limits]
max_upload_bytes = 16777216
max_upload_chunks = 4096
max_chunk_bytes = 1048576
download_chunk_bytes = 262144
device_requests_per_second = 5.0
device_burst = 20
max_concurrent_requests = 256
tick_millis = 250
# Enrolments with the app key, all devices together, per window (whoever extracts the app key
# from the app can enrol devices; this bounds how fast).
max_enrolments_per_window = 10000
enrolment_window_seconds = 60
# With enrolment grants: enrolments of one person (all their devices) per 30 days.
max_enrolments_per_person = 10
person_enrolment_window_seconds = 2592000
"#;

/// The example manifest `init` writes: a small central-DP run that three devices complete in
/// a few minutes.
pub const INIT_MANIFEST: &str = r#"# An example run that a few devices can complete: a fixed cohort of 3 (at least 2),
# rounds of 30 seconds, 5 rounds, central DP.
title = "Example preferences"
purpose = "Try the coordinator end to end with a handful of devices"
owner = "you@example.com"
data_elements_used = ["explicit ratings (1-5)", "thumbs up/down"]
data_elements_not_used = ["location", "contacts"]
privacy_mode = "central"
rounds = 5
clip_norm = 1.0
noise_multiplier = 1.0

[budget]
epsilon = 50.0
delta = 1e-5

[sampling]
kind = "cohort"
target_size = 3
minimum_size = 2
round_seconds = 30

[server_optimizer]
kind = "fedavg"
server_learning_rate = 1.0

[model]
items = 20
factors = 4

[opt_out_policy]
consent_model = "opt-in"
description = "Training is off until the user turns it on"
"#;

/// What `init` wrote.
#[derive(Debug)]
pub struct Initialised {
    /// Every file written, in order.
    pub files: Vec<PathBuf>,
}

/// Writes `DIR/coordinator.toml`, `DIR/tls/cert.pem` and `DIR/tls/key.pem` (self-signed for
/// localhost), `DIR/app.key` and `DIR/admin.token` (random, mode 0600), an admin client CA
/// with one client certificate (`DIR/tls/admin-ca.pem`, `DIR/tls/admin-client.pem`,
/// `DIR/tls/admin-client.key`, the key mode 0600), `DIR/manifest.toml`, the ledger signing
/// key `DIR/ledger.key` and the person key `DIR/person.key` (both mode 0600). Refuses, writing
/// nothing, if any of them exists.
pub fn init(dir: &Path) -> Result<Initialised, ConfigError> {
    let io = |file: &Path| {
        let file = file.display().to_string();
        move |source| ConfigError::Io { file, source }
    };
    let files = [
        (dir.join("coordinator.toml"), false),
        (dir.join("tls").join("cert.pem"), false),
        (dir.join("tls").join("key.pem"), true),
        (dir.join("app.key"), true),
        (dir.join("admin.token"), true),
        (dir.join("tls").join("admin-ca.pem"), false),
        (dir.join("tls").join("admin-client.pem"), false),
        (dir.join("tls").join("admin-client.key"), true),
        (dir.join("manifest.toml"), false),
        (dir.join("ledger.key"), true),
        (dir.join("person.key"), true),
    ];
    for (f, _) in &files {
        if f.exists() {
            return Err(ConfigError::Exists(f.display().to_string()));
        }
    }
    let cert = self_signed_localhost()?;
    let admin = admin_client_certificates()?;
    let contents = [
        INIT_CONFIG.to_string(),
        cert.certificate_pem,
        cert.private_key_pem,
        format!("{}\n", random_secret()?),
        format!("{}\n", random_secret()?),
        admin.ca_pem,
        admin.client_certificate_pem,
        admin.client_private_key_pem,
        INIT_MANIFEST.to_string(),
        crate::checkpoint::LedgerSigner::generate()
            .map_err(|e| ConfigError::Generate(e.to_string()))?
            .key_file_text(),
        format!("{}\n", random_secret()?),
    ];
    let tls_dir = dir.join("tls");
    std::fs::create_dir_all(&tls_dir).map_err(io(&tls_dir))?;
    let mut written = vec![];
    for ((path, secret), text) in files.iter().zip(contents) {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        if *secret {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = secret;
        let mut f = options.open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => ConfigError::Exists(path.display().to_string()),
            _ => io(path)(e),
        })?;
        f.write_all(text.as_bytes()).map_err(io(path))?;
        f.sync_all().map_err(io(path))?;
        written.push(path.clone());
    }
    Ok(Initialised { files: written })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_config_parses_and_resolves_paths_against_its_directory() {
        let c = Config::from_toml(INIT_CONFIG, "coordinator.toml", Path::new("/etc/fp")).unwrap();
        assert_eq!(c.store.path, Path::new("/etc/fp/coordinator.db"));
        assert_eq!(c.limits, Limits::default());
        crate::manifest::RunManifest::from_toml(INIT_MANIFEST, "manifest.toml").unwrap();
        assert_eq!(
            c.ledger.unwrap().signing_key_file,
            Path::new("/etc/fp/ledger.key")
        );
    }

    #[test]
    fn init_writes_a_private_ledger_signing_key_that_the_config_names() {
        let dir = tempfile::tempdir().unwrap();
        let done = init(dir.path()).unwrap();
        let key = dir.path().join("ledger.key");
        assert!(done.files.contains(&key));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let c = Config::from_file(&dir.path().join("coordinator.toml")).unwrap();
        let signer = c.ledger_signer().unwrap().unwrap();
        assert_eq!(signer.public_key_hex().len(), 64);
        let empty = INIT_CONFIG.replace(
            "signing_key_file = \"ledger.key\"",
            "signing_key_file = \"\"",
        );
        let e = Config::from_toml(&empty, "c.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ledger.signing_key_file"), "{e}");
    }

    #[test]
    fn init_writes_a_private_person_key_and_grant_keys_require_one() {
        let dir = tempfile::tempdir().unwrap();
        let done = init(dir.path()).unwrap();
        let key = dir.path().join("person.key");
        assert!(done.files.contains(&key));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let c = Config::from_file(&dir.path().join("coordinator.toml")).unwrap();
        assert!(c.person_key().unwrap().unwrap().len() >= 32);
        // Grant keys without a person key are refused, naming the key.
        let grants = INIT_CONFIG
            .replace(
                "enrolment_grant_keys = []",
                &format!(
                    "enrolment_grant_keys = [\"{}\"]",
                    crate::checkpoint::LedgerSigner::from_seed([7; 32]).public_key_hex()
                ),
            )
            .replace("person_key_file = \"person.key\"\n", "");
        let e = Config::from_toml(&grants, "c.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.person_key_file"), "{e}");
        // A short key is refused too.
        std::fs::write(&key, "short\n").unwrap();
        let e = c.person_key().unwrap_err().to_string();
        assert!(e.contains("auth.person_key_file"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_key() {
        let text = INIT_CONFIG.replace("tick_millis = 250", "tick_millis = 250\nspeed = 3");
        let e = Config::from_toml(&text, "c.toml", Path::new(".")).unwrap_err();
        let e = e.to_string();
        assert!(e.starts_with("c.toml: ") && e.contains("speed"), "{e}");
        let text = INIT_CONFIG.replace("max_upload_chunks = 4096", "max_upload_chunks = 0");
        let e = Config::from_toml(&text, "c.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "c.toml: key `limits.max_upload_chunks`: must be at least 1"
        );
        let text = INIT_CONFIG.replace(
            "enrolment_grant_keys = []",
            "enrolment_grant_keys = [\"abc\"]",
        );
        let e = Config::from_toml(&text, "c.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "c.toml: key `auth.enrolment_grant_keys[0]`: not 64 hex digits (an Ed25519 public key)"
        );
        let text = INIT_CONFIG.replace("\"127.0.0.1:7444\"", "\"nowhere\"");
        let e = Config::from_toml(&text, "c.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin"), "{e}");
    }

    #[test]
    fn a_postgres_store_and_a_replica_section_parse_and_bad_ones_name_the_key() {
        let pg = INIT_CONFIG.replace(
            "path = \"coordinator.db\"",
            "url = \"postgres://fedpref@db/fedpref\"",
        );
        let text =
            format!("{pg}\n[replica]\nid = \"coordinator-1\"\nadvertise = \"https://c1:7443\"\n");
        let c = Config::from_toml(&text, "c.toml", Path::new("/etc/fp")).unwrap();
        assert_eq!(c.store.location(), "postgres://fedpref@db/fedpref");
        let r = c.replica.unwrap();
        assert_eq!((r.lease_millis, r.renew_millis), (10_000, 3_000));
        let err = |text: &str| {
            Config::from_toml(text, "c.toml", Path::new("."))
                .unwrap_err()
                .to_string()
        };
        let both = INIT_CONFIG.replace(
            "path = \"coordinator.db\"",
            "path = \"c.db\"\nurl = \"postgres://x/y\"",
        );
        assert!(err(&both).contains("store.url"), "{}", err(&both));
        let mysql = pg.replace("postgres://", "mysql://");
        assert!(err(&mysql).contains("store.url"), "{}", err(&mysql));
        let fast = text.replace("[replica]", "[replica]\nrenew_millis = 5000");
        assert!(
            err(&fast).contains("replica.renew_millis"),
            "{}",
            err(&fast)
        );
        let bad_id = text.replace("coordinator-1", "a b");
        assert!(err(&bad_id).contains("replica.id"), "{}", err(&bad_id));
    }
}
