//! Membership changes made at run time (`add-broker`, `remove-broker`), persisted under
//! `data_dir/membership.json` so they survive a restart.
//!
//! Precedence: the config file's `[[broker]]` list is the base; persisted removals (by name)
//! take brokers out of it; persisted additions are added unless the config file already has a
//! broker of that name (the file wins: editing it is the deliberate act). Writes are atomic
//! (temporary file, fsync, rename).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::message::Protocol;

/// A broker added at run time, as the API received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddedBroker {
    /// Broker name.
    pub(crate) name: String,
    /// `host:port`.
    pub(crate) address: String,
    /// Protocol version.
    pub(crate) protocol: Protocol,
    /// TLS on (with the `[tls]` defaults) or plain TCP.
    pub(crate) tls: bool,
    /// Name to verify in its certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) server_name: Option<String>,
    /// Its topic rules (none: `[bridge] topics` both ways).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) rules: Vec<crate::rules::RuleSpec>,
}

/// The persisted changes.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Membership {
    /// Brokers added at run time.
    #[serde(default)]
    pub(crate) added: Vec<AddedBroker>,
    /// Names of config-file brokers removed at run time.
    #[serde(default)]
    pub(crate) removed: Vec<String>,
}

/// Errors reading or writing the membership file.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The file exists but cannot be read or parsed.
    #[error("{path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The file cannot be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl Membership {
    /// Path of the file under `data_dir`.
    pub(crate) fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("membership.json")
    }

    /// Loads the file; a missing file is an empty membership.
    pub(crate) fn load(data_dir: &Path) -> Result<Membership, MembershipError> {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| MembershipError::Read {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Membership::default()),
            Err(e) => Err(MembershipError::Read {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// Writes the file atomically.
    pub(crate) fn save(&self, data_dir: &Path) -> Result<(), MembershipError> {
        let path = Self::path(data_dir);
        let err = |source| MembershipError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(err)?;
        let tmp = data_dir.join(".membership.json.tmp");
        let body = serde_json::to_vec_pretty(self).map_err(|e| err(std::io::Error::other(e)))?;
        {
            use std::io::Write;
            // It names every broker: readable by the bridge's user only.
            let mut f = crate::files::create_private(&tmp).map_err(err)?;
            f.write_all(&body).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, &path).map_err(err)?;
        if let Ok(dir) = std::fs::File::open(data_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Records an addition (replacing an earlier record of the same name, undoing a removal).
    pub(crate) fn record_add(&mut self, broker: AddedBroker) {
        self.removed.retain(|n| *n != broker.name);
        self.added.retain(|b| b.name != broker.name);
        self.added.push(broker);
    }

    /// Records a removal: forgets an addition, or remembers that a config broker is gone.
    pub(crate) fn record_remove(&mut self, name: &str, from_config: bool) {
        self.added.retain(|b| b.name != name);
        if from_config && !self.removed.iter().any(|n| n == name) {
            self.removed.push(name.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn added(name: &str) -> AddedBroker {
        AddedBroker {
            name: name.into(),
            address: "127.0.0.1:1883".into(),
            protocol: Protocol::V5,
            tls: false,
            server_name: None,
            rules: vec![crate::rules::RuleSpec::from_mosquitto("a/# in 1 m/ \"\"").unwrap()],
        }
    }

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Membership::load(dir.path()).unwrap(), Membership::default());
        let mut m = Membership::default();
        m.record_add(added("b4"));
        m.record_remove("b1", true);
        m.save(dir.path()).unwrap();
        assert_eq!(Membership::load(dir.path()).unwrap(), m);
        assert!(!dir.path().join(".membership.json.tmp").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(Membership::path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "the topology is private");
        }
    }

    #[test]
    fn add_and_remove_cancel_out() {
        let mut m = Membership::default();
        m.record_remove("b1", true);
        m.record_add(added("b1"));
        assert!(m.removed.is_empty(), "re-adding undoes the removal");
        m.record_remove("b1", false);
        assert_eq!(m, Membership::default());
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(Membership::path(dir.path()), "{not json").unwrap();
        let e = Membership::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("membership.json"), "{e}");
    }
}
