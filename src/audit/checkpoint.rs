//! Signed checkpoints of the audit chain, and the append-only checkpoint file kept outside the
//! database.
//!
//! A checkpoint is an Ed25519 signature over a position in the chain and its link. Kept in the
//! database it anchors pruned chains; kept in a file the database cannot reach, it also shows a
//! tail cut off together with the database's own checkpoints.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::{AuditError, describe_json_error};
use crate::crypto::SecretKey;

const DOMAIN: &[u8] = b"kluis.audit.checkpoint.v1";

/// How far back from the end of the file `append_to_file` looks for the last line. Checkpoint
/// lines are a few hundred bytes.
const TAIL_WINDOW: u64 = 64 * 1024;

/// A signed statement that the chain's event `seq` has link `link`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: i64,
    /// The event's link, hex.
    pub link: String,
    /// When the checkpoint was signed, microseconds since the Unix epoch.
    pub at_us: i64,
    /// The signer's Ed25519 public key, hex.
    pub public_key: String,
    /// Ed25519 signature, hex.
    pub signature: String,
}

fn signed_message(seq: i64, link: &[u8; 32], at_us: i64) -> Vec<u8> {
    let mut message = Vec::with_capacity(DOMAIN.len() + 8 + 32 + 8);
    message.extend_from_slice(DOMAIN);
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(link);
    message.extend_from_slice(&at_us.to_be_bytes());
    message
}

impl Checkpoint {
    /// Signs `"kluis.audit.checkpoint.v1" ‖ seq (i64 BE) ‖ link ‖ at_us (i64 BE)`.
    pub fn sign(key: &SigningKey, seq: i64, link: &[u8; 32], at_us: i64) -> Self {
        let signature = key.sign(&signed_message(seq, link, at_us));
        Self {
            seq,
            link: hex::encode(link),
            at_us,
            public_key: hex::encode(key.verifying_key().to_bytes()),
            signature: hex::encode(signature.to_bytes()),
        }
    }

    /// True when the signature is `public`'s (strict Ed25519 verification) over this
    /// checkpoint's seq, link and time, and the recorded public key is `public`.
    pub fn verify(&self, public: &VerifyingKey) -> bool {
        let Some(link) = self.link_bytes() else {
            return false;
        };
        let recorded_key = hex::decode(&self.public_key).ok();
        if recorded_key.as_deref() != Some(public.as_bytes().as_slice()) {
            return false;
        }
        let Some(signature) = hex::decode(&self.signature)
            .ok()
            .and_then(|bytes| <[u8; 64]>::try_from(bytes.as_slice()).ok())
        else {
            return false;
        };
        public
            .verify_strict(
                &signed_message(self.seq, &link, self.at_us),
                &Signature::from_bytes(&signature),
            )
            .is_ok()
    }

    /// The link as bytes; `None` when it is not 64 hex digits.
    pub fn link_bytes(&self) -> Option<[u8; 32]> {
        let bytes = hex::decode(&self.link).ok()?;
        bytes.as_slice().try_into().ok()
    }
}

/// The checkpoint signing key from its 32-byte seed (stored wrapped in the keyring).
pub fn signing_key_from_seed(seed: &SecretKey) -> SigningKey {
    SigningKey::from_bytes(seed.expose())
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn decode_line(line: &[u8]) -> Result<Checkpoint, String> {
    serde_json::from_slice(line).map_err(|e| describe_json_error(&e))
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Appends `cp` as one JSON line and fsyncs. Creates the file (mode 0600 on unix) if missing; it
/// is opened `O_APPEND` and locked exclusively for the duration of the call.
///
/// Crash repair: if the file's last line is not a checkpoint (a torn append), it is cut off first
/// so it does not end up in the middle of the file; if it is a checkpoint missing only its
/// newline, the newline is added.
pub fn append_to_file(path: &Path, cp: &Checkpoint) -> Result<(), AuditError> {
    let mut options = OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io_error(path))?;
    file.lock().map_err(io_error(path))?;

    let len = file.metadata().map_err(io_error(path))?.len();
    let needs_newline = repair_tail(&mut file, len).map_err(io_error(path))?;

    let mut line = Vec::with_capacity(256);
    if needs_newline {
        line.push(b'\n');
    }
    serde_json::to_writer(&mut line, cp)
        .map_err(|e| AuditError::Decode(describe_json_error(&e)))?;
    line.push(b'\n');
    file.write_all(&line).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))?;
    if len == 0 {
        sync_parent_dir(path)?;
    }
    Ok(())
}

