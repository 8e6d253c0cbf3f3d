//! `ehc-agent outbox list|retry|flush|purge`: through the running daemon's
//! control socket when it answers (so `flush` wakes the daemon's own
//! uploader), on the outbox file directly when it does not.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

use super::EXIT_USAGE;
use crate::agent::outbox::report;
use crate::agent::outbox::uploader::{self, UploaderSettings};
use crate::agent::outbox::{Outbox, Store};
use crate::cli::{OutboxAction, OutboxArgs};
use crate::clock;
use crate::config::{self, Config, Env};
use crate::platform::{Client, ClientSettings};

/// Give up a flush after this many failed attempts in a row.
const FLUSH_GIVE_UP: u64 = 5;

pub fn run(a: OutboxArgs) -> anyhow::Result<ExitCode> {
    if a.outbox.is_none() {
        let control = super::control_path(a.control.as_deref(), a.config.as_deref());
        if let Some(code) = super::runtime()?.block_on(via_daemon(&control, &a.action))? {
            return Ok(code);
        }
    }
    let needs_platform = matches!(a.action, OutboxAction::Flush);
    let (path, cfg) = match (&a.outbox, needs_platform) {
        (Some(p), false) => (p.clone(), None),
        _ => match config::load(a.config.as_deref(), &Env::from_process()) {
            Ok(c) => (c.outbox_path.clone(), Some(c)),
            Err(e) => {
                eprintln!("ehc-agent: {e}");
                if !needs_platform {
                    eprintln!("(give the outbox file with --outbox PATH to inspect it without a valid configuration)");
                }
                return Ok(ExitCode::from(EXIT_USAGE));
            }
        },
    };
    if !path.exists() {
        eprintln!("ehc-agent: no outbox at {}", path.display());
        return Ok(ExitCode::from(1));
    }
    match a.action {
        OutboxAction::List { json } => list(path, json),
        OutboxAction::Retry { id, held } => {
            if id.is_none() && !held {
                eprintln!("ehc-agent: say which rows: `outbox retry ID` or `outbox retry --held`");
                return Ok(ExitCode::from(EXIT_USAGE));
            }
            let mut store = open(&path)?;
            let n = store.retry_held(id, clock::now_unix())?;
            match (id, n) {
                (Some(id), 0) => {
                    eprintln!("ehc-agent: row {id} is not held");
                    Ok(ExitCode::from(1))
                }
                _ => {
                    println!("re-queued {n} held row(s); the agent uploads them on its next pass");
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        OutboxAction::Purge { held, yes } => {
            if held && !yes {
                eprintln!("ehc-agent: purging held rows deletes uses the platform never received; add --yes if that is what you want");
                return Ok(ExitCode::from(EXIT_USAGE));
            }
            let mut store = open(&path)?;
            let n = store.purge(i64::MAX, held)?;
            println!(
                "deleted {n} row(s) ({})",
                if held { "sent and held" } else { "sent" }
            );
            Ok(ExitCode::SUCCESS)
        }
        OutboxAction::Flush => {
            let cfg = cfg.context("flush needs the configuration")?;
            super::runtime()?.block_on(flush(cfg))
        }
    }
}

fn open(path: &std::path::Path) -> anyhow::Result<Store> {
    Store::open(path).with_context(|| format!("opening the outbox {}", path.display()))
}

fn list(path: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let store = open(&path)?;
    let l = report::listing(&store, clock::now_unix())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&l)?);
    } else {
        print!("{}", l.human());
    }
    Ok(ExitCode::SUCCESS)
}

