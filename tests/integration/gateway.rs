//! The hospital gateway against the simulator over real HTTP: it answers
//! terminals exactly as the platform would, forwards with one account and
//! one token, counts the hospital's budget, and real agents work behind it
//! unchanged but for their `[platform]` lines.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use ehc_agent::gateway::{config, RunningGateway};
use ehc_agent::sim::SimConfig;
use serde_json::{json, Value};

use crate::common::*;
use crate::daemon::{until_sim, Daemon, HisClient, Options};

/// A gateway in-process in `dir`, towards `sim`.
async fn gateway(sim: &ehc_agent::sim::SimServer, dir: &Path, extra: &str) -> RunningGateway {
    gateway_to(&sim.base_url(), dir, extra).await
}

/// A gateway in-process in `dir`, towards the platform at `upstream`.
async fn gateway_to(upstream: &str, dir: &Path, extra: &str) -> RunningGateway {
    let secret = dir.join("upstream_secret");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\n{extra}\n[upstream]\nbase_url = \"{}\"\napp_id = \"{APP_ID}\"\nhospital_id = \"{HOSPITAL}\"\napp_secret_file = \"upstream_secret\"\n",
        upstream
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = config::load(Some(&path), &Default::default()).unwrap();
    RunningGateway::start(cfg).await.unwrap()
}

