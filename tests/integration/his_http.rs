//! The local HTTP API (`[his] listen_http`) against the real daemon: long
//! poll in order with what a client missed, Server-Sent Events resumed with
//! `Last-Event-ID`, `use` and `bind`, the token and the Origin rules with
//! CORS preflights, and the shipped examples (curl, Python, Java where a
//! JDK is present, the EventSource page in Chromium).

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::daemon::{until_reported, Daemon, Options};

const ORIGIN: &str = "https://his.example-hospital.cn";

fn base(d: &Daemon) -> String {
    format!("http://{}", d.http)
}

async fn get(d: &Daemon, path: &str) -> (u16, Value) {
    let r = http()
        .get(format!("{}{path}", base(d)))
        .bearer_auth(d.his_token())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), json_of(r).await)
}

async fn post_json(d: &Daemon, path: &str, body: &str) -> (u16, Value) {
    let r = http()
        .post(format!("{}{path}", base(d)))
        .bearer_auth(d.his_token())
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), json_of(r).await)
}

/// Long-poll until `n` events after `after` have come.
async fn events(d: &Daemon, after: u64, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let mut after = after;
    while got.len() < n {
        let (s, v) = get(d, &format!("/v1/events?after={after}&wait=20")).await;
        assert_eq!(s, 200, "{v}");
        let evs = v["events"].as_array().unwrap();
        assert!(!evs.is_empty() || got.len() >= n, "no event within 20 s");
        got.extend(evs.iter().cloned());
        after = v["last"].as_u64().unwrap();
    }
    got
}

