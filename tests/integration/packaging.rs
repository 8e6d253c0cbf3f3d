//! The systemd unit, the sysusers file and the Debian package metadata.
//! `systemd-analyze` and `systemd-sysusers` checks run where those tools
//! exist and print SKIPPED otherwise.

use std::process::Command;

fn root() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn unit_exposure_is_at_most_2_5() {
    if !have("systemd-analyze") {
        crate::common::skip("unit_exposure_is_at_most_2_5", "no systemd-analyze", true);
        return;
    }
    for unit in ["ehc-agent.service", "ehc-agent-gateway.service"] {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(format!("{}/systemd/{unit}", root()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let needle = format!("Overall exposure level for {unit}: ");
        let level: f64 = text
            .lines()
            .find_map(|l| l.split(needle.as_str()).nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no exposure level in:\n{text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        assert!(level <= 2.5, "{unit}: exposure {level} > 2.5:\n{text}");
    }
}

#[test]
fn unit_verifies_clean() {
    if !have("systemd-analyze")
        || !std::path::Path::new("/usr/lib/systemd/system/sysinit.target").exists()
    {
        crate::common::skip(
            "unit_verifies_clean",
            "no systemd-analyze or no systemd units to verify against",
            true,
        );
        return;
    }
    // A scratch root with the system's units, the binary and the unit.
    let r = tempfile::tempdir().unwrap();
    let p = r.path();
    std::fs::create_dir_all(p.join("usr/bin")).unwrap();
    std::fs::create_dir_all(p.join("bin")).unwrap();
    std::fs::create_dir_all(p.join("usr/lib/systemd")).unwrap();
    assert!(Command::new("cp")
        .args(["-r", "/usr/lib/systemd/system"])
        .arg(p.join("usr/lib/systemd/"))
        .status()
        .unwrap()
        .success());
    std::fs::copy(env!("CARGO_BIN_EXE_ehc-agent"), p.join("usr/bin/ehc-agent")).unwrap();
    std::fs::copy("/bin/kill", p.join("bin/kill")).unwrap();
    for unit in ["ehc-agent.service", "ehc-agent-gateway.service"] {
        std::fs::copy(
            format!("{}/systemd/{unit}", root()),
            p.join(format!("usr/lib/systemd/system/{unit}")),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", p.display()))
            .arg(unit)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "systemd-analyze verify {unit}:\n{err}"
        );
    }
}

/// Regression (found under a real systemd): `DeviceAllow=char-ttyUSB` is
/// resolved when the unit starts, so the drivers must be loaded before it;
/// and the postinst must create the users before udev applies rules that
/// name them.
#[test]
fn drivers_load_before_the_agent_and_users_exist_before_udev_rules() {
    let unit = std::fs::read_to_string(format!("{}/systemd/ehc-agent.service", root())).unwrap();
    for m in ["usbserial", "cdc_acm", "hid"] {
        let dep = format!("modprobe@{m}.service");
        assert!(
            unit.lines()
                .any(|l| l.starts_with("Wants=") && l.contains(&dep))
                && unit
                    .lines()
                    .any(|l| l.starts_with("After=") && l.contains(&dep)),
            "{dep} missing from Wants= and After="
        );
    }
    let postinst = std::fs::read_to_string(format!("{}/debian/postinst", root())).unwrap();
    let sysusers = postinst
        .find("systemd-sysusers")
        .expect("postinst runs sysusers");
    let trigger = postinst
        .find("udevadm trigger")
        .expect("postinst triggers udev");
    assert!(
        sysusers < trigger,
        "users must exist before udev applies the rules"
    );
}

#[test]
fn unit_has_what_the_service_needs() {
    let unit = std::fs::read_to_string(format!("{}/systemd/ehc-agent.service", root())).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StateDirectory=ehc-agent",
        "RuntimeDirectory=ehc-agent",
        "ConfigurationDirectory=ehc-agent",
        "LoadCredential=app_secret:",
        "DeviceAllow=char-ttyUSB rw",
        "DeviceAllow=char-hidraw rw",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "SystemCallFilter=@system-service",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(line), "{line} missing");
    }
}

#[test]
fn sysusers_creates_the_user_and_the_his_group() {
    if !have("systemd-sysusers") {
        crate::common::skip(
            "sysusers_creates_the_user_and_the_his_group",
            "no systemd-sysusers",
            true,
        );
        return;
    }
    let r = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(r.path().join("etc")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", r.path().display()))
        .arg(format!("{}/systemd/ehc-agent.sysusers", root()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(r.path().join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(r.path().join("etc/group")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("ehc-agent:") && l.contains("/var/lib/ehc-agent")),
        "{passwd}"
    );
    assert!(
        group
            .lines()
            .any(|l| l.starts_with("ehc-his:") && l.ends_with(":ehc-agent")),
        "{group}"
    );
}

#[test]
fn every_deb_asset_exists() {
    let manifest: toml::Table = std::fs::read_to_string(format!("{}/Cargo.toml", root()))
        .unwrap()
        .parse()
        .unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    for asset in deb["assets"].as_array().unwrap() {
        let src = asset[0].as_str().unwrap();
        if src.starts_with("target/") {
            continue; // built by cargo deb
        }
        assert!(
            std::path::Path::new(root()).join(src).exists(),
            "asset {src} does not exist"
        );
    }
    assert_eq!(
        deb["conf-files"][0].as_str(),
        Some("/etc/ehc-agent/agent.toml")
    );
    for s in ["postinst", "postrm"] {
        assert!(std::path::Path::new(root()).join("debian").join(s).exists());
    }
}
