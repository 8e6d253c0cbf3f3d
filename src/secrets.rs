//! Reading small secret files (the app secret, the HIS token) the way an
//! administrator leaves them, and refusing the ways that go wrong.
//!
//! * Not a regular file (a FIFO, a device, a directory): refused before it is
//!   opened, since reading a FIFO blocks `check` and the daemon for ever.
//! * Writable by group or others: anyone who can write it can make the agent
//!   sign with a secret of their choosing, or authenticate HIS clients with
//!   their own token. Readable by others: the secret is out.
//! * Saved by Notepad or a Windows editor: a UTF-8 byte-order mark and a
//!   trailing CR LF. Both are stripped (a BOM left in passes `check` and then
//!   every call fails with 21006); whitespace inside is refused, since no
//!   secret of the platform's has any.
//! * Systemd credentials are made readable by the service only, so their
//!   mode is not checked (`LoadCredential=` copies them 0400 into a private
//!   mount).

use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;

/// Longest secret file read; anything longer is not a secret of ours.
pub const MAX_SECRET_FILE: u64 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretFileError {
    #[error("{path}: {error}")]
    Io { path: String, error: String },
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path} is writable by group or others (mode {mode:o}); run `chmod go-w` on it")]
    Writable { path: String, mode: u32 },
    #[error("{path} is readable by others (mode {mode:o}); run `chmod o-r` on it")]
    WorldReadable { path: String, mode: u32 },
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600` on it")]
    GroupReadable { path: String, mode: u32 },
    #[error("{path} is empty")]
    Empty { path: String },
    #[error("{path} is longer than {MAX_SECRET_FILE} bytes: not a secret file")]
    TooLong { path: String },
    #[error("{path} is not UTF-8 text")]
    NotText { path: String },
    #[error("{path} has white space or control characters inside the secret (only leading and trailing white space is ignored)")]
    InnerSpace { path: String },
}

/// Who may read the file besides its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readers {
    /// Owner only (the app secret).
    Owner,
    /// Owner and group (the HIS token, shared with the HIS group).
    Group,
    /// A systemd credential: no mode check.
    Credential,
}

/// Read a secret file: checked, BOM and surrounding white space removed.
pub fn read(path: &Path, readers: Readers) -> Result<String, SecretFileError> {
    let shown = path.display().to_string();
    let io = |e: std::io::Error| SecretFileError::Io {
        path: shown.clone(),
        error: e.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            "directory"
        } else if ft.is_fifo() {
            "FIFO (named pipe)"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_char_device() || ft.is_block_device() {
            "device"
        } else {
            "special file"
        };
        return Err(SecretFileError::NotRegular { path: shown, kind });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if readers != Readers::Credential {
        if mode & 0o022 != 0 {
            return Err(SecretFileError::Writable { path: shown, mode });
        }
        match readers {
            Readers::Owner if mode & 0o044 != 0 => {
                return Err(SecretFileError::GroupReadable { path: shown, mode })
            }
            Readers::Group if mode & 0o004 != 0 => {
                return Err(SecretFileError::WorldReadable { path: shown, mode })
            }
            _ => {}
        }
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(SecretFileError::TooLong { path: shown });
    }
    let text = String::from_utf8(bytes).map_err(|_| SecretFileError::NotText {
        path: shown.clone(),
    })?;
    let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    if text.is_empty() {
        return Err(SecretFileError::Empty { path: shown });
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SecretFileError::InnerSpace { path: shown });
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, content: &[u8], mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn notepad_bom_and_crlf_are_stripped() {
        let d = tempfile::tempdir().unwrap();
        let p = file(d.path(), "s", b"\xEF\xBB\xBFabc123\r\n", 0o600);
        assert_eq!(read(&p, Readers::Owner).unwrap(), "abc123");
    }

    #[test]
    fn modes_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let gw = file(d.path(), "gw", b"x", 0o620);
        assert!(matches!(
            read(&gw, Readers::Owner),
            Err(SecretFileError::Writable { .. })
        ));
        let ww = file(d.path(), "ww", b"x", 0o602);
        assert!(matches!(
            read(&ww, Readers::Group),
            Err(SecretFileError::Writable { .. })
        ));
        let gr = file(d.path(), "gr", b"x", 0o640);
        assert!(matches!(
            read(&gr, Readers::Owner),
            Err(SecretFileError::GroupReadable { .. })
        ));
        assert_eq!(read(&gr, Readers::Group).unwrap(), "x");
        let wr = file(d.path(), "wr", b"x", 0o644);
        assert!(matches!(
            read(&wr, Readers::Group),
            Err(SecretFileError::WorldReadable { .. })
        ));
        assert_eq!(read(&wr, Readers::Credential).unwrap(), "x");
    }

    /// Regression: a FIFO in place of the secret hung `check` for ever.
    #[test]
    fn a_fifo_is_refused_without_opening_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read(&p, Readers::Owner).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        assert!(matches!(
            read(d.path(), Readers::Owner),
            Err(SecretFileError::NotRegular {
                kind: "directory",
                ..
            })
        ));
    }

    #[test]
    fn empty_long_binary_and_inner_space_are_named() {
        let d = tempfile::tempdir().unwrap();
        let cases: [(&[u8], &str); 4] = [
            (b" \r\n\xEF\xBB\xBF", "empty"),
            (&[b'a'; 5000], "longer"),
            (b"\xff\xfe", "UTF-8"),
            (b"abc def", "white space"),
        ];
        for (i, (content, want)) in cases.iter().enumerate() {
            let p = file(d.path(), &format!("c{i}"), content, 0o600);
            let e = read(&p, Readers::Owner).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