fn code(sim: &ehc_agent::sim::SimServer, i: usize) -> String {
    sim.with_state(|s| s.static_code(i)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_gets_what_was_missed_in_order_then_waits_for_the_next() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    // Scanned before any HTTP client asked.
    d.scan(&code(&sim, 0));
    d.scan(&code(&sim, 1));
    let first = events(&d, 0, 2).await;
    assert_eq!(first[0]["seq"], 1);
    assert_eq!(first[1]["seq"], 2);
    assert_eq!(first[0]["event"]["type"], "card");
    let names: Vec<&str> = first
        .iter()
        .map(|e| e["event"]["card"]["name"].as_str().unwrap())
        .collect();
    let want: Vec<String> = ehc_agent::sim::config::default_cards()
        .iter()
        .take(2)
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(names, want, "in scan order");
    // Nothing new: an empty answer when the wait is over.
    let (_, v) = get(&d, "/v1/events?after=2&wait=1").await;
    assert_eq!(v, json!({"events": [], "last": 2}));
    // A poll waiting when the next card is scanned gets it.
    let waiting = {
        let (url, tok) = (
            format!("{}/v1/events?after=2&wait=30", base(&d)),
            d.his_token(),
        );
        tokio::spawn(async move {
            json_of(http().get(url).bearer_auth(tok).send().await.unwrap()).await
        })
    };
    d.scan(&code(&sim, 2));
    let v = waiting.await.unwrap();
    assert_eq!(v["events"][0]["seq"], 3, "{v}");
    // A number from before a restart of the agent gets everything held.
    let (_, v) = get(&d, "/v1/events?after=9999&wait=0").await;
    assert_eq!(v["events"].as_array().unwrap().len(), 3);
    let (s, v) = get(&d, "/v1/events?after=x").await;
    assert_eq!(s, 400);
    assert!(v["message"].as_str().unwrap().contains("whole numbers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_and_bind_over_http_reach_the_platform() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    d.scan(&code(&sim, 0));
    let ev = events(&d, 0, 1).await.remove(0);
    let scan_id = ev["event"]["scanId"].as_str().unwrap().to_owned();
    let (s, v) = post_json(
        &d,
        "/v1/use",
        &format!(r#"{{"scanId":"{scan_id}","scene":"010106","ref":7}}"#),
    )
    .await;
    assert_eq!((s, v["type"].as_str()), (200, Some("reply")), "{v}");
    assert_eq!(v["ref"], 7);
    until_reported(&sim, "the use reported", "010106").await;
    let (s, v) = post_json(
        &d,
        "/v1/bind",
        &format!(r#"{{"scanId":"{scan_id}","patid":"P-0001"}}"#),
    )
    .await;
    assert_eq!((s, v["type"].as_str()), (200, Some("reply")), "{v}");
    // Bad input is named, and harms nothing.
    let (s, v) = post_json(&d, "/v1/use", "{nope").await;
    assert_eq!(s, 400);
    assert!(v["message"].as_str().unwrap().contains("not JSON"), "{v}");
    let (s, v) = post_json(&d, "/v1/use", r#"{"type":"bind","scanId":"x"}"#).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post_json(
        &d,
        "/v1/use",
        r#"{"scanId":"S-NOT-A-SCAN","scene":"010106"}"#,
    )
    .await;
    assert_eq!((s, v["type"].as_str()), (400, Some("error")), "{v}");
    let big = format!(r#"{{"scanId":"{}"}}"#, "x".repeat(100_000));
    let (s, _) = post_json(&d, "/v1/use", &big).await;
    assert_eq!(s, 413);
    let (s, v) = get(&d, "/v1/health").await;
    assert_eq!((s, v["ok"].as_bool()), (200, Some(true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_and_the_origin_are_required() {
    let sim = sim().await;
    let d = Daemon::start(&sim).await;
    let url = format!("{}/v1/health", base(&d));
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(http().get(&url).send().await.unwrap()),
        401,
        "no token"
    );
    assert_eq!(
        status(
            http()
                .get(&url)
                .bearer_auth("wrong-token-0123456789")
                .send()
                .await
                .unwrap()
        ),
        401
    );
    assert_eq!(
        status(
            http()
                .get(&url)
                .header("x-ehc-token", d.his_token())
                .send()
                .await
                .unwrap()
        ),
        200
    );
    assert_eq!(
        status(
            http()
                .get(format!("{url}?token={}", d.his_token()))
                .send()
                .await
                .unwrap()
        ),
        200
    );
    // A page from another origin is refused even with the token.
    let r = http()
        .get(&url)
        .bearer_auth(d.his_token())
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // The allowed origin: CORS on the answer.
    let r = http()
        .get(&url)
        .bearer_auth(d.his_token())
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], ORIGIN);
    // Preflights: answered for the allowed origin only, Local Network Access included.
    let pre = |origin: &str| {
        http()
            .request(reqwest::Method::OPTIONS, format!("{}/v1/use", base(&d)))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .header("access-control-request-private-network", "true")
            .send()
    };
    let r = pre(ORIGIN).await.unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], ORIGIN);
    assert_eq!(r.headers()["access-control-allow-private-network"], "true");
    assert!(r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));
    let r = pre("http://evil.example").await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

/// Read SSE frames from `r` until `n` `data:` lines came; returns (id, data).
async fn sse(r: &mut reqwest::Response, n: usize) -> Vec<(u64, Value)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(20), r.chunk())
            .await
            .expect("an event within 20 s")
            .unwrap()
            .expect("stream open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let id = frame
                .lines()
                .find_map(|l| l.strip_prefix("id:"))
                .map(|v| v.trim().parse().unwrap());
            let data = frame.lines().find_map(|l| l.strip_prefix("data:"));
            if let (Some(id), Some(data)) = (id, data) {
                out.push((id, serde_json::from_str(data.trim()).unwrap()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_resume_with_last_event_id() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let url = format!("{}/v1/events/stream", base(&d));
    let mut r = http()
        .get(&url)
        .bearer_auth(d.his_token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    d.scan(&code(&sim, 0));
    let got = sse(&mut r, 1).await;
    assert_eq!(got[0].0, 1);
    assert_eq!(got[0].1["type"], "card");
    drop(r);
    // Away while two more are scanned; back with the last id it saw.
    d.scan(&code(&sim, 1));
    d.scan(&code(&sim, 2));
    events(&d, 1, 2).await;
    let mut r = http()
        .get(&url)
        .bearer_auth(d.his_token())
        .header("last-event-id", "1")
        .send()
        .await
        .unwrap();
    let got = sse(&mut r, 2).await;
    assert_eq!(got.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [2, 3]);
}

fn example(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// Run an example client to its end (a minute at most); it must succeed.
/// Its standard output.
async fn ran(mut cmd: tokio::process::Command) -> String {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the example ends within a minute")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The curl long-poll loop prints the card it was waiting for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_example_long_polls() {
    if find(&["curl"]).is_none() {
        skip(
            "curl_example_long_polls",
            "no curl (.ci/run installs it)",
            true,
        );
        return;
    }
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let mut child = tokio::process::Command::new("sh")
        .arg(example("his-http-poll.sh"))
        .env("EHC_HTTP", base(&d))
        .env("EHC_TOKEN_FILE", d.path().join("his.token"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    d.scan(&code(&sim, 3));
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("a line within 30 s")
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["seq"], 1);
    assert_eq!(v["event"]["type"], "card");
    let _ = child.kill().await;
}

/// The Python example reads the card and reports its use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_uses_the_card() {
    let Some(py) = find(&["python3"]) else {
        skip(
            "python_example_uses_the_card",
            "no python3 (.ci/run installs it)",
            true,
        );
        return;
    };
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    d.scan(&code(&sim, 2));
    let mut cmd = tokio::process::Command::new(py);
    cmd.arg(example("his-http-client.py"))
        .args([
            "--base",
            &base(&d),
            "--scene",
            "010105",
            "--once",
            "--token-file",
        ])
        .arg(d.path().join("his.token"));
    let text = ran(cmd).await;
    assert!(
        text.contains("\"type\": \"card\"") && text.contains("\"type\": \"reply\""),
        "{text}"
    );
    until_reported(&sim, "the Python client's use", "010105").await;
}

/// The Java example, compiled and run where a JDK is present (most HIS back
/// ends are Java).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_example_uses_the_card() {
    let (Some(javac), Some(java)) = (find(&["javac"]), find(&["java"])) else {
        skip(
            "java_example_uses_the_card",
            "no JDK (javac, java) on this machine",
            false,
        );
        return;
    };
    let classes = tempfile::tempdir().unwrap();
    let st = Command::new(javac)
        .arg("-d")
        .arg(classes.path())
        .arg(example("HisHttpClient.java"))
        .status()
        .unwrap();
    assert!(st.success(), "javac failed");
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    d.scan(&code(&sim, 1));
    let mut cmd = tokio::process::Command::new(java);
    cmd.arg("-cp")
        .arg(classes.path())
        .arg("HisHttpClient")
        .arg(base(&d))
        .arg(d.path().join("his.token"))
        .args(["010104", "--once"]);
    let text = ran(cmd).await;
    assert!(text.contains("card S") || text.contains("card "), "{text}");
    until_reported(&sim, "the Java client's use", "010104").await;
}

/// A network namespace with a veth pair: the HIS web server's side at
/// `10.231.N.2`, this side at `10.231.N.1`. Removed on drop.
struct Netns {
    name: String,
    pub page_ip: String,
}

impl Netns {
    fn make() -> Result<Netns, String> {
        let n = std::process::id() % 200 + 20;
        let name = format!("ehc-his-{n}");
        let (a, b) = (format!("ehcv{n}a"), format!("ehcv{n}b"));
        let run = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["netns", "add", &name])?;
        let ns = Netns {
            name: name.clone(),
            page_ip: format!("10.231.{n}.2"),
        };
        run(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        run(&["link", "set", &b, "netns", &name])?;
        run(&["addr", "add", &format!("10.231.{n}.1/30"), "dev", &a])?;
        run(&["link", "set", &a, "up"])?;
        run(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("10.231.{n}.2/30"),
            "dev",
            &b,
        ])?;
        run(&["netns", "exec", &name, "ip", "link", "set", &b, "up"])?;
        run(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The veth pair goes with the namespace.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Kills a process group on drop (Chromium's helpers, the page server).
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("--")
            .arg(format!("-{}", self.0.id()))
            .status();
        let _ = self.0.wait();
    }
}

/// The policy file this test wrote, removed afterwards unless it was there.
struct PolicyFile(Option<std::path::PathBuf>);

impl Drop for PolicyFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The real thing: Debian's Chromium loads the HIS page from an intranet
/// origin (a web server in its own network namespace, over a veth pair),
/// with the policy `ehc-agent browser-policy` wrote in place, and the page
/// receives a scanned card over Server-Sent Events (and reports its use
/// over fetch), and another over the WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_page_from_an_intranet_origin_gets_cards_over_sse_and_websocket() {
    use std::os::unix::process::CommandExt as _;
    let test = "browser_page_from_an_intranet_origin";
    let Some(chromium) = find(&["chromium", "chromium-browser", "google-chrome"]) else {
        skip(test, "no Chromium (.ci/run installs it)", true);
        return;
    };
    let Some(py) = find(&["python3"]) else {
        skip(test, "no python3 (.ci/run installs it)", true);
        return;
    };
    let ns = match Netns::make() {
        Ok(n) => n,
        Err(e) => {
            // Not root, or a sandbox without network namespaces.
            skip(
                test,
                &format!("cannot make a network namespace: {e}"),
                false,
            );
            return;
        }
    };
    let origin = format!("http://{}:8080", ns.page_ip);
    let web = Group(
        Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(&py)
            .args([
                "-m",
                "http.server",
                "8080",
                "--bind",
                &ns.page_ip,
                "--directory",
            ])
            .arg(example(""))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let mut up = false;
    for _ in 0..500 {
        if std::net::TcpStream::connect(format!("{}:8080", ns.page_ip)).is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "the HIS web server in the namespace answers");
    // The policy, as IT would put it in place.
    let ours = std::path::Path::new("/etc/chromium/policies/managed").join("ehc-agent.json");
    let _policy = PolicyFile((!ours.exists()).then(|| ours.clone()));
    let out = agent()
        .args([
            "browser-policy",
            "--browser",
            "chromium",
            "--origin",
            &origin,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = agent()
        .args([
            "browser-policy",
            "--browser",
            "chromium",
            "--check",
            "--origin",
            &origin,
        ])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    let sim = sim().await;
    let mut d = Daemon::start_with(
        &sim,
        Options {
            allowed_origins: vec![origin.clone()],
            ..Options::default()
        },
    )
    .await;
    let open = |url: String, profile: &std::path::Path| {
        Group(
            Command::new(&chromium)
                .args(HEADLESS_CHROMIUM)
                .args(["--remote-debugging-port=0"])
                .arg(format!("--user-data-dir={}", profile.display()))
                .arg(url)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap(),
        )
    };
    let (p1, p2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Server-Sent Events: the page is open before the card is scanned.
    let page = open(
        format!(
            "{origin}/his-sse-page.html?http=http://{}&token={}&scene=010106",
            d.http,
            d.his_token()
        ),
        p1.path(),
    );
    // The stream starts "from now": scan once the page has it open.
    d.wait_log("HIS HTTP event stream opened", 1);
    d.scan(&code(&sim, 0));
    until_reported(&sim, "the page's use over SSE", "010106").await;
    drop(page);
    // The WebSocket page from the same origin.
    let _ws_page = open(
        format!(
            "{origin}/his-page.html?ws=ws://{}&token={}&scene=010104",
            d.ws,
            d.his_token()
        ),
        p2.path(),
    );
    // Held for the first identified client, so one scan is enough.
    d.scan(&code(&sim, 1));
    d.wait_log("HIS client connected (websocket)", 1);
    until_reported(&sim, "the page's use over the WebSocket", "010104").await;
    drop(web);
}