async fn post_to(base: &str, api: &str, env: &Value) -> (u16, Value) {
    let r = http()
        .post(format!("{base}{}", path(api)))
        .body(env.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Enrol terminal `name` at `gw` and get it a token there.
async fn enrolled(
    gw: &RunningGateway,
    name: &str,
) -> (ehc_agent::gateway::store::Terminal, String) {
    let t = gw.store.add_terminal(name, now()).unwrap();
    let a = post_to(
        &gw.base_url(),
        "getAppToken",
        &envelope("", &rid(1), json!({"appId": t.app_id}), &t.secret),
    )
    .await
    .1;
    let token = a["rsp"]["appToken"].as_str().unwrap().to_owned();
    (t, token)
}

/// Scan card `i` at `d`; HIS must get it verified.
async fn scan_verified(
    d: &mut Daemon,
    his: &mut HisClient,
    sim: &ehc_agent::sim::SimServer,
    i: usize,
) -> Value {
    d.scan(&sim.with_state(|s| s.static_code(i)).unwrap());
    let m = his.next_of(&["card", "scanFailed"]).await;
    assert_eq!(
        (m["type"].as_str(), m["verified"].as_bool()),
        (Some("card"), Some(true)),
        "{m}"
    );
    m
}

/// The answers a terminal gets are the platform's: 21006 for a bad
/// signature, 21002 for a revoked terminal, 20002 for a skewed clock; a
/// good call is forwarded with its requestId and answered with the
/// platform's own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_get_the_platforms_answers() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&sim, dir.path(), "").await;
    let base = gw.base_url();
    let t = gw.store.add_terminal("WIN-01", now()).unwrap();
    let token_req = |secret: &str, ts: i64| {
        envelope_at(
            "",
            &rid(1),
            json!({"appId": t.app_id}),
            secret,
            HOSPITAL,
            ts,
        )
    };
    let (_, a) = post_to(&base, "getAppToken", &token_req("wrong", now())).await;
    assert_eq!(code(&a), 21006, "{a}");
    let (_, a) = post_to(&base, "getAppToken", &token_req(&t.secret, now() - 3600)).await;
    assert_eq!(code(&a), 20002, "{a}");
    let (_, a) = post_to(&base, "getAppToken", &token_req(&t.secret, now())).await;
    assert_eq!(code(&a), 0, "{a}");
    let token = a["rsp"]["appToken"].as_str().unwrap().to_owned();

    // A good call: forwarded, the platform's answer, our requestId.
    let r = rid(2);
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    let call = envelope(&token, &r, json!({"qrCodeText": qr}), &t.secret);
    let (status, a) = post_to(&base, "getHealthCardByQRCode", &call).await;
    assert_eq!((status, code(&a)), (200, 0), "{a}");
    assert_eq!(a["commonOut"]["requestId"], r.as_str());
    assert_eq!(a["rsp"]["card"]["name"], "测试甲");
    // Signed with another terminal's secret: 21006, nothing forwarded.
    let before = calls(&sim, "getHealthCardByQRCode", "0").await;
    let other = gw.store.add_terminal("WIN-02", now()).unwrap();
    let forged = envelope(&token, &rid(3), json!({"qrCodeText": qr}), &other.secret);
    let (_, a) = post_to(&base, "getHealthCardByQRCode", &forged).await;
    assert_eq!(code(&a), 21006, "{a}");
    assert_eq!(calls(&sim, "getHealthCardByQRCode", "0").await, before);

    // Revoked: the token stops working (21004), the appId is refused (21002).
    gw.store.revoke_terminal("WIN-01", now()).unwrap();
    let (_, a) = post_to(
        &base,
        "getHealthCardByQRCode",
        &envelope(&token, &rid(4), json!({"qrCodeText": qr}), &t.secret),
    )
    .await;
    assert_eq!(code(&a), 21004, "{a}");
    let (_, a) = post_to(&base, "getAppToken", &token_req(&t.secret, now())).await;
    assert_eq!(code(&a), 21002, "{a}");
    // A terminal allowed only from another network is refused from here.
    let far = gw.store.add_terminal("WIN-FAR", now()).unwrap();
    gw.store
        .set_allow("WIN-FAR", &["10.0.0.0/8".into()])
        .unwrap();
    let far_req = |n| envelope("", &rid(n), json!({"appId": far.app_id}), &far.secret);
    let (_, a) = post_to(&base, "getAppToken", &far_req(20)).await;
    assert_eq!(code(&a), 21002, "{a}");
    gw.store
        .set_allow("WIN-FAR", &["127.0.0.0/8".into()])
        .unwrap();
    let (_, a) = post_to(&base, "getAppToken", &far_req(21)).await;
    assert_eq!(code(&a), 0, "{a}");
    // The platform saw one account: one getAppToken, none of the
    // terminal's signatures.
    assert_eq!(calls(&sim, "getAppToken", "0").await, 1);
    assert_eq!(calls(&sim, "getHealthCardByQRCode", "21006").await, 0);
    gw.stop().await;
}

/// The platform answered and the answer was lost with the gateway's
/// upstream connection: a scan's query is asked again under a new
/// requestId (the terminal's would get 10054 and fail the scan) and the
/// terminal gets its own id back; a report keeps the terminal's id, and
/// the 10054 it gets tells the terminal the use is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_upstream_answer_is_asked_again_only_for_a_query() {
    use std::sync::atomic::Ordering;
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let upstream = sim.base_url().trim_start_matches("http://").to_owned();
    let (relay, die, _) = dying_relay(upstream, Death::After).await;
    let gw = gateway_to(&format!("http://{relay}"), dir.path(), "").await;
    let base = gw.base_url();
    let (t, token) = enrolled(&gw, "WIN-01").await;
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    let query = |id: &str| envelope(&token, id, json!({"qrCodeText": qr}), &t.secret);
    let (_, a) = post_to(&base, "getHealthCardByQRCode", &query(&rid(2))).await;
    assert_eq!(code(&a), 0, "{a}");
    die.store(true, Ordering::SeqCst);
    let id = rid(3);
    let (_, a) = post_to(&base, "getHealthCardByQRCode", &query(&id)).await;
    assert_eq!(code(&a), 0, "{a}");
    assert_eq!(a["commonOut"]["requestId"], id.as_str());
    assert_eq!(a["rsp"]["card"]["name"], "测试甲");
    assert_eq!(calls(&sim, "getHealthCardByQRCode", "0").await, 3);

    die.store(true, Ordering::SeqCst);
    let id = rid(4);
    let use_ = envelope(&token, &id, report(&qr), &t.secret);
    let (_, a) = post_to(&base, "reportHISData", &use_).await;
    assert_eq!(code(&a), 10054, "{a}");
    let st = state(&sim).await;
    assert_eq!(st["uniqueReports"], 1, "{st}");
    assert_eq!(st["reports"][0]["requestId"], id.as_str());
    gw.stop().await;
}

/// A terminal's new token revokes only its own old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminals_new_token_revokes_only_its_own() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&sim, dir.path(), "").await;
    let base = gw.base_url();
    let a = gw.store.add_terminal("A", now()).unwrap();
    let b = gw.store.add_terminal("B", now()).unwrap();
    let get = |t: &ehc_agent::gateway::store::Terminal, n| {
        envelope("", &rid(n), json!({"appId": t.app_id}), &t.secret)
    };
    let tok = |v: &Value| v["rsp"]["appToken"].as_str().unwrap().to_owned();
    let a1 = tok(&post_to(&base, "getAppToken", &get(&a, 1)).await.1);
    let b1 = tok(&post_to(&base, "getAppToken", &get(&b, 2)).await.1);
    let a2 = tok(&post_to(&base, "getAppToken", &get(&a, 3)).await.1);
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    let use_token = |tok: &str, t: &ehc_agent::gateway::store::Terminal, n| {
        envelope(tok, &rid(n), json!({"qrCodeText": qr}), &t.secret)
    };
    assert_eq!(
        code(
            &post_to(&base, "getHealthCardByQRCode", &use_token(&a1, &a, 10))
                .await
                .1
        ),
        21004
    );
    assert_eq!(
        code(
            &post_to(&base, "getHealthCardByQRCode", &use_token(&a2, &a, 11))
                .await
                .1
        ),
        0
    );
    assert_eq!(
        code(
            &post_to(&base, "getHealthCardByQRCode", &use_token(&b1, &b, 12))
                .await
                .1
        ),
        0
    );
    gw.stop().await;
}

