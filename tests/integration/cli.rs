//! The binary's commands as an operator runs them.

use std::os::unix::fs::PermissionsExt as _;

use crate::common::agent;

#[test]
fn sign_prints_the_reference_signature() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "8c8e763f443ef983ac33aef1c7085cfb\n").unwrap();
    let req = dir.path().join("req.json");
    std::fs::write(
        &req,
        r#"{"commonIn":{"appToken":"","requestId":"DB4D975748A84309977EA25224C0F5CF","hospitalId":"90003","timestamp":"1525392000","sign":""},"req":{"appId":"a1a2e0bde41574ad8ea9a4bb58022oop"}}"#,
    )
    .unwrap();
    let out = agent()
        .arg("sign")
        .arg("--app-secret-file")
        .arg(&secret)
        .arg(&req)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("TsccMUMTHfOiEovR2hMlRXcQqctRFmPbpPIZdxXCJ/o="),
        "{stdout}"
    );
    assert!(stdout.contains("appId=a1a2e0bde41574ad8ea9a4bb58022oop&hospitalId=90003&requestId=DB4D975748A84309977EA25224C0F5CF&timestamp=1525392000<secret>"));
    assert!(!stdout.contains("8c8e763f"), "the secret is never printed");
}

#[test]
fn check_names_all_five_mistakes_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("app_secret");
    std::fs::write(&secret, "x").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap(); // 1: group-readable
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[platform]
base_url = "http://healthcard.example.cn"   # 2: plain http to a remote host
app_id = "a"
app_secret_file = "{}"
hospital_id = "1"
[terminal]
id = "WIN-1"
channel = "0100"
scene = "999"                                # 3: not in table 3.3.1
city_code = "1"
city_name = "c"
hospital_code = "h"
hospital_name = "h"
utc_offset = "+8"                            # 4: not an offset
[outbox]
batch = 50
concurency = 4                               # 5: typo
"#,
            secret.display()
        ),
    )
    .unwrap();
    let out = agent()
        .arg("check")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    for key in [
        "platform.app_secret_file",
        "platform.base_url",
        "terminal.scene",
        "terminal.utc_offset",
        "outbox.concurency",
    ] {
        assert!(err.contains(key), "{key} not named in:\n{err}");
    }
    assert!(err.contains("5 problem(s)"), "{err}");
}

#[test]
fn check_accepts_the_shipped_example_given_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("app_secret");
    std::fs::write(&secret, "x").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/agent.toml");
    let out = agent()
        .arg("check")
        .arg("--config")
        .arg(example)
        .env("CREDENTIALS_DIRECTORY", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("configuration is valid") && stdout.contains("secret=<redacted>"));
}

#[test]
fn missing_configuration_is_a_usage_error() {
    let out = agent()
        .arg("check")
        .arg("--config")
        .arg("/nonexistent/agent.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
}
