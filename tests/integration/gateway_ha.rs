//! Two gateways sharing Redis (Debian's `redis-server`, started here on a
//! free loopback port): terminals spread over both, one gateway SIGKILLed
//! under load, Redis stopped and restarted, a late refresh answer: one
//! valid upstream token throughout, no revocation ping-pong, no lost use.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use ehc_agent::gateway::redis::RedisStore;
use ehc_agent::platform::token::{SharedTokens, Token};
use ehc_agent::sim::SimConfig;

use crate::common::*;
use crate::daemon::{until_sim, Daemon, HisClient, Options};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait until something accepts connections on `port` (bounded).
fn wait_listening(port: u16, what: &str) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("{what} never listened on {port}");
}

struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    fn start(dir: &Path) -> Option<Redis> {
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| Path::new(p).is_file())?;
        let _ = bin;
        let mut r = Redis {
            port: free_port(),
            dir: dir.to_owned(),
            child: None,
        };
        r.spawn();
        Some(r)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--dir",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        wait_listening(self.port, "redis-server");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn redis_or_skip(test: &str, dir: &Path) -> Option<Redis> {
    let r = Redis::start(dir);
    if r.is_none() {
        skip(
            test,
            "no redis-server (.ci/run installs it; or apt-get install redis-server)",
            true,
        );
    }
    r
}

/// A gateway process with its configuration in `dir`.
fn gateway_config(sim: &ehc_agent::sim::SimServer, dir: &Path, port: u16, redis: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let secret = dir.join("upstream_secret");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = dir.join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\nredis_url = \"{redis}\"\n[upstream]\nbase_url = \"{}\"\napp_id = \"{APP_ID}\"\nhospital_id = \"{HOSPITAL}\"\napp_secret_file = \"upstream_secret\"\n",
            sim.base_url()
        ),
    )
    .unwrap();
    cfg
}

