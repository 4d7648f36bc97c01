//! Throwaway PostgreSQL servers for tests, examples and benches.
//!
//! `database_url()` returns `DATABASE_URL` when it is set. Otherwise it starts
//! one server per process from the local binaries (the directory named by
//! `FAUCET_TEST_PG_BIN` when it is set, else found on `PATH`, then the newest
//! under `/usr/lib/postgresql/*/bin`), in a temp dir, listening on a free
//! loopback port, with password authentication. `.ci/run` points
//! `FAUCET_TEST_PG_BIN` at other major versions to run suites against them. A watchdog process stops the server
//! and removes its directory once this process exits, however it exits.
//!
//! PostgreSQL refuses to run as root; when this process is root the server
//! runs as the unprivileged `postgres` account.
//!
//! With `FAUCET_TEST_VIA_PGBOUNCER=1`, `database_url()` points instead at a
//! PgBouncer in transaction pooling mode in front of that server, so the same
//! tests show that the stores work behind it.
//!
//! Tests must not share rows: each takes its own table from `unique_table()`.
//!
//! Examples and benches include this file with `#[path]`, so it uses nothing
//! beyond std.

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Superuser password of every throwaway server.
pub const SUPERUSER_PASSWORD: &str = "throwaway-superuser-pw";

/// Set (to anything) to run the tests through PgBouncer in transaction
/// pooling mode, in front of the throwaway server.
pub const VIA_PGBOUNCER: &str = "FAUCET_TEST_VIA_PGBOUNCER";

/// A directory holding `initdb`, `pg_ctl` and `postgres`: when set, the
/// throwaway server is started from it (another major version, say) instead
/// of the binaries found on `PATH` or under `/usr/lib/postgresql`.
pub const PG_BIN: &str = "FAUCET_TEST_PG_BIN";

/// Whether the tests run behind PgBouncer in transaction mode (`VIA_PGBOUNCER`).
pub fn via_pgbouncer() -> bool {
    std::env::var(VIA_PGBOUNCER).is_ok_and(|v| !v.is_empty())
}

/// The server for this process: `DATABASE_URL`, or a throwaway one; behind a
/// throwaway PgBouncer in transaction pooling mode when `VIA_PGBOUNCER` is set.
pub fn database_url() -> String {
    let via_pgbouncer = via_pgbouncer();
    if let Ok(url) = std::env::var("DATABASE_URL")
        && !url.is_empty()
    {
        assert!(
            !via_pgbouncer,
            "{VIA_PGBOUNCER} puts a throwaway PgBouncer in front of the throwaway server; \
             unset DATABASE_URL to use it"
        );
        return url;
    }
    if via_pgbouncer {
        return shared_pgbouncer().url();
    }
    shared_server().url()
}

/// This process's throwaway server.
fn shared_server() -> &'static PgServer {
    static SHARED: OnceLock<PgServer> = OnceLock::new();
    SHARED.get_or_init(PgServer::start)
}

/// A PgBouncer in transaction pooling mode in front of this process's
/// throwaway server.
fn shared_pgbouncer() -> &'static PgBouncer {
    static BOUNCER: OnceLock<PgBouncer> = OnceLock::new();
    BOUNCER.get_or_init(|| PgBouncer::start(shared_server()))
}

/// The URL of a PgBouncer in transaction pooling mode in front of the
/// server `database_url()` names, for benchmarks that compare the two;
/// `None` with `DATABASE_URL` (the server is not ours to front) or without
/// PgBouncer installed.
pub fn pgbouncer_url() -> Option<String> {
    let installed = PGBOUNCER_PATHS.iter().any(|path| Path::new(path).is_file());
    (is_throwaway() && installed).then(|| shared_pgbouncer().url())
}

/// Where Debian and others install PgBouncer.
const PGBOUNCER_PATHS: [&str; 3] = [
    "/usr/sbin/pgbouncer",
    "/usr/bin/pgbouncer",
    "/usr/local/bin/pgbouncer",
];

/// A PgBouncer in transaction pooling mode in front of a throwaway server,
/// with PgBouncer's defaults otherwise (no `ignore_startup_parameters`). Like
/// the server, it runs as `postgres` when this process is root, and a
/// watchdog stops it once this process is gone.
pub struct PgBouncer {
    port: u16,
    /// The shell that runs PgBouncer and stops it once this process is gone.
    _watchdog: Child,
}

