//! Tools of the fault suite: a seeded random generator, a TCP proxy that
//! cuts connections on demand, child processes of this very test binary, and
//! a report line per scenario.

#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Environment variable that turns a run of this binary into a child role.
pub const CHILD_ROLE: &str = "FAUCET_FAULT_CHILD";

/// SplitMix64: small, seedable and good enough to choose fault timings and
/// operations reproducibly.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A duration between `min_ms` and `max_ms` milliseconds.
    pub fn millis(&mut self, min_ms: u64, max_ms: u64) -> Duration {
        Duration::from_millis(min_ms + self.below(max_ms - min_ms + 1))
    }
}

/// The seed of this run: `FAUCET_FAULT_SEED` to replay one, else the clock.
/// Reported on stderr so a failure can be replayed.
pub fn seed(scenario: &str) -> u64 {
    let seed = std::env::var("FAUCET_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    report(&format!(
        "{scenario}: seed {seed} (replay with FAUCET_FAULT_SEED={seed})"
    ));
    seed
}

/// Writes one line to the real stderr. Unlike `eprintln!`, this is not
/// captured by the test harness, so every scenario's counts show in a plain
/// `cargo test` run.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "faults | {line}");
}

/// A command that runs this test binary again as a child in `role`, through
/// the test named `entry` (which does nothing unless [`CHILD_ROLE`] is set).
pub fn child(entry: &str, role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
    cmd.args([entry, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// A loopback TCP proxy in front of a PostgreSQL port that resets every open
/// connection whenever [`cut_all`](Self::cut_all) is called, and stops
/// forwarding without closing anything while [`stall`](Self::stall)ed.
pub struct FaultProxy {
    port: u16,
    cut: watch::Sender<u64>,
    cuts: Arc<AtomicU64>,
    stalled: watch::Sender<bool>,
    down: watch::Sender<bool>,
    accepted: Arc<AtomicU64>,
    accept_loop: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (cut, _) = watch::channel(0u64);
        let (stalled, _) = watch::channel(false);
        let (down, _) = watch::channel(false);
        let accepted = Arc::new(AtomicU64::new(0));
        let accept_loop = tokio::spawn({
            let (cut, stalled, down) = (cut.clone(), stalled.clone(), down.clone());
            let accepted = accepted.clone();
            async move {
                let mut listener = Some(listener);
                let mut down_signal = down.subscribe();
                loop {
                    // Down: no socket listens, so connecting is refused, as
                    // with a server that is not running.
                    if *down_signal.borrow_and_update() {
                        listener = None;
                        if down_signal.wait_for(|down| !*down).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let accepting = match &listener {
                        Some(listener) => listener,
                        None => {
                            listener = Some(rebind(port).await);
                            continue;
                        }
                    };
                    let client = tokio::select! {
                        accepted = accepting.accept() => match accepted {
                            Ok((client, _)) => client,
                            Err(_) => return,
                        },
                        _ = down_signal.changed() => continue,
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let connection = Connection {
                        cut: cut.subscribe(),
                        stalled: stalled.clone(),
                        down: down.subscribe(),
                    };
                    tokio::spawn(connection.forward(client, upstream_port));
                }
            }
        });
        FaultProxy {
            port,
            cut,
            cuts: Arc::default(),
            stalled,
            down,
            accepted,
            accept_loop,
        }
    }

    /// Connections accepted so far. With the upstream server stopped, each
    /// is accepted and closed at once, as by a proxy in front of a dead
    /// primary.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Drops every connection open through the proxy right now.
    pub fn cut_all(&self) {
        self.cuts.fetch_add(1, Ordering::Relaxed);
        self.cut.send_modify(|generation| *generation += 1);
    }

    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }

    /// While `true`, nothing is forwarded in either direction and nothing is
    /// closed, as in a network partition: what arrives meanwhile is lost, as
    /// packets are, and both ends wait for an answer that does not come.
    pub fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    /// While `true`, the proxy behaves like a server that went down: every
    /// open connection is closed in an orderly way (both ends read end of
    /// file, as after a server's shutdown), and new connections are refused.
    pub fn down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

/// Listens on `port` again after an outage (the port was ours a moment ago).
async fn rebind(port: u16) -> TcpListener {
    for _ in 0..100 {
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the proxy could not listen on port {port} again");
}

/// One proxied connection and the faults it obeys.
struct Connection {
    cut: watch::Receiver<u64>,
    stalled: watch::Sender<bool>,
    down: watch::Receiver<bool>,
}

impl Connection {
    async fn forward(mut self, client: TcpStream, upstream_port: u16) {
        let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
            return;
        };
        // Linger 0: closing resets the connection, so a cut is seen by both
        // ends mid-stream, as with a failing network.
        #[allow(deprecated)]
        {
            let _ = client.set_linger(Some(Duration::ZERO));
            let _ = upstream.set_linger(Some(Duration::ZERO));
        }
        let (client_read, mut client_write) = client.into_split();
        let (upstream_read, mut upstream_write) = upstream.into_split();
        let forward = async {
            tokio::join!(
                pump(client_read, &mut upstream_write, self.stalled.subscribe()),
                pump(upstream_read, &mut client_write, self.stalled.subscribe()),
            )
        };
        // A cut drops both copies, and with them the sockets.
        let went_down = tokio::select! {
            _ = forward => false,
            _ = self.cut.changed() => false,
            _ = self.down.wait_for(|down| *down) => true,
        };
        if went_down {
            // An orderly close: end of file both ways, and the sockets stay
            // open (no reset) until the outage ends.
            let _ = client_write.shutdown().await;
            let _ = upstream_write.shutdown().await;
            let _ = self.down.wait_for(|down| !*down).await;
        }
    }
}

/// Copies `from` to `to` until `from` ends, then passes the end on; while
/// stalled, what is read is dropped.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if *stalled.borrow() {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
        self.cut_all();
    }
}

/// A task that resets every connection through a proxy at random intervals
/// until [`stop`](Self::stop)ped.
pub struct Cutter {
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Cutter {
    /// Cuts every `min_ms`..=`max_ms` milliseconds, timings drawn from `rng`.
    pub fn start(proxy: Arc<FaultProxy>, mut rng: Rng, min_ms: u64, max_ms: u64) -> Cutter {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(rng.millis(min_ms, max_ms)).await;
                    proxy.cut_all();
                }
            }
        });
        Cutter { stop, task }
    }

    /// Stops cutting; returns once the task has ended (within one interval).
    pub async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("cutter task");
    }
}

/// `url` with its port replaced.
pub fn with_port(url: &str, port: u16) -> String {
    let mut parsed = url::Url::parse(url).expect("database URL");
    parsed.set_port(Some(port)).expect("set port");
    parsed.to_string()
}

/// The port of `url`.
pub fn port_of(url: &str) -> u16 {
    url::Url::parse(url)
        .expect("database URL")
        .port()
        .unwrap_or(5432)
}

/// The value a writer stores for counter `n`, and the check that a stored
/// value is one of those, whole.
pub fn counter_value(n: u64) -> serde_json::Value {
    serde_json::json!({"n": n, "check": format!("{:016x}", n.wrapping_mul(0x9E37_79B9_7F4A_7C15))})
}

pub fn counter_of(value: &serde_json::Value) -> Option<u64> {
    let n = value["n"].as_u64()?;
    (counter_value(n) == *value).then_some(n)
}