async fn flush(cfg: Config) -> anyhow::Result<ExitCode> {
    if tokio::net::UnixStream::connect(&cfg.his_unix).await.is_ok() {
        eprintln!(
            "ehc-agent: the agent is running (it answers on {}) and uploads on its own; stop it to flush from here",
            cfg.his_unix.display()
        );
        return Ok(ExitCode::from(1));
    }
    let outbox = Outbox::open(&cfg.outbox_path)?;
    outbox.resume().await;
    let now = clock::now_unix();
    outbox.with_store(move |s| s.make_all_due(now)).await?;
    let c = outbox.counts().await?;
    let total = (c.pending + c.waiting) as u64;
    if total == 0 {
        println!("nothing to upload");
        return Ok(ExitCode::SUCCESS);
    }
    let client = Client::new(ClientSettings::from_config(&cfg))?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(uploader::run(
        outbox.clone(),
        client,
        UploaderSettings::from_config(&cfg),
        cancel.clone(),
    ));
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} uploaded  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let result = loop {
        let c = outbox.counts().await?;
        let left = (c.pending + c.waiting) as u64;
        bar.set_position(total.saturating_sub(left));
        let st = outbox.status();
        if left == 0 {
            break Ok(c.held);
        }
        if let Some(why) = st.stopped {
            break Err(format!("uploads stopped: {why}"));
        }
        if let Some(t) = st.rate_limited_until {
            break Err(format!(
                "the platform's daily call limit is reached; uploads resume at {} (Beijing time)",
                clock::platform_time(t, clock::BEIJING)
            ));
        }
        if st.consecutive_failures >= FLUSH_GIVE_UP {
            break Err(format!(
                "{} attempts failed in a row; last: {}",
                st.consecutive_failures,
                st.last_error.unwrap_or_default()
            ));
        }
        if let Some(e) = &st.last_error {
            bar.set_message(format!("last error: {e}"));
        }
        outbox.next_pass(Duration::from_secs(1)).await;
    };
    cancel.cancel();
    let _ = task.await;
    bar.finish_and_clear();
    match result {
        Ok(held) => {
            println!(
                "uploaded {total} row(s){}",
                if held > 0 {
                    format!("; {held} held row(s) need attention (`ehc-agent outbox list`)")
                } else {
                    String::new()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => {
            let c = outbox.counts().await?;
            eprintln!(
                "ehc-agent: flush incomplete, {} row(s) still pending: {why}",
                c.pending + c.waiting
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// Run the action through the daemon; `None` when no daemon answers.
async fn via_daemon(
    control: &std::path::Path,
    action: &OutboxAction,
) -> anyhow::Result<Option<ExitCode>> {
    use crate::agent::control::{request, ControlError, Request};
    let req = match action {
        OutboxAction::List { .. } => Request::OutboxList,
        OutboxAction::Retry { id, held } => {
            if id.is_none() && !held {
                eprintln!("ehc-agent: say which rows: `outbox retry ID` or `outbox retry --held`");
                return Ok(Some(ExitCode::from(EXIT_USAGE)));
            }
            Request::OutboxRetry {
                id: *id,
                held: *held,
            }
        }
        OutboxAction::Flush => Request::OutboxFlush,
        OutboxAction::Purge { held, yes } => {
            if *held && !yes {
                eprintln!("ehc-agent: purging held rows deletes uses the platform never received; add --yes if that is what you want");
                return Ok(Some(ExitCode::from(EXIT_USAGE)));
            }
            Request::OutboxPurge { held: *held }
        }
    };
    let v = match request(control, &req).await {
        Ok(v) => v,
        Err(ControlError::NotRunning(_)) => return Ok(None),
        Err(e) => {
            eprintln!("ehc-agent: {e}");
            return Ok(Some(ExitCode::from(1)));
        }
    };
    match action {
        OutboxAction::List { json } => {
            let l: report::Listing = serde_json::from_value(v["listing"].clone())?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print!("{}", l.human());
            }
        }
        OutboxAction::Retry { id, .. } => {
            let n = v["requeued"].as_u64().unwrap_or(0);
            if id.is_some() && n == 0 {
                eprintln!("ehc-agent: row {} is not held", id.unwrap_or_default());
                return Ok(Some(ExitCode::from(1)));
            }
            println!("re-queued {n} held row(s); the agent uploads them now");
        }
        OutboxAction::Purge { held, .. } => println!(
            "deleted {} row(s) ({})",
            v["deleted"],
            if *held { "sent and held" } else { "sent" }
        ),
        OutboxAction::Flush => {
            return flush_via_daemon(control, v["pending"].as_u64().unwrap_or(0))
                .await
                .map(Some)
        }
    }
    Ok(Some(ExitCode::SUCCESS))
}

/// Follow the daemon's uploads with a progress bar until the outbox is
/// empty, or say why it will not be.
async fn flush_via_daemon(control: &std::path::Path, total: u64) -> anyhow::Result<ExitCode> {
    use crate::agent::control::{request, Request};
    if total == 0 {
        println!("nothing to upload");
        return Ok(ExitCode::SUCCESS);
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} uploaded  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut failures_at_start = None;
    let result = loop {
        let v = request(control, &Request::Status).await?;
        let st: crate::agent::status::Status = serde_json::from_value(v["status"].clone())?;
        let left = (st.outbox.pending + st.outbox.waiting) as u64;
        bar.set_position(total.saturating_sub(left));
        let base = *failures_at_start.get_or_insert(st.uploads.failed_attempts);
        if left == 0 {
            break Ok(());
        }
        if let Some(why) = st.uploads.stopped {
            break Err(format!("uploads stopped: {why}"));
        }
        if let Some(t) = st
            .uploads
            .rate_limited_until
            .filter(|t| *t > clock::now_unix())
        {
            break Err(format!(
                "the platform's daily call limit is reached; uploads resume at {} (Beijing time)",
                clock::platform_time(t, clock::BEIJING)
            ));
        }
        if st.uploads.failed_attempts >= base + FLUSH_GIVE_UP {
            break Err(format!(
                "{} attempts failed; last: {}",
                st.uploads.failed_attempts - base,
                st.uploads.last_error.unwrap_or_default()
            ));
        }
        if let Some(e) = &st.uploads.last_error {
            bar.set_message(format!("last error: {e}"));
        }
        // A CLI following a daemon: a short poll is the simple, honest way.
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    bar.finish_and_clear();
    match result {
        Ok(()) => {
            println!("uploaded {total} row(s)");
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => {
            eprintln!("ehc-agent: flush incomplete: {why}");
            Ok(ExitCode::from(1))
        }
    }
}
