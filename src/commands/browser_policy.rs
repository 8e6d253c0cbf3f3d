//! `ehc-agent browser-policy --origin URL`: let a browser HIS page reach
//! the agent on loopback.
//!
//! Chromium-based browsers restrict pages on intranet or public origins
//! from reaching the local device (Local Network Access: Chrome from 142 for
//! fetch and EventSource, WebSockets from 147; Edge from 143). Without the
//! user's permission (a prompt, or for a plain-HTTP page often a silent
//! refusal) the HIS page never sees a card. Hospital IT grants it once per
//! machine with managed policies: `LocalNetworkAccessAllowedForUrls` (139+)
//! and `LoopbackNetworkAllowedForUrls` (146+), in the browsers' managed
//! policy folders on Linux:
//!
//! * Chromium: `/etc/chromium/policies/managed/`
//! * Google Chrome: `/etc/opt/chrome/policies/managed/`
//! * Microsoft Edge: `/etc/opt/edge/policies/managed/`
//!
//! Two files in one folder that set the same policy conflict (one wins), so
//! the origin is added to a file that already sets the policy, if any, and
//! to our own `ehc-agent.json` otherwise; everything else in those files is
//! kept. `--check` says, per browser, whether the origin is in place.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The policies that exempt an origin from Local Network Access checks
/// towards loopback.
pub const POLICIES: [&str; 2] = [
    "LocalNetworkAccessAllowedForUrls",
    "LoopbackNetworkAllowedForUrls",
];

/// Our own file in each folder.
pub const FILE: &str = "ehc-agent.json";

/// (browser, managed-policy folder) on Linux.
pub const BROWSERS: [(&str, &str); 3] = [
    ("chromium", "etc/chromium/policies/managed"),
    ("chrome", "etc/opt/chrome/policies/managed"),
    ("edge", "etc/opt/edge/policies/managed"),
];

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("`{0}` is not an origin: scheme://host[:port], http or https, no path (e.g. http://his.hospital.lan:8080)")]
    BadOrigin(String),
    #[error("{path}: {error}")]
    File { path: PathBuf, error: String },
    #[error("{0} is not a JSON object: fix or move it, then run again (it is the browser's policy file; nothing was changed)")]
    NotObject(PathBuf),
}

/// `origin` as the policies want it, or why not.
pub fn check_origin(origin: &str) -> Result<String, PolicyError> {
    let bad = || PolicyError::BadOrigin(origin.to_owned());
    let u = reqwest::Url::parse(origin).map_err(|_| bad())?;
    if !matches!(u.scheme(), "http" | "https")
        || u.host_str().is_none()
        || !(u.path() == "/" || u.path().is_empty())
        || u.query().is_some()
        || u.fragment().is_some()
        || !u.username().is_empty()
    {
        return Err(bad());
    }
    Ok(u.origin().ascii_serialization())
}

fn read_json(path: &Path) -> Result<Option<Map<String, Value>>, PolicyError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(PolicyError::File {
                path: path.to_owned(),
                error: e.to_string(),
            })
        }
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        _ => Err(PolicyError::NotObject(path.to_owned())),
    }
}

/// The JSON files of a folder, ours last (a file of the site's that sets a
/// policy is preferred to ours).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    v.sort_by_key(|p| (p.file_name().is_some_and(|n| n == FILE), p.clone()));
    v
}

fn has(m: &Map<String, Value>, policy: &str, origin: &str) -> bool {
    m.get(policy)
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(origin)))
}