impl PgBouncer {
    pub fn start(server: &PgServer) -> PgBouncer {
        PgBouncer::start_with(server, "")
    }

    /// `start`, with `settings` (lines of the `[pgbouncer]` section) added
    /// to the configuration.
    pub fn start_with(server: &PgServer, settings: &str) -> PgBouncer {
        let binary = PGBOUNCER_PATHS
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "{VIA_PGBOUNCER} is set but pgbouncer is not installed \
                     (Debian/Ubuntu: `apt-get install pgbouncer`)"
                )
            });
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = server
            .root
            .join(format!("pgbouncer{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&root).expect("create the PgBouncer dir");
        let port = free_port();
        std::fs::write(
            root.join("userlist.txt"),
            format!("\"postgres\" \"{SUPERUSER_PASSWORD}\"\n"),
        )
        .expect("write the PgBouncer userlist");
        std::fs::write(
            root.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host=127.0.0.1 port={server_port}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {root}/userlist.txt\n\
                 pool_mode = transaction\nmax_client_conn = 1000\ndefault_pool_size = 8\n\
                 logfile = {root}/pgbouncer.log\n{settings}\n",
                server_port = server.port,
                root = path_str(&root),
            ),
        )
        .expect("write pgbouncer.ini");
        if let Some((uid, gid)) = server.run_as {
            for file in ["", "userlist.txt", "pgbouncer.ini"] {
                chown(root.join(file), Some(uid), Some(gid)).expect("chown PgBouncer files");
            }
        }
        // PgBouncer runs in the background of a shell that outlives this
        // process only until it notices this process is gone.
        let script = r#""$1" "$2" & bouncer=$!
while [ -d "/proc/$0" ] && kill -0 "$bouncer" 2>/dev/null; do sleep 0.5; done
kill "$bouncer" 2>/dev/null"#;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg(std::process::id().to_string())
            .arg(&binary)
            .arg(root.join("pgbouncer.ini"))
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = server.run_as {
            cmd.uid(uid).gid(gid);
        }
        let mut watchdog = cmd.spawn().expect("spawn PgBouncer");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return PgBouncer {
                    port,
                    _watchdog: watchdog,
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = watchdog.kill();
        let _ = watchdog.wait();
        panic!(
            "PgBouncer did not start listening on port {port}: {}",
            std::fs::read_to_string(root.join("pgbouncer.log")).unwrap_or_default()
        );
    }

    /// `postgres://postgres:…@127.0.0.1:PORT/postgres`, through PgBouncer.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        )
    }
}

/// Whether the tests run against a throwaway server (which they may stop,
/// reconfigure and add roles to) rather than one named by `DATABASE_URL`.
pub fn is_throwaway() -> bool {
    std::env::var("DATABASE_URL").map_or(true, |u| u.is_empty())
}

/// A table name no other test in this run uses.
pub fn unique_table(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(36)
        .collect();
    format!("t_{tag}_{}_{n}", std::process::id())
}

/// A PostgreSQL server in a temp dir, stopped and removed on drop.
pub struct PgServer {
    root: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    watchdog: Option<Child>,
}

