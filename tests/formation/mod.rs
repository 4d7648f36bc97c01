//! A pg_auto_failover formation on loopback for the failover tests: a
//! monitor and two data nodes (a primary and a synchronous secondary), each
//! run by its own `pg_autoctl run` process, in a temp dir removed on drop.
//!
//! The monitor's health checks are tightened (1 s period, a node unhealthy
//! after 2 s, an unreachable primary given up as demoted after 3 s instead of
//! 30 s) so that a killed primary is failed over within seconds; the state
//! machine, the promotion and the synchronous replication are
//! pg_auto_failover's own. Needs `pg_autoctl` (Debian package
//! `postgresql-15-auto-failover`, which `.ci/run` installs) and the server
//! binaries of the PostgreSQL it was built for.

#![allow(dead_code)]

use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{account_ids, free_port, running_as_root};

/// Where Debian's pg_auto_failover finds its PostgreSQL.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const NODES: usize = 2;
/// Every wait on the formation gives up (failing the test) after this long.
const PATIENCE: Duration = Duration::from_secs(120);

pub struct Formation {
    root: PathBuf,
    monitor_port: u16,
    node_ports: [u16; NODES],
    monitor: Child,
    nodes: [Option<Child>; NODES],
    run_as: Option<(u32, u32)>,
    watchdog: Child,
}

impl Formation {
    /// Creates and starts the monitor and both nodes, and waits until one is
    /// primary and the other a secondary.
    pub fn start() -> Formation {
        assert!(
            Path::new("/usr/bin/pg_autoctl").is_file(),
            "pg_autoctl is not installed: apt-get install postgresql-15-auto-failover \
             (.ci/run installs it)"
        );
        let run_as =
            running_as_root().then(|| account_ids("postgres").expect("a postgres account"));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let root =
            std::env::temp_dir().join(format!("fsp-formation-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        if let Some((uid, gid)) = run_as {
            chown(&root, Some(uid), Some(gid)).unwrap();
        }
        let monitor_port = free_port();
        let node_ports = [free_port(), free_port()];
        let watchdog = spawn_watchdog(&root, run_as);
        let mut formation = Formation {
            monitor: spawn(
                &root,
                run_as,
                &[
                    "create",
                    "monitor",
                    "--pgdata",
                    &path_str(&root.join("monitor")),
                    "--pgport",
                    &monitor_port.to_string(),
                    "--hostname",
                    "127.0.0.1",
                    "--auth",
                    "trust",
                    "--no-ssl",
                    "--run",
                ],
                "monitor.log",
            ),
            root,
            monitor_port,
            node_ports,
            nodes: [None, None],
            run_as,
            watchdog,
        };
        formation.wait_until("the monitor accepts connections", |f| {
            f.monitor_sql("SELECT 1").is_some()
        });
        formation.tighten_health_checks();
        for node in 0..NODES {
            let monitor_uri = formation.monitor_uri();
            let pgdata = path_str(&formation.node_dir(node));
            let port = formation.node_ports[node].to_string();
            formation.nodes[node] = Some(spawn(
                &formation.root,
                run_as,
                &[
                    "create",
                    "postgres",
                    "--pgdata",
                    &pgdata,
                    "--pgport",
                    &port,
                    "--hostname",
                    "127.0.0.1",
                    "--auth",
                    "trust",
                    "--no-ssl",
                    "--monitor",
                    &monitor_uri,
                    "--run",
                ],
                &format!("node{node}.log"),
            ));
            // One at a time: the first becomes the primary.
            formation.wait_until("the node to join", |f| f.states().len() == node + 1);
        }
        formation.wait_until_healthy();
        formation
    }

    /// The formation's URI, as `pg_autoctl show uri` prints it, with the
    /// superuser named (the nodes trust loopback connections).
    pub fn uri(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
            self.node_ports[0], self.node_ports[1]
        )
    }

    /// The same hosts, the current secondary listed first.
    pub fn uri_secondary_first(&self) -> String {
        let primary = self.primary();
        let order = [1 - primary, primary].map(|n| format!("127.0.0.1:{}", self.node_ports[n]));
        format!(
            "postgres://postgres@{}/postgres?target_session_attrs=read-write",
            order.join(",")
        )
    }

