//! Durable puts per second against the number of concurrent writers, for
//! the published 1.0.1, write-through and group commit, measured side by
//! side in one run, and drawn as the README's chart.
//!
//! ```text
//! cargo bench --bench scaling    # measures, prints the table, redraws docs/scaling.svg
//! ```
//!
//! Each writer is a task putting its own keys in a loop; every `put` is
//! durable when it returns (all three subjects commit before returning).
//! Each point is the rate over a fixed wall time after a warm-up. Under
//! `cargo test --benches` it runs briefly and draws into the temp dir, so
//! the committed chart only ever comes from a full run.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, Durability, PostgresStateStore};
use serde_json::json;

const WRITERS: [usize; 5] = [1, 4, 16, 64, 256];
const KEYS_PER_WRITER: usize = 100;

/// Puts per second from `writers` tasks over `run_for`.
async fn rate(store: Arc<dyn StateStore>, writers: usize, run_for: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (store, stop, done, counting) =
                (store.clone(), stop.clone(), done.clone(), counting.clone());
            tokio::spawn(async move {
                let keys: Vec<String> = (0..KEYS_PER_WRITER).map(|k| format!("w{w}-{k}")).collect();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let value = json!({"lsn": format!("0/{:08X}", i * 4096), "ts": i});
                    store
                        .put(&keys[i % KEYS_PER_WRITER], &value)
                        .await
                        .expect("put");
                    if counting.load(Ordering::Relaxed) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    // Warm-up: every writer running, connections open.
    tokio::time::sleep(run_for / 4).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(run_for).await;
    let counted = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("writer");
    }
    counted as f64 / elapsed.as_secs_f64()
}

/// A plain store with default options, or pinned to one message per call.
async fn plain(url: &str, messages: bool) -> PostgresStateStore {
    let mut store = PostgresStateStore::connect_with(url, 5, &support::unique_table("scaling"))
        .await
        .expect("connect");
    if messages {
        store = store.with_prepared_statements(false);
    }
    store.ensure_table().await.expect("table");
    store
}

/// A log-scale line chart of `series` (name, colour, one rate per entry of
/// `WRITERS`), as SVG.
fn chart(series: &[(&str, &str, Vec<f64>)]) -> String {
    let (width, height) = (720.0, 420.0);
    let (left, right, top, bottom) = (80.0, 200.0, 40.0, 60.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let max = series
        .iter()
        .flat_map(|(_, _, rates)| rates.iter().copied())
        .fold(1.0f64, f64::max);
    let min = series
        .iter()
        .flat_map(|(_, _, rates)| rates.iter().copied())
        .fold(f64::MAX, f64::min)
        .max(1.0);
    let (lo, hi) = (min.log10().floor(), max.log10().ceil());
    let y = |rate: f64| top + plot_h * (1.0 - (rate.max(1.0).log10() - lo) / (hi - lo).max(1.0));
    let x = |i: usize| left + plot_w * i as f64 / (WRITERS.len() - 1) as f64;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">Durable puts per second \
         against concurrent writers (log scale)</text>\n",
        width / 2.0
    );
    let mut decade = lo;
    while decade <= hi {
        let value = 10f64.powf(decade);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y0:.1}\" y2=\"{y0:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + plot_w,
            left - 8.0,
            y(value) + 4.0,
            format_rate(value),
            y0 = y(value)
        );
        decade += 1.0;
    }
    for (i, writers) in WRITERS.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{writers}</text>",
            x(i),
            top + plot_h + 20.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">concurrent writers</text>",
        left + plot_w / 2.0,
        height - 16.0
    );
    for (n, (name, colour, rates)) in series.iter().enumerate() {
        let points: Vec<String> = rates
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{:.1},{:.1}", x(i), y(*r)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2.5\" points=\"{}\"/>",
            points.join(" ")
        );
        for (i, r) in rates.iter().enumerate() {
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{colour}\"/>",
                x(i),
                y(*r)
            );
        }
        let ly = top + 20.0 + 24.0 * n as f64;
        let lx = left + plot_w + 16.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"2.5\"/>\
             <text x=\"{}\" y=\"{}\">{name}</text>",
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn format_rate(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.0}M", rate / 1e6)
    } else if rate >= 1e3 {
        format!("{:.0}k", rate / 1e3)
    } else {
        format!("{rate:.0}")
    }
}

fn main() {
    let full = common::full_run();
    let run_for = Duration::from_millis(if full { 4_000 } else { 100 });
    let url = support::database_url();
    let rt = common::runtime();
    let series = rt.block_on(async {
        let mut series: Vec<(&str, &str, Vec<f64>)> = Vec::new();
        let subjects: [(&str, &str); 4] = [
            ("1.0.1", "#888888"),
            ("write-through", "#1f77b4"),
            ("group commit", "#ff7f0e"),
            ("group commit, messages", "#2ca02c"),
        ];
        for (name, colour) in subjects {
            let mut rates = Vec::new();
            for writers in WRITERS {
                let store: Arc<dyn StateStore> = match name {
                    "1.0.1" => Arc::new(common::upstream_store(&url, "scaling_upstream").await),
                    "write-through" => Arc::new(
                        plain(&url, false)
                            .await
                            .cached(CacheOptions::new().durability(Durability::WriteThrough))
                            .expect("store"),
                    ),
                    _ => Arc::new(
                        plain(&url, name.ends_with("messages"))
                            .await
                            .cached(CacheOptions::new().durability(Durability::GroupCommit))
                            .expect("store"),
                    ),
                };
                let r = rate(store, writers, run_for).await;
                println!("scaling: {name:<24} {writers:>3} writers {r:>9.0} puts/s");
                rates.push(r);
            }
            series.push((name, colour, rates));
        }
        series
    });
    let upstream = &series[0].2;
    println!("scaling: ratio to 1.0.1 at 1 / 4 / 16 / 64 / 256 writers:");
    for (name, _, rates) in &series[1..] {
        let ratios: Vec<String> = rates
            .iter()
            .zip(upstream)
            .map(|(r, u)| format!("{:.1}x", r / u))
            .collect();
        println!("scaling: {name:<24} {}", ratios.join(" / "));
    }
    let path = if full {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/scaling.svg")
    } else {
        std::env::temp_dir().join(format!("fsp-scaling-{}.svg", std::process::id()))
    };
    std::fs::create_dir_all(path.parent().expect("a parent dir")).expect("create the chart's dir");
    std::fs::write(&path, chart(&series)).expect("write the chart");
    println!("scaling: chart written to {}", path.display());
    if !full {
        let _ = std::fs::remove_file(&path);
    }
}