impl PgServer {
    /// Creates a cluster and starts it. Panics with instructions when no
    /// PostgreSQL binaries can be found.
    pub fn start() -> PgServer {
        if let Some(dir) = std::env::var_os(PG_BIN).filter(|d| !d.is_empty()) {
            let dir = PathBuf::from(dir);
            assert!(
                has_server_tools(&dir),
                "{PG_BIN}={} holds no initdb and pg_ctl: point it at the bin directory \
                 of a PostgreSQL installation, or unset it",
                dir.display()
            );
        }
        let bin = find_bin_dir().unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or under \
                 /usr/lib/postgresql/*/bin. Install them (Debian/Ubuntu: \
                 `apt-get install postgresql`; macOS: `brew install postgresql`) \
                 or set DATABASE_URL to a server you run"
            )
        });
        let server = PgServer::prepare(bin);
        let pwfile = server.root.join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).expect("write pwfile");
        if let Some((uid, gid)) = server.run_as {
            chown(&pwfile, Some(uid), Some(gid)).expect("chown pwfile");
        }
        server.run_checked(
            "initdb",
            &[
                "-D",
                path_str(&server.data),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                &format!("--pwfile={}", path_str(&pwfile)),
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        server.launch()
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`, the way a
    /// replica is made), started on a port of its own. Read-only until
    /// [`PgServer::promote`].
    pub fn start_standby_of(primary: &PgServer) -> PgServer {
        let server = PgServer::prepare(primary.bin.clone());
        let out = server
            .command("pg_basebackup")
            .args([
                "-D",
                path_str(&server.data),
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
            ])
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .stdin(Stdio::null())
            .output()
            .expect("run pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        server.launch()
    }

    /// Promotes a standby to a primary (`pg_ctl promote`, waiting until it
    /// accepts writes).
    pub fn promote(&self) {
        self.run_checked(
            "pg_ctl",
            &["promote", "-D", path_str(&self.data), "-w", "-t", "60"],
        );
    }

    /// A server directory of its own, nothing in it yet.
    fn prepare(bin: PathBuf) -> PgServer {
        let run_as = if running_as_root() {
            Some(account_ids("postgres").unwrap_or_else(|| {
                panic!("running as root, but there is no `postgres` account to run the server as")
            }))
        } else {
            None
        };
        let root = fresh_dir();
        std::fs::create_dir_all(&root).expect("create temp dir for PostgreSQL");
        if let Some((uid, gid)) = run_as {
            chown(&root, Some(uid), Some(gid)).expect("chown temp dir to postgres");
        }
        PgServer {
            data: root.join("data"),
            root,
            bin,
            port: 0,
            run_as,
            watchdog: None,
        }
    }

    /// Starts the server in `self.data` on a free port, guarded by a watchdog.
    fn launch(mut self) -> PgServer {
        self.watchdog = Some(self.spawn_watchdog());
        let mut last_error = String::new();
        for _ in 0..5 {
            self.port = free_port();
            match self.pg_ctl_start() {
                Ok(()) => return self,
                Err(e) => last_error = e,
            }
        }
        panic!("PostgreSQL did not start: {last_error}");
    }

    /// `postgres://postgres:…@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`).
    pub fn stop_immediate(&self) {
        self.run_checked(
            "pg_ctl",
            &["stop", "-D", path_str(&self.data), "-m", "immediate", "-w"],
        );
    }

    /// Starts the server again on the same port, after `stop_immediate`.
    pub fn restart(&self) {
        if let Err(e) = self.pg_ctl_start() {
            panic!("PostgreSQL did not restart: {e}");
        }
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=200 -c fsync=on",
            self.port,
            path_str(&self.root)
        );
        let log = self.root.join("server.log");
        let out = self
            .command("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D", path_str(&self.data), "-l"])
            .arg(&log)
            .args(["-o", &options])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("could not run pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            ))
        }
    }

    /// A helper process that outlives this one: when this process is gone
    /// (exit, panic or kill) it stops the server and removes its directory.
    fn spawn_watchdog(&self) -> Child {
        let script = r#"while [ -d "/proc/$0" ]; do sleep 0.5; done
"$1/pg_ctl" stop -D "$2" -m immediate >/dev/null 2>&1
rm -rf "$3""#;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg(std::process::id().to_string())
            .arg(&self.bin)
            .arg(&self.data)
            .arg(&self.root)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.spawn().expect("spawn PostgreSQL watchdog")
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(&self.root);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn run_checked(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("could not run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["stop", "-D", path_str(&self.data), "-m", "fast", "-w"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
        // The server is gone; the watchdog has nothing left to guard.
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

/// `pgbench` of the PostgreSQL installation the tests use, if installed.
pub fn pgbench() -> Option<PathBuf> {
    let path = find_bin_dir()?.join("pgbench");
    path.is_file().then_some(path)
}

fn has_server_tools(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("pg_ctl").is_file()
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(PG_BIN).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return has_server_tools(&dir).then_some(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server_tools(&dir) {
                // Debian links initdb into PATH; resolve to the real bin dir so
                // pg_ctl finds the matching `postgres` next to it.
                let real = std::fs::canonicalize(dir.join("initdb")).ok()?;
                return real.parent().map(Path::to_path_buf);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|dir| has_server_tools(dir))
        .collect();
    versions.sort_by_key(|dir| {
        dir.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop()
}

/// Whether this process runs as root (PostgreSQL then runs as `postgres`).
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The uid and gid of account `name`.
pub fn account_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() > 3 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn fresh_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "fsp-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free loopback port")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}
