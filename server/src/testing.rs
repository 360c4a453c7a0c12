//! For tests: a throw-away PostgreSQL cluster (Debian's `postgresql`
//! package) in a temporary directory, on loopback, stopped and removed when
//! dropped. A machine without PostgreSQL fails the test that asks for one,
//! with a message that says how to install it: never a silent skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running cluster; stopped (immediate mode) and removed on drop.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

/// Where Debian keeps PostgreSQL's programs, newest version first; or
/// `ASTRAEA_PG_BIN`.
fn find_bin() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("ASTRAEA_PG_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "PostgreSQL is not installed: these tests start a throw-away cluster with \
         Debian's `postgresql` package (`sudo apt-get install postgresql`; scripts/setup \
         installs it), or set ASTRAEA_PG_BIN to a folder holding initdb and pg_ctl"
            .to_string()
    })
}

fn run(mut command: Command, what: &str) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

impl PgCluster {
    /// Creates and starts a cluster (about 2 s): trust authentication for
    /// the `postgres` user on 127.0.0.1 and a socket in its own folder.
    /// As root, the programs run as the `postgres` user (the server refuses
    /// root).
    ///
    /// # Errors
    /// PostgreSQL is missing (the message says how to install it), or
    /// `initdb` or `pg_ctl` failed (their output).
    pub fn start() -> Result<Self, String> {
        let bin = find_bin()?;
        let dir = std::env::temp_dir().join(format!(
            "astraea-pg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if as_postgres {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&dir);
            run(chown, "chown postgres")?;
        }
        let mut cluster = Self {
            dir,
            bin,
            port: 0,
            as_postgres,
        };
        let mut initdb = cluster.command("initdb");
        initdb.arg("-D").arg(cluster.dir.join("data")).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        run(initdb, "initdb")?;
        // A free port may be taken between asking and starting: try again.
        let mut last = String::new();
        for _ in 0..5 {
            cluster.port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?
                .port();
            let mut start = cluster.command("pg_ctl");
            start
                .arg("-D")
                .arg(cluster.dir.join("data"))
                .arg("-l")
                .arg(cluster.dir.join("log"))
                .arg("-w")
                .arg("-o")
                .arg(format!(
                    "-k {} -p {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                    cluster.dir.display(),
                    cluster.port
                ))
                .arg("start");
            match run(start, "pg_ctl start") {
                Ok(()) => return Ok(cluster),
                Err(e) => last = e,
            }
        }
        Err(format!("{last}\n{}", cluster.log()))
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL of database `database`, as the `postgres` user.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A cluster started for one test with one database, `astraea`, and
    /// that database's URL; panics with the cluster's error (how to install
    /// PostgreSQL, say) when it cannot start.
    pub fn with_database() -> (Self, String) {
        let cluster = Self::start().unwrap_or_else(|e| panic!("{e}"));
        let url = cluster
            .create_database("astraea")
            .unwrap_or_else(|e| panic!("{e}"));
        (cluster, url)
    }

    /// Creates database `name` and answers its URL.
    ///
    /// # Errors
    /// The statement failed.
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        let url = self.url("postgres");
        let sql = format!("CREATE DATABASE \"{name}\"");
        // On a thread of its own: the blocking client runs a runtime, which
        // must not start inside a test's.
        std::thread::spawn(move || {
            let mut client =
                postgres::Client::connect(&url, postgres::NoTls).map_err(|e| e.to_string())?;
            client.batch_execute(&sql).map_err(|e| e.to_string())
        })
        .join()
        .map_err(|_| "creating the database panicked".to_string())??;
        Ok(self.url(name))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"]);
        let _ = run(stop, "pg_ctl stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real nginx (Debian's `nginx`) in front of servers on loopback, run
/// with the shipped `deploy/nginx.conf` (its upstream servers and its
/// `listen` replaced), in the foreground; stopped when dropped.
#[derive(Debug)]
pub struct Nginx {
    child: std::process::Child,
    dir: PathBuf,
    port: u16,
}

/// The shipped configuration.
pub const NGINX_CONF: &str = include_str!("../../deploy/nginx.conf");

impl Nginx {
    /// Starts nginx on a free port in front of `upstreams` (ports on
    /// 127.0.0.1), once it accepts connections.
    ///
    /// # Errors
    /// nginx is missing (the message says how to install it), its
    /// configuration does not load, or it does not come up in 10 s.
    pub fn start(upstreams: &[u16]) -> Result<Self, String> {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| {
                "nginx is not installed: the load-balancer tests run Debian's `nginx` \
                 (`sudo apt-get install nginx`; scripts/setup installs it)"
                    .to_string()
            })?;
        let dir = std::env::temp_dir().join(format!(
            "astraea-nginx-{}-{}",
            std::process::id(),
            upstreams.first().copied().unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let servers: String = upstreams
            .iter()
            .map(|p| format!("server 127.0.0.1:{p} max_fails=0;\n"))
            .collect();
        let mut config = String::new();
        let mut in_upstream = false;
        for line in NGINX_CONF.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with("server 127.0.0.1:") {
                if !in_upstream {
                    config.push_str(&servers);
                    in_upstream = true;
                }
                continue;
            }
            if trimmed.starts_with("listen ") {
                config.push_str(&format!("listen 127.0.0.1:{port};\n"));
                continue;
            }
            config.push_str(line);
            config.push('\n');
        }
        // Everything it writes in its own folder, worker processes as the
        // user running the test.
        let temp = dir.display();
        config = config.replace(
            "http {",
            &format!(
                "http {{\n client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy;\n \
                 fastcgi_temp_path {temp}/fastcgi; uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;"
            ),
        );
        config = config.replace("worker_processes auto;", "worker_processes 1;");
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).map_err(|e| e.to_string())?;
        let user = if Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        {
            "user root;"
        } else {
            ""
        };
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-g")
            .arg(format!(
                "daemon off; master_process on; {user} pid {temp}/nginx.pid; error_log {temp}/error.log warn;"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr")).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("starting nginx: {e}"))?;
        let mut nginx = Self { child, dir, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                return Err(format!("nginx exited ({status}): {}", nginx.log()));
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("nginx did not come up: {}", nginx.log()));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(nginx)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its error log and standard error so far.
    pub fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("{}{}", read("error.log"), read("stderr"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would orphan
        // them, still listening).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
