//! The HIS token: what loopback TCP and WebSocket clients present, since any
//! local account can reach loopback.
//!
//! Either IT names a file (`[his] token_file`, readable by the HIS group and
//! not by others: read and checked by the configuration), or the agent makes
//! one the first time it needs it and keeps it in its state directory
//! (`his-token`, mode 0600), so it survives restarts and reboots and a
//! browser page's configuration keeps working. At each start that token is
//! *published* beside the HIS socket as `his.token`, mode 0640, group
//! `socket_group`: the members of the HIS group, who may use the Unix socket
//! anyway, can read it; nobody else can.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rand::Rng as _;

use super::server::HisToken;
use crate::secrets::{self, Readers};

/// The token's file in the state directory.
pub const STATE_FILE: &str = "his-token";
/// The published copy, beside the HIS socket.
pub const PUBLISHED_FILE: &str = "his.token";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("HIS token {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] secrets::SecretFileError),
}

/// Where the token came from, for the start-up log line and `check`.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub token: HisToken,
    /// The file HIS clients read it from.
    pub published: Option<PathBuf>,
}

/// The configured token, or the state directory's (made on first use) and
/// its published copy.
pub fn load(
    configured: Option<&str>,
    state_dir: &Path,
    socket: &Path,
    group_gid: Option<u32>,
) -> Result<Loaded, TokenError> {
    if let Some(t) = configured {
        return Ok(Loaded {
            token: HisToken::new(t),
            published: None,
        });
    }
    let kept = state_dir.join(STATE_FILE);
    let value = match secrets::read(&kept, Readers::Owner) {
        Ok(v) => v,
        Err(secrets::SecretFileError::Io { .. }) if !kept.exists() => match create(&kept) {
            Ok(v) => v,
            // A state directory that cannot be written (the agent starts
            // degraded then) must not stop HIS from being served: a token
            // for this run only, published as usual.
            Err(e) => {
                tracing::error!(error = %e, "the HIS token cannot be kept in the state directory; using one for this run only (clients re-read his.token after a restart)");
                random_token()
            }
        },
        Err(e) => return Err(e.into()),
    };
    let published = socket
        .parent()
        .map(|d| d.join(PUBLISHED_FILE))
        .unwrap_or_else(|| PathBuf::from(PUBLISHED_FILE));
    publish(&published, &value, group_gid)?;
    Ok(Loaded {
        token: HisToken::new(&value),
        published: Some(published),
    })
}

fn create(path: &Path) -> Result<String, TokenError> {
    let err = |source| TokenError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let value = random_token();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(value.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(err)?;
    tracing::info!(path = %path.display(), "made a new HIS token");
    Ok(value)
}

fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Write the readable copy: a new file renamed into place, so a client never
/// reads half a token, with its mode and group set before it appears.
fn publish(path: &Path, value: &str, gid: Option<u32>) -> Result<(), TokenError> {
    let err = |source| TokenError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("token.new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)?;
    if let Some(g) = gid {
        std::os::unix::fs::fchown(&f, None, Some(g)).map_err(err)?;
    }
    f.set_permissions(std::fs::Permissions::from_mode(0o640))
        .map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_kept_and_published_group_readable() {
        let d = tempfile::tempdir().unwrap();
        let (state, run) = (d.path().join("state"), d.path().join("run"));
        let sock = run.join("his.sock");
        let a = load(None, &state, &sock, None).unwrap();
        let published = a.published.clone().unwrap();
        let value = std::fs::read_to_string(&published).unwrap();
        assert_eq!(value.len(), 64);
        assert!(a.token.matches(&value));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&published), 0o640);
        assert_eq!(mode(&state.join(STATE_FILE)), 0o600);
        // A restart keeps the same token.
        let b = load(None, &state, &sock, None).unwrap();
        assert!(b.token.matches(&value));
        // A configured one wins and nothing is published.
        let c = load(Some("configured-token-0123"), &state, &sock, None).unwrap();
        assert!(c.token.matches("configured-token-0123") && c.published.is_none());
    }
}
