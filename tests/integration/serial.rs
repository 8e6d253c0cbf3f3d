//! Serial scanners on real pseudo-terminals: scans reach HIS through the
//! running daemon; closing the pty is an unplug, a new pty at the configured
//! path a replug, recovered from without restart and without spinning.

use std::io::Write as _;
use std::os::fd::{AsRawFd as _, OwnedFd};

use crate::common::*;
use crate::daemon::*;

/// A pty pair; the agent opens the slave by `link`, as it would a
/// `/dev/serial/by-id/` name.
fn plug(link: &std::path::Path) -> std::fs::File {
    let pty = nix::pty::openpty(None, None).unwrap();
    // Not inherited by daemons the tests spawn: a copy of the master held by
    // a child would keep the "device" plugged in.
    for fd in [&pty.master, &pty.slave] {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
    }
    let slave = nix::unistd::ttyname(&pty.slave).unwrap();
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(&slave, link).unwrap();
    // The test keeps only the master; the slave side is the agent's.
    drop::<OwnedFd>(pty.slave);
    std::fs::File::from(pty.master)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_scanner_unplug_and_replug() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("usb-Newland_NLS-FR40-if00");
    let mut master = plug(&link);
    let opts = Options {
        extra_toml: format!(
            "[[scanner]]\nname = \"window-serial\"\nkind = \"serial\"\npath = \"{}\"\nbaud = 9600\nterminator = \"cr\"\ndebounce_ms = 0\n",
            link.display()
        ),
        ..Options::default()
    };
    let d = Daemon::start_in(dir, &sim, opts).await;
    d.wait_log("scanner connected", 1);
    let mut his = HisClient::unix(&d).await;

    let code = sim.with_state(|s| s.static_code(0)).unwrap();
    // A scan split across two writes, as a slow serial line delivers it.
    master.write_all(&code.as_bytes()[..20]).unwrap();
    master
        .write_all(format!("{}\r", &code[20..]).as_bytes())
        .unwrap();
    let m = his.next_of(&["card"]).await;
    assert_eq!(
        (m["scanner"].as_str(), m["qrCodeText"].as_str()),
        (Some("window-serial"), Some(code.as_str()))
    );

    // Unplug: the device disappears.
    drop(master);
    std::fs::remove_file(&link).unwrap();
    d.wait_log("scanner unplugged or not present", 1);
    // While it is gone, the daemon waits without spinning: over a couple of
    // retry periods it uses next to no CPU (a busy loop would use it all).
    let before = d.cpu_ticks();
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    std::thread::sleep(std::time::Duration::from_secs(2));
    let used = d.cpu_ticks() - before;
    assert!(
        used * 10 < 2 * ticks_per_s,
        "the daemon used {used} ticks in 2 s while the scanner was unplugged"
    );

    // Replug at the same path (a new pty, as a re-enumerated device).
    let mut master = plug(&link);
    d.wait_log("scanner connected", 2);
    let code2 = sim.with_state(|s| s.static_code(1)).unwrap();
    master.write_all(format!("{code2}\r").as_bytes()).unwrap();
    let m = his.next_of(&["card"]).await;
    assert_eq!(
        m["qrCodeText"],
        code2.as_str(),
        "read from the new device without a restart"
    );
    // Garbage on the line is discarded; the next scan still works.
    master.write_all(b"\xff\xfe\x00\r").unwrap();
    master.write_all(b"6901234567892\r").unwrap();
    assert_eq!(
        his.next_of(&["otherCode", "card"]).await["text"],
        "6901234567892"
    );
    let _ = master.as_raw_fd();
    let (status, log, _) = d.stop();
    assert!(status.success(), "{log}");
}