    /// A single-host URL of the current primary, for checking what it holds.
    pub fn primary_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.node_ports[self.primary()]
        )
    }

    /// The node (0 or 1) the monitor says is primary now.
    pub fn primary(&self) -> usize {
        let states = self.states();
        let (port, _) = states
            .iter()
            .find(|(_, state)| state == "primary" || state == "wait_primary")
            .expect("a primary");
        self.node_ports.iter().position(|p| p == port).unwrap()
    }

    /// `pg_autoctl perform switchover`: the primary is demoted and the
    /// secondary promoted, in order. Returns once both are settled.
    pub fn switchover(&self) {
        self.autoctl(&[
            "perform",
            "switchover",
            "--pgdata",
            &path_str(&self.root.join("monitor")),
        ]);
        self.wait_until_healthy();
    }

    /// Kills the primary's node the way a machine dies (its `pg_autoctl`
    /// with SIGKILL, its PostgreSQL with `pg_ctl stop -m immediate`) and
    /// waits until the monitor has promoted the other node to a writable
    /// primary. Returns the killed node, for [`Formation::rejoin`].
    pub fn kill_primary(&mut self) -> usize {
        let primary = self.primary();
        if let Some(mut child) = self.nodes[primary].take() {
            kill_group(&child);
            let _ = child.wait();
        }
        let pg_ctl = format!("{PG_BIN}/pg_ctl");
        let _ = self
            .command(&pg_ctl)
            .args([
                "stop",
                "-D",
                &path_str(&self.node_dir(primary)),
                "-m",
                "immediate",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let other = 1 - primary;
        self.wait_until("the other node to become a writable primary", |f| {
            f.states()
                .iter()
                .any(|(port, state)| *port == f.node_ports[other] && state == "wait_primary")
        });
        primary
    }

    /// Starts a killed node's `pg_autoctl` again; waits until it is the
    /// secondary of the formation.
    pub fn rejoin(&mut self, node: usize) {
        self.nodes[node] = Some(spawn(
            &self.root,
            self.run_as,
            &["run", "--pgdata", &path_str(&self.node_dir(node))],
            &format!("node{node}-rejoin.log"),
        ));
        self.wait_until_healthy();
    }

    fn wait_until_healthy(&self) {
        self.wait_until("a primary and a secondary", |f| {
            let states = f.states();
            states.len() == NODES
                && states.iter().any(|(_, s)| s == "primary")
                && states.iter().any(|(_, s)| s == "secondary")
        });
    }

    /// (port, reported state) of every node, from the monitor.
    fn states(&self) -> Vec<(u16, String)> {
        let rows = self
            .monitor_sql(
                "SELECT nodeport || ' ' || reportedstate FROM pgautofailover.node \
                 WHERE reportedstate = goalstate",
            )
            .unwrap_or_default();
        rows.lines()
            .filter_map(|line| {
                let (port, state) = line.split_once(' ')?;
                Some((port.parse().ok()?, state.to_owned()))
            })
            .collect()
    }

    fn tighten_health_checks(&self) {
        for setting in [
            "pgautofailover.health_check_period = 1000",
            "pgautofailover.health_check_timeout = 1000",
            "pgautofailover.health_check_max_retries = 1",
            "pgautofailover.health_check_retry_delay = 200",
            "pgautofailover.node_considered_unhealthy_timeout = 2000",
            "pgautofailover.primary_demote_timeout = 3000",
        ] {
            self.monitor_sql(&format!("ALTER SYSTEM SET {setting}"))
                .expect("tighten the monitor's health checks");
        }
        self.monitor_sql("SELECT pg_reload_conf()").unwrap();
    }

    fn monitor_uri(&self) -> String {
        format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover?sslmode=disable",
            self.monitor_port
        )
    }

    /// Runs `sql` on the monitor with psql; `None` when it fails.
    fn monitor_sql(&self, sql: &str) -> Option<String> {
        let out = Command::new(format!("{PG_BIN}/psql"))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .arg(format!(
                "postgres://postgres@127.0.0.1:{}/pg_auto_failover",
                self.monitor_port
            ))
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn autoctl(&self, args: &[&str]) {
        let out = self
            .command("/usr/bin/pg_autoctl")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run pg_autoctl");
        assert!(
            out.status.success(),
            "pg_autoctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn command(&self, program: &str) -> Command {
        command(&self.root, self.run_as, program)
    }

    fn node_dir(&self, node: usize) -> PathBuf {
        self.root.join(format!("node{node}"))
    }

    fn wait_until(&self, what: &str, done: impl Fn(&Formation) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done(self) {
            if Instant::now() > deadline {
                let logs = std::fs::read_dir(&self.root)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                    .map(|e| {
                        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(15).collect();
                        format!(
                            "{}:\n{}",
                            e.path().display(),
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!(
                    "waited {PATIENCE:?} for {what}; states {:?}\n{logs}",
                    self.states()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Formation {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten().chain([&mut self.monitor]) {
            kill_group(child);
            let _ = child.wait();
        }
        let _ = Command::new("sh")
            .arg("-c")
            .arg(KILL_EVERYTHING_UNDER)
            .arg("formation")
            .arg(&self.root)
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

fn command(root: &Path, run_as: Option<(u32, u32)>, program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(root)
        .env("XDG_CONFIG_HOME", root.join("config"))
        .env("XDG_DATA_HOME", root.join("data"))
        .env("PG_CONFIG", format!("{PG_BIN}/pg_config"))
        .env(
            "PATH",
            format!("{PG_BIN}:{}", std::env::var("PATH").unwrap_or_default()),
        );
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// `pg_autoctl` with `args`, in a process group of its own (so that it and
/// the processes it starts can be killed together), logging to `log`.
fn spawn(root: &Path, run_as: Option<(u32, u32)>, args: &[&str], log: &str) -> Child {
    let log = std::fs::File::create(root.join(log)).unwrap();
    command(root, run_as, "/usr/bin/pg_autoctl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("start pg_autoctl")
}

fn kill_group(child: &Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
}

/// SIGKILLs every process started for the formation at `$1`: `pg_autoctl`
/// renames its worker processes and they start PostgreSQL's, so no command
/// line names the formation, but every one of them carries its
/// `XDG_CONFIG_HOME` in its environment.
const KILL_EVERYTHING_UNDER: &str = r#"for p in /proc/[0-9]*; do
  if grep -qzx "XDG_CONFIG_HOME=$1/config" "$p/environ" 2>/dev/null; then kill -KILL "${p#/proc/}" 2>/dev/null; fi
done"#;

/// Stops every process of the formation under `root` and removes it once
/// this process is gone, however it ends.
fn spawn_watchdog(root: &Path, run_as: Option<(u32, u32)>) -> Child {
    let script = format!(
        r#"while [ -d "/proc/$0" ]; do sleep 0.5; done
{KILL_EVERYTHING_UNDER}
rm -rf "$1""#
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg(std::process::id().to_string())
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd.spawn().expect("spawn the formation's watchdog")
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_owned()
}
