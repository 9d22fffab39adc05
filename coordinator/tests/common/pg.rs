//! A PostgreSQL server for tests: the one `FEDPREF_TEST_POSTGRES_URL` names (a superuser URL,
//! as `.ci/run` exports), or else a throwaway cluster started from Debian's PostgreSQL
//! binaries (`initdb` into a temporary directory, listening on 127.0.0.1 on a free port and a
//! socket in that directory; as root, run as the `postgres` user). A watcher stops that
//! cluster and deletes its directory when the test process exits. Each caller gets a fresh
//! database. With neither, tests skip saying why — unless `FEDPREF_REQUIRE_POSTGRES=1`, where
//! they fail.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The server the tests of one process share.
pub struct PgServer {
    /// A superuser URL without a database name's path part being meaningful beyond `postgres`.
    host: String,
    port: u16,
    user: String,
}

static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn required() -> bool {
    std::env::var("FEDPREF_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// The shared server, or `None` after printing why the caller should skip.
pub fn server() -> Option<&'static PgServer> {
    match SERVER.get_or_init(start) {
        Ok(s) => Some(s),
        Err(why) => {
            if required() {
                panic!("FEDPREF_REQUIRE_POSTGRES=1 but no PostgreSQL server: {why}");
            }
            eprintln!("skipping: no PostgreSQL server ({why})");
            None
        }
    }
}

/// A fresh, empty database's URL on the shared server, or `None` (skip).
pub fn fresh_database() -> Option<String> {
    let s = server()?;
    Some(s.create_database())
}

impl PgServer {
    /// A URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{}@{}:{}/{}",
            self.user, self.host, self.port, database
        )
    }

    /// A URL for `database` as `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{user}:{password}@{}:{}/{database}",
            self.host, self.port
        )
    }

    /// Creates a new database; returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "fedpref_test_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        self.admin(&format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs SQL as the superuser on the `postgres` database.
    pub fn admin(&self, sql: &str) {
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .expect("connect to the test server");
        c.batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

fn start() -> Result<PgServer, String> {
    if let Ok(url) = std::env::var("FEDPREF_TEST_POSTGRES_URL") {
        let config: postgres::Config = url
            .parse()
            .map_err(|e| format!("FEDPREF_TEST_POSTGRES_URL: {e}"))?;
        let host = match config.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            _ => return Err("FEDPREF_TEST_POSTGRES_URL must name a TCP host".into()),
        };
        let server = PgServer {
            host,
            port: config.get_ports().first().copied().unwrap_or(5432),
            user: config.get_user().unwrap_or("postgres").to_string(),
        };
        postgres::Client::connect(&server.url("postgres"), postgres::NoTls)
            .map_err(|e| format!("FEDPREF_TEST_POSTGRES_URL ({url}): {e}"))?;
        return Ok(server);
    }
    let bin = find_bin().ok_or(
        "FEDPREF_TEST_POSTGRES_URL is unset and no initdb under /usr/lib/postgresql/*/bin",
    )?;
    let root = is_root();
    let dir = tempfile::Builder::new()
        .prefix("fedpref-pg-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let data = dir.join("data");
    let as_pg = |program: &Path| -> Command {
        if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    };
    if root {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .map_err(|e| format!("chown: {e}"))?;
        if !ok.success() {
            return Err("chown of the cluster directory to postgres failed".into());
        }
    }
    let out = as_pg(&bin.join("initdb"))
        .args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "-D",
        ])
        .arg(&data)
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    // The server, and a watcher that stops it and removes the directory once this test
    // process has gone. SIGTERM, not SIGINT: `sh` starts a background job with SIGINT
    // ignored, so a SIGINT that arrives before the server installs its handlers is lost;
    // SIGTERM then still ends it (and afterwards is a smart shutdown, immediate once this
    // process's connections are closed).
    let script = format!(
        "{postgres} -D {data} -k {dir} -h 127.0.0.1 -p {port} -c fsync=off -c max_connections=200 >{dir}/log 2>&1 &\n\
         pg=$!\n\
         while [ -d /proc/{parent} ]; do sleep 1; done\n\
         kill -TERM $pg; wait $pg; rm -rf {dir}\n",
        postgres = bin.join("postgres").display(),
        data = data.display(),
        dir = dir.display(),
        parent = std::process::id(),
    );
    let mut sh = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c"]);
        c
    } else {
        let mut c = Command::new("sh");
        c.arg("-c");
        c
    };
    sh.arg(script)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting postgres: {e}"))?;
    let server = PgServer {
        host: "127.0.0.1".into(),
        port,
        user: "postgres".into(),
    };
    let start = Instant::now();
    loop {
        match postgres::Client::connect(&server.url("postgres"), postgres::NoTls) {
            Ok(_) => return Ok(server),
            Err(e) if start.elapsed() > Duration::from_secs(60) => {
                let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
                return Err(format!("postgres did not start: {e}\n{log}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
