//! `systemctl reload` (SIGHUP) as it must behave at a busy window: nothing
//! connected is dropped, nothing scanned is lost, no port is ever free for
//! another local user, and a reload that cannot apply something keeps
//! serving and says so. Each was broken before (issue "close the holes").

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::daemon::{until_sim, Daemon, HisClient};

fn config(d: &Daemon) -> (std::path::PathBuf, String) {
    let p = d.path().join("agent.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    (p, text)
}

fn status(d: &Daemon) -> Value {
    let out = agent()
        .args(["status", "--json", "--control"])
        .arg(&d.control)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// HIS stays connected through a reload, a `use` for a scan from before the
/// reload still finds its scan, and the new settings apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_his_connected_and_the_scan_memory() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let mut his = HisClient::unix(&d).await;
    let mut tcp = HisClient::tcp(&d).await;
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    let card = his.next_of(&["card"]).await;
    assert_eq!(tcp.next_of(&["card"]).await["scanId"], card["scanId"]);

    let (p, text) = config(&d);
    std::fs::write(&p, text.replace("id = \"WIN-T\"", "id = \"WIN-R\"")).unwrap();
    d.signal("HUP");
    d.wait_log("configuration reloaded", 1);

    // The same connections, still served.
    his.send(&json!({"type": "use", "scanId": card["scanId"], "scene": "010105", "ref": "u"}))
        .await;
    let r = his.next_of(&["reply", "error"]).await;
    assert_eq!(
        r["type"], "reply",
        "the scan is remembered across the reload: {r}"
    );
    d.scan(&sim.with_state(|s| s.static_code(1)).unwrap());
    assert_eq!(his.next_of(&["card"]).await["verified"], true);
    assert_eq!(tcp.next_of(&["card"]).await["verified"], true);
    assert_eq!(status(&d)["terminalId"], "WIN-R");
    until_sim(&sim, "the use from before the reload", |s| {
        s["reports"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["scene"] == "010105"))
    })
    .await;
    assert!(!d.log().contains("HIS client disconnected"), "{}", d.log());
}

/// Scans typed right around a reload all reach HIS: the stdin scanner keeps
/// its input, scans in flight finish. Before: the next stdin scan after a
/// reload was lost 3 times in 3, and up to 10 in 100 in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_around_reloads_are_not_lost() {
    let sim = sim().await;
    // Every platform answer takes a while, so scans are in flight when the
    // reloads come.
    set_faults(&sim, json!({"latency_ms": 30})).await;
    let mut d = Daemon::start(&sim).await;
    let mut his = HisClient::unix(&d).await;
    let (p, text) = config(&d);
    let n = 30;
    for i in 0..n {
        d.scan(&format!("HOSPITAL-BARCODE-{i}"));
        d.scan(&sim.with_state(|s| s.static_code(i % 3)).unwrap());
        if i % 5 == 0 {
            let hold = format!("hold_s = {}", 30 + i);
            std::fs::write(&p, text.replace("hold_s = 30", &hold)).unwrap();
            d.signal("HUP");
        }
    }
    let mut others = 0;
    let mut cards = 0;
    let all = async {
        while others + cards < 2 * n {
            match his.next_of(&["otherCode", "card", "scanFailed"]).await["type"]
                .as_str()
                .unwrap()
            {
                "otherCode" => others += 1,
                "card" => cards += 1,
                other => panic!("unexpected {other}"),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(15), all)
        .await
        .is_err()
    {
        panic!(
            "{others} other codes and {cards} cards of {n} each; the agent's log:\n{}",
            d.log()
        );
    }
    assert_eq!((others, cards), (n, n));
}

/// A reload never lets go of a listener whose address did not change: a
/// local user trying to bind the HIS TCP port throughout never gets it.
/// Before: every listener was closed and bound again, and one who took the
/// port in the gap made the agent exit and served HIS forged patients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_is_never_free_during_reloads() {
    let sim = sim().await;
    let d = Daemon::start(&sim).await;
    let addr: std::net::SocketAddr = d.tcp.parse().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thief = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut tries = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tries += 1;
                if std::net::TcpListener::bind(addr).is_ok() {
                    return (tries, true);
                }
            }
            (tries, false)
        })
    };
    for i in 1..=5 {
        d.signal("HUP");
        d.wait_log("configuration reloaded", i);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (tries, stolen) = thief.join().unwrap();
    assert!(!stolen, "the port was free during a reload ({tries} tries)");
    let mut c = HisClient::tcp(&d).await;
    c.send(&json!({"type": "ping", "ref": 1})).await;
    assert_eq!(c.next_of(&["reply"]).await["ok"], true);
}

