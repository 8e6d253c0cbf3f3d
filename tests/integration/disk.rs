//! A full disk and a read-only state directory under the running daemon:
//! scans still reach HIS (`recorded: false`), the fault is logged, and the
//! spilled uses are written and uploaded once the disk takes writes again.
//!
//! Uses a real tmpfs (mounting needs root); skipped visibly otherwise.

use std::process::Command;

use crate::common::*;
use crate::daemon::*;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .ok()?
            .success();
        ok.then(|| Tmpfs(at.to_owned()))
    }
    fn remount(&self, opts: &str) {
        assert!(Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn can_mount() -> bool {
    let d = tempfile::tempdir().unwrap();
    Tmpfs::mount(&d.path().join("probe"), "64k").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_then_space_returns() {
    if !can_mount() {
        crate::common::skip(
            "full_disk_then_space_returns",
            "cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)",
            false,
        );
        return;
    }
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("state"), "1m").unwrap();
    let opts = Options {
        outbox_path: "state/outbox.sqlite".into(),
        ..Options::default()
    };
    let mut d = Daemon::start_in(dir, &sim, opts).await;
    let mut his = HisClient::unix(&d).await;
    // Fill the disk to the last byte.
    let filler = fs.0.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .output();
    let codes: Vec<String> = (0..3)
        .map(|i| sim.with_state(|s| s.static_code(i)).unwrap())
        .collect();
    let mut unrecorded = 0;
    for c in &codes {
        d.scan(c);
        let m = his.next_of(&["card"]).await;
        if m["recorded"] == false {
            unrecorded += 1;
        }
    }
    assert!(unrecorded > 0, "a full disk refuses the writes");
    d.wait_log("outbox cannot be written", 1); // the fault is logged
                                               // Space returns; the next scan writes the spilled uses first.
    std::fs::remove_file(&filler).unwrap();
    d.scan(&codes[0]);
    assert_eq!(his.next_of(&["card"]).await["recorded"], true);
    until_sim(&sim, "every use, spilled ones included", |s| {
        s["uniqueReports"] == 4
    })
    .await;
    d.wait_log("spilled uses written to the outbox", 1);
    let (status, log, _) = d.stop();
    assert!(status.success(), "{log}");
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_state_directory_then_writable() {
    // A mount cannot be made read-only while SQLite holds a file open for
    // writing (the kernel answers "busy"), so the directory is read-only when
    // the agent starts, as after a boot with a read-only /var: the agent
    // starts degraded, serves scans, and opens the outbox once it can.
    if !can_mount() {
        crate::common::skip(
            "read_only_state_directory_then_writable",
            "cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)",
            false,
        );
        return;
    }
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("state"), "8m").unwrap();
    fs.remount("ro");
    let opts = Options {
        outbox_path: "state/outbox.sqlite".into(),
        ..Options::default()
    };
    let mut d = Daemon::start_in(dir, &sim, opts).await;
    assert!(d.log().contains("starting degraded"), "{}", d.log());
    let mut his = HisClient::unix(&d).await;
    let code = sim.with_state(|s| s.static_code(1)).unwrap();
    d.scan(&code);
    let m = his.next_of(&["card"]).await;
    assert_eq!(
        (m["type"].as_str(), m["recorded"].as_bool()),
        (Some("card"), Some(false)),
        "served, not recorded: {m}"
    );
    fs.remount("rw");
    d.scan(&code);
    assert_eq!(his.next_of(&["card"]).await["recorded"], true);
    until_sim(&sim, "both uses", |s| s["uniqueReports"] == 2).await;
    let (status, log, _) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("outbox opened: the state directory takes writes again"),
        "{log}"
    );
    drop(fs);
}
