//! The `faucet doctor` probe of a PostgreSQL-backed store.

use std::future::Future;
use std::time::{Duration, Instant};

use faucet_core::check::{CheckContext, CheckReport, Probe};
use faucet_core::state::DOCTOR_SENTINEL_KEY;
use serde_json::json;
use sqlx::Row;

use crate::config::TableName;
use crate::error::{cause_of, hint_for};
use crate::exec::Executor;
use crate::host_choice::HostChoice;
use crate::schema::{self, Layout};
use crate::sql::{self, Statements};

/// Runs the `connect`, `table` and `sentinel` probes in order; a failed probe
/// skips the ones that depend on it. Never returns an error: every failure is
/// a failing probe with a reason and a hint.
pub(crate) async fn run(
    exec: &Executor,
    table: &TableName,
    statements: &Statements,
    ctx: &CheckContext,
) -> CheckReport {
    let mut report = CheckReport::default();
    let started = Instant::now();
    let connected = timed("connect", ctx.timeout, exec.fetch(sql::WHOAMI)).await;
    if let Err(failed) = connected {
        let failed = match exec.host_choice() {
            Some(choice) => no_host_fits(choice, failed, ctx.timeout).await,
            None => failed,
        };
        report.probes.push(failed);
        report.probes.push(Probe::skip("table", "not connected"));
        report.probes.push(Probe::skip("sentinel", "not connected"));
        return report;
    }
    let mut connect = Probe::pass("connect", started.elapsed());
    if let Some(choice) = exec.host_choice() {
        // A passing probe has no reason; its hint is where the store writes.
        connect.hint = Some(format!(
            "connected to {} (target_session_attrs={})",
            choice.current_host(),
            choice.attrs()
        ));
    }
    report.probes.push(connect);

    let started = Instant::now();
    let layout = timed("table", ctx.timeout, schema::inspect(exec, table)).await;
    let table_probe = match layout {
        Ok(Layout::Ready) => Probe::pass("table", started.elapsed()),
        Ok(Layout::Missing) => Probe::fail_hint(
            "table",
            started.elapsed(),
            format!("table \"{}\" does not exist", table.as_str()),
            format!(
                "call ensure_table(), or create it out of band: {}",
                sql::create_table_sql(table)
            ),
        ),
        Ok(Layout::Wrong(problem)) => Probe::fail_hint(
            "table",
            started.elapsed(),
            format!("table \"{}\" has another layout: {problem}", table.as_str()),
            "use another table name, or migrate the table to (key TEXT PRIMARY KEY, \
             value JSONB NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW())",
        ),
        Err(failed) => failed,
    };
    let table_ok = matches!(table_probe.status, faucet_core::check::ProbeStatus::Pass);
    report.probes.push(table_probe);
    if !table_ok {
        report
            .probes
            .push(Probe::skip("sentinel", "the table is not usable"));
        return report;
    }

    let started = Instant::now();
    let sentinel = timed(
        "sentinel",
        ctx.timeout,
        sentinel_round_trip(exec, statements),
    )
    .await;
    report.probes.push(match sentinel {
        Ok(None) => Probe::pass("sentinel", started.elapsed()),
        Ok(Some(mismatch)) => Probe::fail_hint(
            "sentinel",
            started.elapsed(),
            mismatch,
            "another writer or a trigger changes rows of this table; give the store a table of its own",
        ),
        Err(failed) => failed,
    });
    report
}

/// Writes, reads back and deletes the sentinel in one message, one implicit
/// transaction: no row is left behind, and an interrupted probe rolls back.
/// Returns a description of any mismatch.
async fn sentinel_round_trip(
    exec: &Executor,
    statements: &Statements,
) -> Result<Option<String>, sqlx::Error> {
    let probe_value = json!({"probe": "faucet doctor"});
    let rows = exec
        .fetch(&statements.sentinel(DOCTOR_SENTINEL_KEY, &probe_value.to_string()))
        .await?;
    let read: Option<String> = rows.first().map(|row| row.try_get(0)).transpose()?;
    let parsed = read
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>);
    Ok(match parsed {
        Some(Ok(v)) if v == probe_value => None,
        _ => Some(format!(
            "wrote {probe_value} to the sentinel key but read back {read:?}"
        )),
    })
}

/// The connect probe of a store whose host is chosen, after its statement
/// failed: each listed host is tried again, and the probe names every host
/// and why it does not fit, or, if one does now, the host the statement
/// failed on.
async fn no_host_fits(choice: &HostChoice, failed: Probe, budget: Duration) -> Probe {
    let started = Instant::now();
    let reason = match &failed.status {
        faucet_core::check::ProbeStatus::Fail { reason } => reason.clone(),
        other => format!("{other:?}"),
    };
    match tokio::time::timeout(budget, choice.search()).await {
        Ok(Err(why_not)) => Probe::fail_hint(
            "connect",
            started.elapsed(),
            why_not,
            format!(
                "start or promote a server that gives a {} session, or list it in the URL",
                choice.attrs()
            ),
        ),
        _ => Probe {
            status: faucet_core::check::ProbeStatus::Fail {
                reason: format!("{}: {reason}", choice.current_host()),
            },
            ..failed
        },
    }
}

/// Runs one probe step under the doctor's time budget, turning an error or a
/// time-out into a failing probe with a hint.
async fn timed<T>(
    name: &'static str,
    budget: Duration,
    step: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, Probe> {
    let started = Instant::now();
    match tokio::time::timeout(budget, step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Probe::fail_hint(
            name,
            started.elapsed(),
            cause_of(&e),
            hint_for(&e).unwrap_or("see the reason; the server log may say more"),
        )),
        Err(_) => Err(Probe::fail_hint(
            name,
            started.elapsed(),
            format!("no answer within {budget:?}"),
            "the server may be down, unreachable or overloaded",
        )),
    }
}