/// A changed address that cannot be bound (another program has it) keeps
/// the old listener serving, says so in `status`, and the agent does not
/// exit. Before: the agent exited 1 and the restart failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_that_fails_keeps_serving_and_says_so() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap();
    let (p, text) = config(&d);
    std::fs::write(
        &p,
        text.replace(
            "listen_tcp = \"127.0.0.1:0\"",
            &format!("listen_tcp = \"{taken}\""),
        ),
    )
    .unwrap();
    d.signal("HUP");
    d.wait_log("reload: not applied", 1);
    let st = status(&d);
    let attention = st["attention"].to_string();
    assert!(
        attention.contains("his.listen_tcp") && attention.contains("still serving on"),
        "{st}"
    );
    // Still alive and serving on the old port.
    let mut c = HisClient::tcp(&d).await;
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    assert_eq!(c.next_of(&["card"]).await["verified"], true);
    // Once the address is free, the next reload moves there and clears it.
    drop(squatter);
    d.signal("HUP");
    d.wait_log("HIS listener moved", 1);
    let st = status(&d);
    assert!(!st["attention"].to_string().contains("reload:"), "{st}");
    let s = tokio::net::TcpStream::connect(taken).await.unwrap();
    drop(s);
    let (code, log, _) = d.stop();
    assert!(code.success(), "{log}");
}

/// Shutdown drains: scans already read from the scanner are resolved and
/// delivered before HIS connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_scans_already_read() {
    let sim = sim().await;
    set_faults(&sim, json!({"latency_ms": 200})).await;
    let mut d = Daemon::start(&sim).await;
    let mut his = HisClient::unix(&d).await;
    // One write, so the scanner reads all three in one go: once the first
    // is being resolved (logged), all three have been read.
    let three: String = (0..3)
        .map(|i| sim.with_state(|s| s.static_code(i)).unwrap() + "\n")
        .collect();
    d.scan_bytes(three.as_bytes());
    d.wait_log("kind=static", 1);
    d.signal("TERM");
    let mut cards = 0;
    while let Some(m) = his.next().await {
        cards += usize::from(m["type"] == "card");
    }
    assert_eq!(cards, 3);
}

/// A reload that changes only `socket_group` hands the socket to the new
/// group at once (and the peer check admits that group from then on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_socket_group_takes_effect_on_reload() {
    use std::os::unix::fs::MetadataExt as _;
    let Some(nogroup) = nix::unistd::Group::from_name("nogroup").ok().flatten() else {
        skip(
            "a_new_socket_group_takes_effect_on_reload",
            "no group `nogroup` on this machine",
            false,
        );
        return;
    };
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let mut his = HisClient::unix(&d).await;
    let (p, text) = config(&d);
    std::fs::write(
        &p,
        text.replace("[his]\n", "[his]\nsocket_group = \"nogroup\"\n"),
    )
    .unwrap();
    d.signal("HUP");
    d.wait_log("configuration reloaded", 1);
    assert_eq!(
        std::fs::metadata(&d.sock).unwrap().gid(),
        nogroup.gid.as_raw(),
        "the socket belongs to the new group"
    );
    // Still serving the client connected before.
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    assert_eq!(his.next_of(&["card"]).await["verified"], true);
}
