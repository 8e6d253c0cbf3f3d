//! The example HIS clients in `examples/` work against the real daemon:
//! Python (standard library), shell (socat), and the browser page (headless
//! Chromium). Each one's `use` reaches the platform with its scene.

use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

use crate::common::*;
use crate::daemon::*;

/// A python3 to run the example with, or the test's visible skip.
fn python_or_skip(test: &str) -> Option<String> {
    let found = find(&["python3"]);
    if found.is_none() {
        crate::common::skip(test, "python3 not installed", true);
    }
    found
}

/// Wait for an example client to exit: its standard output and error,
/// after asserting it exited 0.
async fn finished(child: std::process::Child) -> (String, String) {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_client() {
    let Some(python) = python_or_skip("python_example_client") else {
        return;
    };
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let child = Command::new(python)
        .arg(example("his-client.py"))
        .args([
            "--unix",
            d.path().join("his.sock").to_str().unwrap(),
            "--use",
            "010104",
            "--count",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The client may not be connected yet: the agent holds the card for it.
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    let (stdout, _) = finished(child).await;
    assert!(
        stdout.contains("\"type\": \"card\"") && stdout.contains("测试甲"),
        "{stdout}"
    );
    assert!(stdout.contains("\"type\": \"reply\""), "{stdout}");
    until_reported(&sim, "the python client's use", "010104").await;
}

/// The Python client over loopback TCP authenticates with the token file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_client_over_tcp_authenticates() {
    let Some(python) = python_or_skip("python_example_client_over_tcp_authenticates") else {
        return;
    };
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let child = Command::new(python)
        .arg(example("his-client.py"))
        .args(["--tcp", &d.tcp, "--token-file"])
        .arg(d.path().join("his.token"))
        .args(["--use", "010104", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    let (stdout, _) = finished(child).await;
    assert!(
        stdout.contains("\"ref\": \"auth\", \"ok\": true"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("\"type\": \"card\"").count(), 1, "{stdout}");
}

/// The Python client comes back after the agent restarts (the socket path
/// stays the same) and gets the next card.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_client_reconnects() {
    let Some(python) = python_or_skip("python_example_client_reconnects") else {
        return;
    };
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let child = Command::new(python)
        .arg(example("his-client.py"))
        .arg("--unix")
        .arg(d.path().join("his.sock"))
        .args(["--use", "010104", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    until_reported(&sim, "the first card's use", "010104").await;
    let dir = d.stop().2;
    let mut d = Daemon::start_in(dir, &sim, crate::daemon::Options::default()).await;
    d.scan(&sim.with_state(|s| s.static_code(1)).unwrap());
    let (stdout, stderr) = finished(child).await;
    assert_eq!(stdout.matches("\"type\": \"card\"").count(), 2, "{stdout}");
    assert!(stderr.contains("reconnecting"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_example_client() {
    if find(&["socat"]).is_none() {
        crate::common::skip(
            "shell_example_client",
            "socat not installed (.ci/run installs it; or apt-get install socat)",
            true,
        );
        return;
    }
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let mut child = Command::new("sh")
        .arg(example("his-client.sh"))
        .arg(d.path().join("his.sock"))
        .args(["010103"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    d.scan(&sim.with_state(|s| s.static_code(1)).unwrap());
    until_reported(&sim, "the shell client's use", "010103").await;
    // The script runs until killed, as an HIS helper would.
    Command::new("kill")
        .arg("--")
        .arg(format!("-{}", child.id()))
        .status()
        .unwrap();
    let _ = child.wait();
    let mut stdout = String::new();
    use std::io::Read as _;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(
        stdout.contains("\"type\":\"card\"") && stdout.contains("\"type\":\"reply\""),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_example_page() {
    let Some(chromium) = find(&["chromium", "chromium-browser", "google-chrome"]) else {
        crate::common::skip(
            "browser_example_page",
            "no Chromium (.ci/run installs it; or apt-get install chromium)",
            true,
        );
        return;
    };
    // Serve the page over HTTP, as an HIS web server would.
    let page = std::fs::read(example("his-page.html")).unwrap();
    let web = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", web.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        while let Ok((mut s, _)) = web.accept().await {
            let page = page.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", page.len());
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&page).await;
            });
        }
    });
    let sim = sim().await;
    let mut d = Daemon::start_with(
        &sim,
        Options {
            allowed_origins: vec![origin.clone()],
            ..Options::default()
        },
    )
    .await;
    // Scanned before the page opens: held for the first client.
    d.scan(&sim.with_state(|s| s.static_code(3)).unwrap());
    let url = format!(
        "{origin}/his-page.html?ws=ws://{}&scene=010106&token={}",
        d.ws,
        d.his_token()
    );
    let profile = tempfile::tempdir().unwrap();
    // Chromium stays on the page until killed; the page's own `use` reaching
    // the platform proves it connected, received the held card and used its
    // scanId.
    let mut browser = Command::new(chromium)
        .args(HEADLESS_CHROMIUM)
        .args(["--remote-debugging-port=0"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let st = until_reported(&sim, "the page's use", "010106").await;
    Command::new("kill")
        .arg("--")
        .arg(format!("-{}", browser.id()))
        .status()
        .unwrap();
    let _ = browser.wait();
    let card3 = sim.with_state(|s| s.static_code(3)).unwrap();
    assert!(st["reports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["scene"] == "010106" && r["qrCodeText"] == card3.as_str()));
    d.wait_log("HIS client connected (websocket)", 1);
}
