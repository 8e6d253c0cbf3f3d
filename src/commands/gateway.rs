//! `ehc-agent gateway …`: run the gateway, enrol and revoke terminals, and
//! show how it stands. The terminal commands work on the gateway's store
//! directly, running or not: the gateway reads a terminal's row on every
//! request, so a revocation takes effect at once.

use std::io::Write as _;
use std::process::ExitCode;

use crate::cli::{GatewayAction, GatewayArgs, TerminalAction, TlsAction};
use crate::clock;
use crate::config::Env;
use crate::gateway::config::{
    self, BudgetScope, GatewayConfig, GatewayConfigError, HOSPITAL_COUNTER,
};

use super::{runtime, EXIT_USAGE};

pub fn run(a: GatewayArgs) -> anyhow::Result<ExitCode> {
    // Certificates come before there is a configuration to point at them.
    if let GatewayAction::Tls {
        action: TlsAction::Init { dir, names },
    } = &a.action
    {
        return tls_init(dir, names);
    }
    let cfg = match config::load(a.config.as_deref(), &Env::from_process()) {
        Ok(c) => c,
        Err(e @ GatewayConfigError::Invalid { .. }) | Err(e @ GatewayConfigError::Read { .. }) => {
            eprintln!("ehc-agent gateway: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    match a.action {
        GatewayAction::Run => {
            runtime()?.block_on(crate::gateway::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        GatewayAction::Terminal { action } => terminal(&cfg, action),
        GatewayAction::Status { json } => status(&cfg, json),
        GatewayAction::Fleet { json } => fleet(&cfg, json),
        GatewayAction::Tls { .. } => unreachable!("handled above"),
    }
}

fn tls_init(dir: &std::path::Path, names: &[String]) -> anyhow::Result<ExitCode> {
    match crate::gateway::tls::init(dir, names) {
        Ok(f) => {
            println!("# in gateway.toml, [gateway]:");
            println!("tls_cert = \"{}\"", f.cert.display());
            println!("tls_key = \"{}\"", f.key.display());
            println!("# the CA key {} stays here (mode 0600); copy this CA to each terminal as /etc/ehc-agent/gateway-ca.pem", f.ca_key.display());
            println!("# and set [platform] ca_file = \"/etc/ehc-agent/gateway-ca.pem\" there:");
            print!("{}", std::fs::read_to_string(&f.ca_cert)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("ehc-agent gateway tls init: {e}");
            Ok(ExitCode::from(EXIT_USAGE))
        }
    }
}

/// `gateway fleet`: from the store (running gateway or not; with Redis,
/// every gateway's terminals).
fn fleet(cfg: &GatewayConfig, json: bool) -> anyhow::Result<ExitCode> {
    let store = crate::gateway::open_store(cfg)?;
    let f = crate::gateway::fleet::fleet(&store.terminals()?, &store.beats()?, clock::now_unix());
    let out = if json {
        serde_json::to_string_pretty(&f)? + "\n"
    } else {
        crate::gateway::fleet::table(&f)
    };
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(if f.needs_attention == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn terminal(cfg: &GatewayConfig, action: TerminalAction) -> anyhow::Result<ExitCode> {
    let store = crate::gateway::open_store(cfg)?;
    match action {
        TerminalAction::Add {
            name,
            secret_file,
            allow,
        } => {
            if let Some(bad) = allow
                .iter()
                .find(|n| !crate::gateway::server::valid_cidr(n))
            {
                eprintln!("ehc-agent gateway: --allow {bad}: not a network like 10.1.0.0/16");
                return Ok(ExitCode::from(EXIT_USAGE));
            }
            let t = match store.add_terminal(&name, clock::now_unix()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("ehc-agent gateway: {e}");
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            };
            if !allow.is_empty() {
                store.set_allow(&name, &allow)?;
            }
            let secret_line = match &secret_file {
                Some(p) => {
                    use std::os::unix::fs::OpenOptionsExt as _;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(p)?;
                    f.write_all(t.secret.as_bytes())?;
                    format!(
                        "# the secret is in {} (mode 0600): copy it to the terminal as /etc/ehc-agent/app_secret",
                        p.display()
                    )
                }
                None => {
                    eprintln!("warning: the terminal's secret is printed once below; it is not shown again (use --secret-file to write it to a file instead)");
                    format!(
                        "# write this secret, alone on one line, to /etc/ehc-agent/app_secret on the terminal (chmod 600):\n# {}",
                        t.secret
                    )
                }
            };
            println!(
                "# terminal {}: in its /etc/ehc-agent/agent.toml, [platform]:",
                t.name
            );
            println!("base_url = \"{}\"", cfg.public_url);
            println!("app_id = \"{}\"", t.app_id);
            println!("hospital_id = \"{}\"", cfg.hospital_id);
            println!("app_secret_file = \"/etc/ehc-agent/app_secret\"");
            println!("{secret_line}");
            Ok(ExitCode::SUCCESS)
        }
        TerminalAction::List { json } => {
            let ts = store.terminals()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ts)?);
                return Ok(ExitCode::SUCCESS);
            }
            let now = clock::now_unix();
            println!(
                "{:<20} {:<32} {:<10} {:<24} last seen",
                "terminal", "app_id", "state", "allowed from"
            );
            for t in ts {
                let from = if t.allow.is_empty() {
                    "anywhere".to_owned()
                } else {
                    t.allow.join(",")
                };
                println!(
                    "{:<20} {:<32} {:<10} {from:<24} {}",
                    t.name,
                    t.app_id,
                    if t.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    },
                    t.last_seen
                        .map(|s| format!(
                            "{} s ago from {}",
                            now - s,
                            t.last_peer.as_deref().unwrap_or("?")
                        ))
                        .unwrap_or_else(|| "never".into())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TerminalAction::Revoke { name } => match store.revoke_terminal(&name, clock::now_unix()) {
            Ok(()) => {
                println!("terminal {name} revoked: its token no longer works and its appId is refused (21002)");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("ehc-agent gateway: {e}");
                Ok(ExitCode::from(EXIT_USAGE))
            }
        },
    }
}

fn status(cfg: &GatewayConfig, json: bool) -> anyhow::Result<ExitCode> {
    use crate::platform::token::{Identity, TokenStore};
    let store = crate::gateway::open_store(cfg)?;
    let now = clock::now_unix();
    let day = clock::day_number(now, clock::BEIJING);
    let used = store.budget_used(day)?;
    let terminals = store.terminals()?;
    let token = TokenStore::open(
        cfg.upstream.state_path.as_deref(),
        Identity {
            base_url: cfg.upstream.base_url.clone(),
            app_id: cfg.upstream.app_id.clone(),
            hospital_id: cfg.upstream.hospital_id.clone(),
        },
    )
    .ok()
    .and_then(|s| s.current());
    if json {
        let v = serde_json::json!({
            "upstreamToken": token.as_ref().map(|t| serde_json::json!({
                "generation": t.generation,
                "obtainedAt": t.obtained_at,
                "expiresAt": t.expires_at,
                "valid": t.expires_at > now,
            })),
            "budget": {
                "day": clock::platform_time(now, clock::BEIJING)[..10].to_owned(),
                "limit": cfg.budget.map(|b| b.per_day),
                "scope": cfg.budget.map(|b| match b.scope {
                    BudgetScope::Interface => "interface",
                    BudgetScope::Hospital => "hospital",
                }),
                "scanReserve": cfg.budget.map(|b| b.scan_reserve),
                "used": used.iter().map(|(a, n)| (a.clone(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
            },
            "terminals": terminals,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some((url, prefix)) = &cfg.redis {
        let r = crate::gateway::redis::RedisStore::new(url, prefix)?;
        match r.ping() {
            Ok(()) => println!(
                "store: redis {url}: reachable; upstream token stored by {}",
                r.token_holder()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| "nobody yet".into())
            ),
            Err(e) => {
                println!("store: redis {url}: UNREACHABLE ({e}); the gateways serve from memory")
            }
        }
    } else {
        println!("store: {} (one gateway)", cfg.store_path().display());
    }
    match &token {
        Some(t) => println!(
            "upstream token: generation {}, obtained {} s ago, {}",
            t.generation,
            now - t.obtained_at,
            if t.expires_at > now {
                format!("valid for {} s", t.expires_at - now)
            } else {
                "EXPIRED".into()
            }
        ),
        None => println!("upstream token: none yet"),
    }
    match cfg.budget {
        None => println!("calls today (Beijing day), per interface, no budget:"),
        Some(b) if b.scope == BudgetScope::Interface => println!(
            "calls today (Beijing day), per interface, budget {} each:",
            b.per_day
        ),
        Some(b) => println!(
            "calls today (Beijing day), budget {} for all interfaces together, the last {} for scans only:",
            b.per_day, b.scan_reserve
        ),
    }
    for (api, n) in &used {
        let left = cfg
            .budget
            .filter(|b| b.scope == BudgetScope::Interface || api == HOSPITAL_COUNTER)
            .map(|b| format!(" ({} left)", b.per_day.saturating_sub(*n)))
            .unwrap_or_default();
        println!("  {api:<24} {n}{left}");
    }
    let active = terminals.iter().filter(|t| t.revoked_at.is_none()).count();
    let seen = terminals
        .iter()
        .filter(|t| t.last_seen.is_some_and(|s| now - s < 3600))
        .count();
    println!(
        "terminals: {active} enrolled, {seen} seen in the last hour, {} revoked",
        terminals.len() - active
    );
    Ok(ExitCode::SUCCESS)
}