/// Is `origin` in both policies in `dir`?
pub fn in_place(dir: &Path, origin: &str) -> Result<bool, PolicyError> {
    for policy in POLICIES {
        let mut found = false;
        for f in files(dir) {
            if let Some(m) = read_json(&f)? {
                found |= has(&m, policy, origin);
            }
        }
        if !found {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Add `origin` to both policies in `dir`; returns what was done, in words.
pub fn install(dir: &Path, origin: &str) -> Result<Vec<String>, PolicyError> {
    let ioerr = |p: &Path, e: std::io::Error| PolicyError::File {
        path: p.to_owned(),
        error: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| ioerr(dir, e))?;
    let mut done = Vec::new();
    for policy in POLICIES {
        // The file that already sets this policy, else ours.
        let mut target = dir.join(FILE);
        for f in files(dir) {
            if read_json(&f)?.is_some_and(|m| m.contains_key(policy)) {
                target = f;
                break;
            }
        }
        let mut m = read_json(&target)?.unwrap_or_default();
        if has(&m, policy, origin) {
            done.push(format!(
                "{policy}: already has {origin} in {}",
                target.display()
            ));
            continue;
        }
        let list = m
            .entry(policy.to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        if !list.is_array() {
            return Err(PolicyError::File {
                path: target,
                error: format!("{policy} is not a list"),
            });
        }
        if let Value::Array(a) = list {
            a.push(Value::String(origin.to_owned()));
        }
        let text = serde_json::to_string_pretty(&Value::Object(m)).unwrap_or_default() + "\n";
        // Written whole and renamed: a browser starting now reads the old
        // file or the new, never half of one.
        let tmp = target.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| ioerr(&tmp, e))?;
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644));
        std::fs::rename(&tmp, &target).map_err(|e| ioerr(&target, e))?;
        done.push(format!("{policy}: added {origin} to {}", target.display()));
    }
    Ok(done)
}

/// The folders for `browsers` (all when empty) under `root`.
pub fn folders(root: &Path, browsers: &[String]) -> Vec<(&'static str, PathBuf)> {
    BROWSERS
        .iter()
        .filter(|(b, _)| browsers.is_empty() || browsers.iter().any(|x| x == b))
        .map(|(b, d)| (*b, root.join(d)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_and_normalised() {
        assert_eq!(
            check_origin("http://his.hospital.lan:8080").unwrap(),
            "http://his.hospital.lan:8080"
        );
        assert_eq!(
            check_origin("https://HIS.example.cn/").unwrap(),
            "https://his.example.cn"
        );
        for bad in [
            "his.lan",
            "ftp://x",
            "http://x/app",
            "http://x/?a=1",
            "http://u@x",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn installs_merges_and_checks() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("etc/chromium/policies/managed");
        std::fs::create_dir_all(&dir).unwrap();
        // The site's own file already sets one of the policies.
        std::fs::write(
            dir.join("site.json"),
            r#"{"HomepageLocation": "http://intranet", "LocalNetworkAccessAllowedForUrls": ["http://old:1"]}"#,
        )
        .unwrap();
        let o = "http://his.hospital.lan:8080";
        assert!(!in_place(&dir, o).unwrap());
        let done = install(&dir, o).unwrap();
        assert!(done[0].contains("site.json"), "{done:?}");
        assert!(done[1].contains(FILE), "{done:?}");
        let site: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("site.json")).unwrap()).unwrap();
        assert_eq!(
            site["HomepageLocation"], "http://intranet",
            "the rest is kept"
        );
        assert_eq!(
            site["LocalNetworkAccessAllowedForUrls"],
            serde_json::json!(["http://old:1", o])
        );
        let ours: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(FILE)).unwrap()).unwrap();
        assert_eq!(
            ours["LoopbackNetworkAllowedForUrls"],
            serde_json::json!([o])
        );
        assert!(
            ours.get("LocalNetworkAccessAllowedForUrls").is_none(),
            "no second file sets it"
        );
        assert!(in_place(&dir, o).unwrap());
        // Again: nothing doubled.
        let again = install(&dir, o).unwrap();
        assert!(again.iter().all(|l| l.contains("already has")), "{again:?}");
        std::fs::write(dir.join("broken.json"), "[1,").unwrap();
        assert!(matches!(
            install(&dir, "http://b:2"),
            Err(PolicyError::NotObject(_))
        ));
    }
}