/// The hospital's daily budget per interface is counted by the gateway,
/// which answers 10034 itself once it is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_budget_is_the_hospitals() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        &sim,
        dir.path(),
        "daily_budget = 2\nmetrics_listen = \"127.0.0.1:0\"",
    )
    .await;
    let base = gw.base_url();
    let mut tokens = Vec::new();
    for name in ["A", "B"] {
        tokens.push(enrolled(&gw, name).await);
    }
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    let mut codes = Vec::new();
    for i in 0..3 {
        let (t, tok) = &tokens[i % 2];
        let e = envelope(tok, &rid(10 + i as u32), report(&qr), &t.secret);
        codes.push(code(&post_to(&base, "reportHISData", &e).await.1));
    }
    assert_eq!(codes, [0, 0, 10034], "two terminals share one budget");
    assert_eq!(
        calls(&sim, "reportHISData", "0").await,
        2,
        "the third never left"
    );
    // The same, as Prometheus series on the admin listener.
    let text = http()
        .get(format!("http://{}/metrics", gw.metrics_addr.unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "ehc_agent_gateway_budget_used{api=\"reportHISData\"} 2",
        "ehc_agent_gateway_requests_total{api=\"reportHISData\",outcome=\"10034\"} 1",
        "ehc_agent_gateway_terminals 2",
    ] {
        assert!(text.contains(series), "{series} missing in\n{text}");
    }
    gw.stop().await;
}

/// Where the platform counts a hospital's calls together
/// (`budget_scope = "hospital"`), uploads stop short of the budget by the
/// scan reserve, and the reserve goes to scans: a patient at the window is
/// served after the day's uploads have used all they may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_leave_the_scan_reserve_to_scans() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        &sim,
        dir.path(),
        "daily_budget = 4\nbudget_scope = \"hospital\"\nscan_reserve = 2",
    )
    .await;
    let base = gw.base_url();
    let (t, tok) = enrolled(&gw, "A").await;
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    let mut n = 10;
    let mut call = |api: &'static str, req: Value| {
        n += 1;
        let e = envelope(&tok, &rid(n), req, &t.secret);
        let base = base.clone();
        async move { code(&post_to(&base, api, &e).await.1) }
    };
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(call("reportHISData", report(&qr)).await);
    }
    assert_eq!(codes, [0, 0, 10034], "uploads stop at budget - reserve");
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(call("getHealthCardByQRCode", json!({"qrCodeText": qr})).await);
    }
    assert_eq!(codes, [0, 0, 10034], "scans get the reserve, and no more");
    assert_eq!(call("reportHISData", report(&qr)).await, 10034);
    assert_eq!(calls(&sim, "getHealthCardByQRCode", "0").await, 2);
    assert_eq!(calls(&sim, "reportHISData", "0").await, 2);
    let day = ehc_agent::clock::day_number(now(), ehc_agent::clock::BEIJING);
    assert_eq!(
        gw.store.budget_used(day).unwrap(),
        [("all".to_owned(), 4)],
        "one counter for the hospital"
    );
    gw.stop().await;
}