fn gateway_process(cfg: &Path, port: u16) -> Child {
    let child = agent()
        .args(["gateway", "run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port, "the gateway");
    child
}

/// `gateway terminal add` through the CLI: the app_id and secret it prints.
fn enrol(cfg: &Path, name: &str) -> (String, String) {
    let out = agent()
        .args(["gateway", "terminal", "add", name, "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {text}"))
            .trim()
            .trim_matches('"')
            .to_owned()
    };
    // The secret is printed once, alone, on the last line.
    let secret = text
        .lines()
        .last()
        .unwrap()
        .trim_start_matches("# ")
        .to_owned();
    (field("app_id = "), secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_one_token_through_a_gateway_kill_and_a_redis_restart() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut redis) = redis_or_skip(
        "two_gateways_one_token_through_a_gateway_kill_and_a_redis_restart",
        dir.path(),
    ) else {
        return;
    };
    let sim = sim_with(SimConfig {
        token_ttl_s: 30,
        ..SimConfig::default()
    })
    .await;
    let (p1, p2) = (free_port(), free_port());
    let c1 = gateway_config(&sim, &dir.path().join("gw1"), p1, &redis.url());
    let c2 = gateway_config(&sim, &dir.path().join("gw2"), p2, &redis.url());
    let mut g1 = gateway_process(&c1, p1);
    let mut g2 = gateway_process(&c2, p2);
    let (u1, u2) = (
        format!("http://127.0.0.1:{p1}"),
        format!("http://127.0.0.1:{p2}"),
    );

    // Four windows, enrolled on either gateway (one shared registry), half
    // preferring each.
    let mut agents = Vec::new();
    for i in 0..4 {
        let cfg = if i % 2 == 0 { &c1 } else { &c2 };
        let (app_id, secret) = enrol(cfg, &format!("WIN-{i}"));
        let order = if i % 2 == 0 { [&u1, &u2] } else { [&u2, &u1] };
        let opts = Options {
            platform_addr_line: Some(format!("base_urls = [\"{}\", \"{}\"]", order[0], order[1])),
            account: Some((app_id, secret)),
            ..Options::default()
        };
        let d = Daemon::start_with(&sim, opts).await;
        let his = HisClient::unix(&d).await;
        agents.push((d, his));
    }
    let mut delivered = 0u64;
    let mut round = 0usize;
    let scan_round = |agents: &mut Vec<(Daemon, HisClient)>, round: &mut usize| {
        let r = *round;
        *round += 1;
        agents
            .iter_mut()
            .map(|(d, _)| {
                d.scan(&sim.with_state(|s| s.static_code(r % 3)).unwrap());
            })
            .count()
    };
    async fn collect(agents: &mut [(Daemon, HisClient)], phase: &str) -> u64 {
        let mut n = 0;
        for (i, (d, his)) in agents.iter_mut().enumerate() {
            let m = his.next_of(&["card", "scanFailed"]).await;
            assert_eq!(
                (m["type"].as_str(), m["verified"].as_bool()),
                (Some("card"), Some(true)),
                "{phase}, agent {i}: {m}\nits log:\n{}",
                d.log()
            );
            n += 1;
        }
        n
    }
    for _ in 0..3 {
        scan_round(&mut agents, &mut round);
        delivered += collect(&mut agents, "both gateways up").await;
    }
    // Gateway 1 dies under load: its terminals go to gateway 2 with the
    // tokens gateway 1 gave them.
    let _ = Command::new("kill")
        .args(["-KILL", &g1.id().to_string()])
        .status();
    let _ = g1.wait();
    for _ in 0..3 {
        scan_round(&mut agents, &mut round);
        delivered += collect(&mut agents, "gateway 1 killed").await;
    }
    // Redis goes away: gateway 2 serves from what it knows.
    redis.stop();
    for _ in 0..2 {
        scan_round(&mut agents, &mut round);
        delivered += collect(&mut agents, "redis down").await;
    }
    // Redis is back (its data on disk), and so is gateway 1.
    redis.spawn();
    g1 = gateway_process(&c1, p1);
    for _ in 0..3 {
        scan_round(&mut agents, &mut round);
        delivered += collect(&mut agents, "all back").await;
    }
    let st = until_sim(&sim, "every use reported", |s| {
        s["uniqueReports"] == delivered
    })
    .await;
    let token_calls = calls(&sim, "getAppToken", "0").await;
    // One token for all of it (the run is shorter than a token's life),
    // give or take one refresh: no ping-pong between the gateways.
    assert!(
        token_calls <= 2,
        "{token_calls} getAppToken: {}",
        st["calls"]
    );
    for (d, _) in agents {
        assert!(!d.log().contains("reason=Rejected"), "{}", d.log());
    }
    for g in [&mut g1, &mut g2] {
        let _ = g.kill();
        let _ = g.wait();
    }
}

/// The lease and the compare-and-set against a real Redis: one holder at a
/// time, released only by its holder, and a late answer (a refresh that
/// started from generation 0 and ends after another stored generation 1)
/// never overwrites the newer token.
#[test]
fn lease_and_compare_and_set() {
    let dir = tempfile::tempdir().unwrap();
    let Some(redis) = redis_or_skip("lease_and_compare_and_set", dir.path()) else {
        return;
    };
    let s = RedisStore::new(&redis.url(), "t:").unwrap();
    assert_eq!(s.load().unwrap(), None);
    assert!(s.lease("A", 10_000).unwrap());
    assert!(!s.lease("B", 10_000).unwrap(), "one holder at a time");
    s.release("B").unwrap();
    assert!(!s.lease("B", 10_000).unwrap(), "only the holder releases");
    let tok = |v: &str| Token {
        value: v.into(),
        expires_at: 2_000_000_000,
        obtained_at: 1_000,
        generation: 0,
    };
    let stored = s.store_if(0, &tok("NEW"), "A").unwrap();
    assert_eq!((stored.value.as_str(), stored.generation), ("NEW", 1));
    s.release("A").unwrap();
    assert!(s.lease("B", 10_000).unwrap());
    // B's refresh had started from generation 0 and its answer comes late.
    let stored = s.store_if(0, &tok("LATE"), "B").unwrap();
    assert_eq!(
        (stored.value.as_str(), stored.generation),
        ("NEW", 1),
        "the newer token stays"
    );
    assert_eq!(s.load().unwrap().unwrap().value, "NEW");
    assert_eq!(s.token_holder().unwrap().as_deref(), Some("A"));

    // The budget's counters, the hospital-wide one included.
    let hospital = ehc_agent::gateway::config::HOSPITAL_COUNTER;
    assert_eq!(s.take_budget(hospital, 9, Some(2)).unwrap(), Some(1));
    assert_eq!(s.take_budget(hospital, 9, Some(2)).unwrap(), Some(2));
    assert_eq!(s.take_budget(hospital, 9, Some(2)).unwrap(), None);
    assert_eq!(s.take_budget("reportHISData", 9, None).unwrap(), Some(1));
    assert_eq!(
        s.budget_used(9).unwrap(),
        [(hospital.to_owned(), 2), ("reportHISData".to_owned(), 1)]
    );

    // Heartbeats: one per terminal, the latest kept, the same for every
    // gateway reading the store.
    let beat = |t: &str, at: i64| ehc_agent::gateway::store::StoredBeat {
        terminal: t.into(),
        received_at: at,
        clock_offset_s: 0,
        peer: "10.0.0.9".into(),
        beat: ehc_agent::platform::heartbeat::Beat {
            version: "0.1.0".into(),
            terminal_id: t.to_uppercase(),
            interval_s: 30,
            status: serde_json::json!({"outbox": {"pending": at}}),
        },
    };
    s.put_beat(&beat("w1", 1)).unwrap();
    s.put_beat(&beat("w2", 2)).unwrap();
    s.put_beat(&beat("w1", 3)).unwrap();
    let other = RedisStore::new(&redis.url(), "t:").unwrap();
    let mut got = other.beats().unwrap();
    got.sort_by(|a, b| a.terminal.cmp(&b.terminal));
    assert_eq!(got, [beat("w1", 3), beat("w2", 2)]);
}