/// Looks at the last line of a file of `len` bytes: cuts it off if it is not a checkpoint, and
/// returns whether the next append must start with a newline.
fn repair_tail(file: &mut File, len: u64) -> std::io::Result<bool> {
    if len == 0 {
        return Ok(false);
    }
    let window_start = len.saturating_sub(TAIL_WINDOW);
    file.seek(SeekFrom::Start(window_start))?;
    let mut tail = Vec::new();
    file.take(TAIL_WINDOW).read_to_end(&mut tail)?;

    // The last line with content: from after the newline preceding it to its last
    // non-whitespace byte.
    let Some(end) = tail.iter().rposition(|b| !b.is_ascii_whitespace()) else {
        // Only whitespace in the window: nothing to repair.
        return Ok(tail.last() != Some(&b'\n'));
    };
    let start = match tail[..end].iter().rposition(|&b| b == b'\n') {
        Some(newline) => newline + 1,
        None if window_start == 0 => 0,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the last line is longer than 64 KiB: not a checkpoint file",
            ));
        }
    };
    if decode_line(&tail[start..=end]).is_ok() {
        return Ok(tail.last() != Some(&b'\n'));
    }
    // A torn append: cut it off (the file is locked, so no other append is in flight).
    file.set_len(window_start + start as u64)?;
    file.sync_all()?;
    Ok(false)
}

#[cfg(unix)]
fn sync_parent_dir(path: &Path) -> Result<(), AuditError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error(parent))
}

#[cfg(not(unix))]
fn sync_parent_dir(_path: &Path) -> Result<(), AuditError> {
    Ok(())
}