/// Ten real agents behind one gateway, against a platform whose tokens live
/// 10 s: scans at every window for 25 s. The platform sees one getAppToken
/// per token lifetime (not one per agent, not a revocation storm), and every
/// card HIS saw is reported exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_agents_behind_one_gateway_share_one_token() {
    let sim = sim_with(SimConfig {
        token_ttl_s: 10,
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&sim, dir.path(), "").await;
    let mut agents = Vec::new();
    for i in 0..10 {
        let t = gw
            .store
            .add_terminal(&format!("WIN-{i:02}"), now())
            .unwrap();
        let opts = Options {
            base_url: Some(gw.base_url()),
            account: Some((t.app_id.clone(), t.secret.clone())),
            ..Options::default()
        };
        let d = Daemon::start_with(&sim, opts).await;
        let his = HisClient::unix(&d).await;
        agents.push((d, his));
    }
    let started = std::time::Instant::now();
    let mut delivered = Vec::new();
    let mut round = 0;
    while started.elapsed() < std::time::Duration::from_secs(25) {
        for (i, (d, his)) in agents.iter_mut().enumerate() {
            let m = scan_verified(d, his, &sim, (round + i) % 3).await;
            delivered.push(m["scanId"].as_str().unwrap().to_owned());
        }
        round += 1;
    }
    let n = delivered.len() as u64;
    let st = until_sim(&sim, "every use reported", |s| s["uniqueReports"] == n).await;
    let elapsed = started.elapsed().as_secs();
    let token_calls = calls(&sim, "getAppToken", "0").await;
    // A 10 s token is refreshed in its last fifth: one per 8 s, plus the
    // first, plus one of slack for the moment the test started.
    let most = elapsed / 8 + 2;
    eprintln!("ten agents, {n} scans in {elapsed} s: {token_calls} getAppToken upstream");
    assert!(
        token_calls <= most,
        "{token_calls} getAppToken in {elapsed} s (at most {most}); calls: {}",
        st["calls"]
    );
    assert_eq!(st["duplicates"], 0, "{st}");
    for (d, _) in agents {
        let log = d.log();
        assert!(
            !log.contains("reason=Rejected"),
            "a terminal saw its token rejected:\n{log}"
        );
        let (status, log, _) = d.stop();
        assert!(status.success(), "{log}");
    }
    gw.stop().await;
}

/// An agent listing two gateways uses the second when the first cannot be
/// reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_to_the_next_gateway() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&sim, dir.path(), "").await;
    let t = gw.store.add_terminal("WIN-FO", now()).unwrap();
    // An address nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let opts = Options {
        platform_addr_line: Some(format!(
            "base_urls = [\"{dead_url}\", \"{}\"]",
            gw.base_url()
        )),
        account: Some((t.app_id.clone(), t.secret.clone())),
        ..Options::default()
    };
    let mut d = Daemon::start_with(&sim, opts).await;
    let mut his = HisClient::unix(&d).await;
    scan_verified(&mut d, &mut his, &sim, 0).await;
    d.wait_log("cannot connect; trying the next address", 1);
    gw.stop().await;
}

/// TLS towards the terminals: `gateway tls init` makes a hospital CA and a
/// certificate; an agent that trusts the CA (its `ca_file`) works through
/// the gateway over HTTPS; one that does not is refused at the handshake
/// (a certificate it cannot verify is "unavailable", never "trusted").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_reach_the_gateway_over_tls_with_the_hospital_ca() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    let out = agent()
        .args(["gateway", "tls", "init", "--dir"])
        .arg(&tls_dir)
        .args(["--name", "127.0.0.1", "--name", "localhost"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("BEGIN CERTIFICATE") && printed.contains("tls_cert = "),
        "{printed}"
    );
    let gw = gateway(
        &sim,
        dir.path(),
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            tls_dir.join("server.pem").display(),
            tls_dir.join("server.key").display()
        ),
    )
    .await;
    assert!(gw.base_url().starts_with("https://"), "{}", gw.base_url());
    let t = gw.store.add_terminal("WIN-TLS", now()).unwrap();
    let with_ca = Options {
        platform_addr_line: Some(format!(
            "base_url = \"{}\"\nca_file = \"{}\"",
            gw.base_url(),
            tls_dir.join("ca.pem").display()
        )),
        account: Some((t.app_id.clone(), t.secret.clone())),
        ..Options::default()
    };
    let mut d = Daemon::start_with(&sim, with_ca).await;
    let mut his = HisClient::unix(&d).await;
    scan_verified(&mut d, &mut his, &sim, 0).await;

    let without_ca = Options {
        base_url: Some(gw.base_url()),
        account: Some((t.app_id.clone(), t.secret.clone())),
        ..Options::default()
    };
    let mut d2 = Daemon::start_with(&sim, without_ca).await;
    let mut his2 = HisClient::unix(&d2).await;
    d2.scan(&sim.with_state(|s| s.static_code(1)).unwrap());
    let m = his2.next_of(&["card", "scanFailed"]).await;
    assert!(
        m["verified"] == false,
        "an unverified server was trusted: {m}"
    );
    assert!(
        d2.log().contains("certificate") || d2.log().contains("Certificate"),
        "{}",
        d2.log()
    );
    gw.stop().await;
}
