//! Files only their owner may read: private keys, passwords, the spool's topology file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

/// Creates or truncates `path` for writing, readable by its owner only (mode 0600 on Unix,
/// also when the file existed with a looser mode: a mode given at creation would not apply).
pub(crate) fn create_private(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Writes `bytes` to `path`; with `private`, readable by its owner only ([`create_private`]).
pub(crate) fn write(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    if private {
        create_private(path)?.write_all(bytes)
    } else {
        std::fs::write(path, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn private_files_are_0600_even_when_they_existed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, b"new", true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        write(&dir.path().join("public"), b"x", false).unwrap();
    }
}