/// Reads every checkpoint in the file. A missing file is an empty list. An undecodable last line
/// (a crash mid-append) is skipped and counted in the second value; an undecodable line anywhere
/// else is an error naming its line number. Blank lines are ignored.
pub fn read_file(path: &Path) -> Result<(Vec<Checkpoint>, usize), AuditError> {
    let contents = match std::fs::read(path) {
        Ok(contents) => contents,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(io_error(path)(e)),
    };
    let lines: Vec<(usize, &[u8])> = contents
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !is_blank(line))
        .map(|(index, line)| (index + 1, line))
        .collect();
    let mut checkpoints = Vec::with_capacity(lines.len());
    let mut skipped = 0;
    for (position, (line_number, line)) in lines.iter().enumerate() {
        match decode_line(line) {
            Ok(cp) => checkpoints.push(cp),
            Err(_) if position + 1 == lines.len() => skipped += 1,
            Err(reason) => {
                return Err(AuditError::CorruptCheckpointFile {
                    path: path.to_path_buf(),
                    line: *line_number,
                    reason,
                });
            }
        }
    }
    Ok((checkpoints, skipped))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        signing_key_from_seed(&SecretKey::random().unwrap())
    }

    fn checkpoint(key: &SigningKey, seq: i64) -> Checkpoint {
        Checkpoint::sign(key, seq, &[seq as u8; 32], 1_000 * seq)
    }

    #[test]
    fn signed_checkpoint_verifies_and_any_change_breaks_it() {
        let key = key();
        let public = key.verifying_key();
        let cp = checkpoint(&key, 7);
        assert!(cp.verify(&public));
        assert_eq!(cp.link_bytes(), Some([7u8; 32]));

        let mut other = cp.clone();
        other.seq = 8;
        assert!(!other.verify(&public));
        let mut other = cp.clone();
        other.at_us += 1;
        assert!(!other.verify(&public));
        let mut other = cp.clone();
        other.link = hex::encode([8u8; 32]);
        assert!(!other.verify(&public));
        let mut other = cp.clone();
        other.signature = "zz".into();
        assert!(!other.verify(&public));
        let mut other = cp.clone();
        other.link = "abc".into();
        assert!(!other.verify(&public));
        assert_eq!(other.link_bytes(), None);
    }

    #[test]
    fn checkpoint_from_another_key_does_not_verify() {
        let key = key();
        let forger = self::key();
        let forged = checkpoint(&forger, 7);
        assert!(!forged.verify(&key.verifying_key()));
        // Claiming the right public key does not help.
        let mut forged = forged;
        forged.public_key = hex::encode(key.verifying_key().to_bytes());
        assert!(!forged.verify(&key.verifying_key()));
    }

    #[test]
    fn signing_key_from_seed_is_deterministic_and_debug_hides_the_seed() {
        let seed = SecretKey::from_slice(&[42u8; 32]).unwrap();
        let a = signing_key_from_seed(&seed);
        let b = signing_key_from_seed(&seed);
        assert_eq!(a.verifying_key(), b.verifying_key());
        let debug = format!("{a:?}");
        assert!(!debug.contains(&hex::encode([42u8; 32])));
        assert!(!debug.contains("42, 42"));
    }

    #[test]
    fn file_append_and_read_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoints.jsonl");
        assert_eq!(read_file(&path).unwrap(), (Vec::new(), 0));
        let key = key();
        let written: Vec<Checkpoint> = (1..=3).map(|seq| checkpoint(&key, seq * 10)).collect();
        for cp in &written {
            append_to_file(&path, cp).unwrap();
        }
        assert_eq!(read_file(&path).unwrap(), (written, 0));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with('\n'));
    }

    #[cfg(unix)]
    #[test]
    fn file_is_created_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoints.jsonl");
        append_to_file(&path, &checkpoint(&key(), 1)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn torn_last_line_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoints.jsonl");
        let key = key();
        let first = checkpoint(&key, 1);
        append_to_file(&path, &first).unwrap();
        let torn = serde_json::to_string(&checkpoint(&key, 2)).unwrap();
        let mut contents = std::fs::read(&path).unwrap();
        contents.extend_from_slice(&torn.as_bytes()[..torn.len() / 2]);
        std::fs::write(&path, &contents).unwrap();
        assert_eq!(read_file(&path).unwrap(), (vec![first.clone()], 1));
    }

    #[test]
    fn append_after_a_torn_line_cuts_it_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoints.jsonl");
        let key = key();
        let first = checkpoint(&key, 1);
        append_to_file(&path, &first).unwrap();
        let mut contents = std::fs::read(&path).unwrap();
        contents.extend_from_slice(b"{\"seq\":2,\"li");
        std::fs::write(&path, &contents).unwrap();
        let second = checkpoint(&key, 2);
        append_to_file(&path, &second).unwrap();
        assert_eq!(read_file(&path).unwrap(), (vec![first, second], 0));
    }

    #[test]
    fn append_after_a_line_missing_only_its_newline_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoints.jsonl");
        let key = key();
        let first = checkpoint(&key, 1);
        std::fs::write(&path, serde_json::to_string(&first).unwrap()).unwrap();
        assert_eq!(read_file(&path).unwrap(), (vec![first.clone()], 0));
        let second = checkpoint(&key, 2);
        append_to_file(&path, &second).unwrap();
        assert_eq!(read_file(&path).unwrap(), (vec![first, second], 0));
    }

    #[test]
    fn garbage_in_the_middle_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoints.jsonl");
        let key = key();
        let line = |seq| serde_json::to_string(&checkpoint(&key, seq)).unwrap();
        let contents = format!("{}\nzz-garbage-zz\n{}\n", line(1), line(2));
        std::fs::write(&path, contents).unwrap();
        match read_file(&path) {
            Err(AuditError::CorruptCheckpointFile { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected a corrupt-file error, got {other:?}"),
        }
        let message = read_file(&path).unwrap_err().to_string();
        assert!(message.contains("line 2"), "{message}");
        assert!(!message.contains("zz-garbage-zz"), "{message}");
    }
}
