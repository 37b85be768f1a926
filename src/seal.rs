//! The mesh key: what makes the control plane (everything under `$meshbridge/<id>/`: instance
//! and owner records, their Wills, echo notes, probes, park copies) trustworthy, and the mesh's
//! client ids unguessable. Pure: no I/O but reading the key file in [`MeshKey::load`].
//!
//! A sealed payload is `body ‖ t ‖ tag`: `t` the sealing time (ms since the Unix epoch, 8 bytes
//! big endian), `tag` HMAC-SHA256 under the mesh key over the mesh id, the topic, the body and
//! `t`. [`MeshKey::open`] accepts a payload whose tag one of the keys computes (the first seals;
//! a second one is accepted too, for rotation) and hands back the body and `t`; what fails is
//! [`Rejected`]. Freshness against replay is the reader's rule per kind of record (see
//! `link::Link::open_control`), from `t`.
//!
//! Client ids: with a key, every id the mesh uses on a broker is `<id>-<broker>-<16 hex>`, the
//! hex the first 8 bytes of HMAC(key, "client-id" ‖ id ‖ broker): a client that does not know
//! the key cannot take a mesh session over (MQTT allows one connection per client id).

use std::path::Path;

use ring::hmac;

/// Bytes a seal adds to a payload: the time and the tag.
pub(crate) const SEAL_BYTES: usize = 8 + 32;

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Unreadable.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// `bridge mesh-key` would overwrite a file.
    #[error("{0} exists already (use --force to overwrite)")]
    Exists(String),
    /// `bridge mesh-key` cannot write the file.
    #[error("{path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not one or two lines of 64 hex digits.
    #[error(
        "{path}: line {line}: a mesh key is 64 hex digits (32 bytes; `bridge mesh-key --out FILE` writes one); one key, or two for a rotation (the first seals, both are accepted)"
    )]
    Format {
        /// The file.
        path: String,
        /// The first bad line (1-based).
        line: usize,
    },
}

/// Why a sealed payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Rejected {
    /// Too short to carry a seal (an unsealed record, from a process without the key or from
    /// anyone else).
    #[error("not sealed")]
    Unsealed,
    /// No key computes its tag (forged, altered, or sealed under another key).
    #[error("bad seal")]
    BadTag,
    /// Sealed, but too old (or too far ahead) for its kind: a replay.
    #[error("stale")]
    Stale,
}

/// What kind of control payload was refused (the `kind` label of
/// `meshbridge_control_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ControlKind {
    /// An instance record or its Will.
    Instance,
    /// An owner record.
    Owner,
    /// An echo note.
    Echo,
    /// A probe.
    Probe,
    /// A park copy or marker.
    Park,
}

impl ControlKind {
    /// Every kind, in label order.
    pub(crate) const ALL: [ControlKind; 5] = [
        ControlKind::Instance,
        ControlKind::Owner,
        ControlKind::Echo,
        ControlKind::Probe,
        ControlKind::Park,
    ];

    /// Its label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ControlKind::Instance => "instance",
            ControlKind::Owner => "owner",
            ControlKind::Echo => "echo",
            ControlKind::Probe => "probe",
            ControlKind::Park => "park",
        }
    }

    /// Its index in [`Self::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// How far another host's clock may be ahead of, or behind, this one's, for the freshness of
/// sealed payloads.
pub(crate) const SKEW_MS: u64 = 10_000;

/// The mesh key(s) of one mesh.
#[derive(Clone)]
pub(crate) struct MeshKey {
    /// The first seals; every one opens.
    keys: Vec<hmac::Key>,
    /// The same, as read (to tell whether a reload changed them).
    raw: Vec<[u8; 32]>,
    /// The mesh id, in every tag.
    mesh: String,
}

impl std::fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshKey")
            .field("keys", &self.keys.len())
            .field("mesh", &self.mesh)
            .finish()
    }
}

impl PartialEq for MeshKey {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw && self.mesh == other.mesh
    }
}

/// Writes a new random mesh key to `path`, readable by its owner only (`bridge mesh-key`);
/// an existing file only with `force`.
pub fn write_key_file(path: &Path, force: bool) -> Result<(), KeyError> {
    let shown = path.display().to_string();
    if path.exists() && !force {
        return Err(KeyError::Exists(shown));
    }
    crate::files::write(path, generate().as_bytes(), true).map_err(|source| KeyError::Write {
        path: shown,
        source,
    })
}

/// A new random key as the file holds it (64 hex digits and a newline).
pub(crate) fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    let mut s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    s.push('\n');
    s
}

impl MeshKey {
    /// Keys from raw bytes (the first seals), for mesh `mesh`.
    pub(crate) fn new(keys: &[[u8; 32]], mesh: &str) -> Self {
        Self {
            keys: keys
                .iter()
                .map(|k| hmac::Key::new(hmac::HMAC_SHA256, k))
                .collect(),
            raw: keys.to_vec(),
            mesh: mesh.to_string(),
        }
    }

    /// Reads a key file: one key (64 hex digits) per line, one or two lines; blank lines and
    /// `#` comments are skipped.
    pub(crate) fn load(path: &Path, mesh: &str) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, mesh).map_err(|line| KeyError::Format { path: shown, line })
    }

    /// [`Self::load`] of a file's text; the error is the first bad line (1-based).
    pub(crate) fn parse(text: &str, mesh: &str) -> Result<Self, usize> {
        let mut keys = Vec::new();
        let mut last = 0;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            last = i + 1;
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys.push(hex32(line).ok_or(i + 1)?);
        }
        if keys.is_empty() || keys.len() > 2 {
            return Err(last.max(1));
        }
        Ok(Self::new(&keys, mesh))
    }

    /// `body` sealed for `topic` at `now_ms`.
    pub(crate) fn seal(&self, topic: &str, body: &[u8], now_ms: u64) -> Vec<u8> {
        let t = now_ms.to_be_bytes();
        let tag = hmac::sign(
            &self.keys[0],
            &signed_input(&self.mesh, topic.as_bytes(), body, t),
        );
        let mut out = Vec::with_capacity(body.len() + SEAL_BYTES);
        out.extend_from_slice(body);
        out.extend_from_slice(&t);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// The body of a payload sealed for `topic`, and when it was sealed.
    pub(crate) fn open<'a>(
        &self,
        topic: &[u8],
        payload: &'a [u8],
    ) -> Result<(&'a [u8], u64), Rejected> {
        let split = payload
            .len()
            .checked_sub(SEAL_BYTES)
            .ok_or(Rejected::Unsealed)?;
        let (body, seal) = payload.split_at(split);
        let (t, tag) = seal.split_at(8);
        let t: [u8; 8] = t.try_into().map_err(|_| Rejected::Unsealed)?;
        let input = signed_input(&self.mesh, topic, body, t);
        // Constant time: ring compares the tags.
        let valid = self
            .keys
            .iter()
            .any(|k| hmac::verify(k, &input, tag).is_ok());
        if !valid {
            return Err(Rejected::BadTag);
        }
        Ok((body, u64::from_be_bytes(t)))
    }

    /// The suffix of every client id of the mesh on `broker` (see the module documentation).
    pub(crate) fn client_id_suffix(&self, broker: &str) -> String {
        let tag = hmac::sign(
            &self.keys[0],
            &signed_input(&self.mesh, b"client-id", broker.as_bytes(), [0; 8]),
        );
        tag.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// What a tag covers: the mesh id, the topic and the body, each with its length, then the time.
fn signed_input(mesh: &str, topic: &[u8], body: &[u8], t: [u8; 8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(mesh.len() + topic.len() + body.len() + 32);
    for part in [mesh.as_bytes(), topic, body] {
        v.extend_from_slice(&(part.len() as u64).to_be_bytes());
        v.extend_from_slice(part);
    }
    v.extend_from_slice(&t);
    v
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `body` as published on `topic` at `now_ms`: sealed with `key`, or as it is without one
/// (an unauthenticated mesh).
pub(crate) fn seal_if(key: Option<&MeshKey>, topic: &str, body: Vec<u8>, now_ms: u64) -> Vec<u8> {
    match key {
        Some(k) => k.seal(topic, &body, now_ms),
        None => body,
    }
}

/// Whether a sealing time `t` is within `max_age` of `now` (both ms since the Unix epoch),
/// allowing `skew` ahead for the clocks of other hosts.
pub(crate) fn fresh(t: u64, now: u64, max_age: u64, skew: u64) -> bool {
    t <= now.saturating_add(skew) && now.saturating_sub(t) <= max_age
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }

    #[test]
    fn a_sealed_payload_opens_under_the_same_key_mesh_and_topic_only() {
        let k = MeshKey::new(&[key(1)], "m");
        let sealed = k.seal("$meshbridge/m/owner/b1", b"{}", 42);
        assert_eq!(sealed.len(), 2 + SEAL_BYTES);
        assert_eq!(
            k.open(b"$meshbridge/m/owner/b1", &sealed),
            Ok((&b"{}"[..], 42))
        );
        assert_eq!(
            k.open(b"$meshbridge/m/owner/b2", &sealed),
            Err(Rejected::BadTag),
            "moved to another topic"
        );
        assert_eq!(
            MeshKey::new(&[key(1)], "other").open(b"$meshbridge/m/owner/b1", &sealed),
            Err(Rejected::BadTag),
            "another mesh"
        );
        assert_eq!(
            MeshKey::new(&[key(2)], "m").open(b"$meshbridge/m/owner/b1", &sealed),
            Err(Rejected::BadTag),
            "another key"
        );
        let mut altered = sealed.clone();
        altered[0] = b'[';
        assert_eq!(
            k.open(b"$meshbridge/m/owner/b1", &altered),
            Err(Rejected::BadTag)
        );
        let mut later = sealed.clone();
        later[2 + 7] ^= 1;
        assert_eq!(
            k.open(b"$meshbridge/m/owner/b1", &later),
            Err(Rejected::BadTag),
            "the time is covered"
        );
        assert_eq!(k.open(b"t", b"{\"alive\":true}"), Err(Rejected::Unsealed));
    }

    #[test]
    fn without_a_key_nothing_is_sealed() {
        assert_eq!(seal_if(None, "t", b"x".to_vec(), 1), b"x");
        let k = MeshKey::new(&[key(1)], "m");
        let sealed = seal_if(Some(&k), "t", b"x".to_vec(), 1);
        assert_eq!(k.open(b"t", &sealed), Ok((&b"x"[..], 1)));
    }

    #[test]
    fn a_second_key_is_accepted_for_a_rotation() {
        let old = MeshKey::new(&[key(1)], "m");
        let both = MeshKey::new(&[key(2), key(1)], "m");
        let sealed_old = old.seal("t", b"x", 1);
        assert!(
            both.open(b"t", &sealed_old).is_ok(),
            "the old key still opens"
        );
        let sealed_new = both.seal("t", b"x", 1);
        assert_eq!(old.open(b"t", &sealed_new), Err(Rejected::BadTag));
    }

    #[test]
    fn key_files_and_client_ids() {
        let text = format!("# mesh key\n{}\n", "ab".repeat(32));
        let k = MeshKey::parse(&text, "m").expect("one key");
        assert_eq!(k.keys.len(), 1);
        let two = format!("{}\n{}\n", "ab".repeat(32), "cd".repeat(32));
        assert_eq!(MeshKey::parse(&two, "m").map(|k| k.keys.len()), Ok(2));
        let three = format!("{two}{}\n", "ef".repeat(32));
        assert!(MeshKey::parse(&three, "m").is_err());
        assert_eq!(MeshKey::parse("xyz\n", "m").err(), Some(1));
        assert_eq!(MeshKey::parse("\n\n", "m").err(), Some(2));
        assert!(MeshKey::parse(&generate(), "m").is_ok());
        let id = k.client_id_suffix("b1");
        assert_eq!(id.len(), 16);
        assert_eq!(id, k.client_id_suffix("b1"), "stable");
        assert_ne!(id, k.client_id_suffix("b2"));
        assert_ne!(
            id,
            MeshKey::parse(&text, "m2").unwrap().client_id_suffix("b1"),
            "per mesh"
        );
    }

    #[test]
    fn freshness_allows_skew_ahead_and_max_age_behind() {
        assert!(fresh(1000, 1000, 100, 10));
        assert!(fresh(1005, 1000, 100, 10));
        assert!(!fresh(1011, 1000, 100, 10));
        assert!(fresh(900, 1000, 100, 10));
        assert!(!fresh(899, 1000, 100, 10));
    }
}
