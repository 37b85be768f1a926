//! The files of `bridge import-mosquitto`: the mosquitto configuration read with its
//! `include_dir`s (regular files of bounded size only), and the result written beside its
//! password files, never through a symbolic link. The conversion itself is [`super::convert`].

use std::path::{Path, PathBuf};

use super::Imported;
use crate::rules::words;

/// Why a mosquitto configuration cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file, or one of an `include_dir`.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An `include_dir` cannot be listed.
    #[error("include_dir {}: {source}", dir.display())]
    IncludeDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a regular file (a FIFO would block, a device never ends), or larger than a
    /// configuration file can be.
    #[error("{}: {why}", path.display())]
    NotAConfig {
        /// The file.
        path: PathBuf,
        /// What it is.
        why: String,
    },
    /// An `include_dir` holds more `.conf` files than a mosquitto configuration does.
    #[error(
        "include_dir {}: more than {MAX_INCLUDED} .conf files: not a mosquitto configuration directory",
        dir.display()
    )]
    TooManyFiles {
        /// The directory.
        dir: PathBuf,
    },
}

/// Largest file `read` takes: a mosquitto configuration is a few KiB.
pub const MAX_CONF_BYTES: u64 = 1 << 20;

/// Most `.conf` files one `include_dir` may hold.
pub const MAX_INCLUDED: usize = 256;

/// Reads a configuration file: a regular file of at most [`MAX_CONF_BYTES`] (a symbolic link
/// to one is followed), read no further than that bound even if it grows meanwhile.
fn read_conf(path: &Path) -> Result<String, ReadError> {
    use std::io::Read;
    let io = |source| ReadError::File {
        path: path.to_path_buf(),
        source,
    };
    let not = |why: String| ReadError::NotAConfig {
        path: path.to_path_buf(),
        why,
    };
    // Before opening: opening a FIFO would block until a writer comes.
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(not("not a regular file".into()));
    }
    if meta.len() > MAX_CONF_BYTES {
        return Err(not(format!(
            "{} bytes: larger than a configuration file ({MAX_CONF_BYTES} at most)",
            meta.len()
        )));
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    file.take(MAX_CONF_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_CONF_BYTES {
        return Err(not(format!(
            "grew past {MAX_CONF_BYTES} bytes while it was read"
        )));
    }
    Ok(text)
}

/// Reads `file` and the `*.conf` files of its `include_dir`s, in the order mosquitto reads
/// them (each directory's files alphabetically; a relative directory is taken from `file`'s),
/// as [`convert`](super::convert) takes them: (name, text).
pub fn read(file: &Path) -> Result<Vec<(String, String)>, ReadError> {
    let main = read_conf(file)?;
    let mut files = vec![(file.display().to_string(), main.clone())];
    for line in main.lines() {
        // A line that does not split is reported by `convert`, with its number.
        let Ok(w) = words(line) else { continue };
        let (Some("include_dir"), Some(dir)) = (w.first().map(String::as_str), w.get(1)) else {
            continue;
        };
        let dir = file
            .parent()
            .map_or_else(|| PathBuf::from(dir), |base| base.join(dir));
        let mut confs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| ReadError::IncludeDir {
                dir: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        if confs.len() > MAX_INCLUDED {
            return Err(ReadError::TooManyFiles { dir });
        }
        confs.sort();
        for conf in confs {
            let text = read_conf(&conf)?;
            files.push((conf.display().to_string(), text));
        }
    }
    Ok(files)
}

/// Why [`write()`] did not write the result.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A file to write exists and `force` was not given.
    #[error("{} exists already (use --force to overwrite)", .0.display())]
    Exists(PathBuf),
    /// A file to write is a symbolic link: writing would change whatever it points to.
    #[error(
        "{} is a symbolic link: not written through (remove it, or write elsewhere with --out)",
        .0.display()
    )]
    Symlink(PathBuf),
    /// A file cannot be written.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Writes `imported` to `out`, and its password files beside it readable by their owner only;
/// refuses to overwrite a file unless `force`. Returns the files written (with whether each is
/// private), the password files first.
pub fn write(
    imported: &Imported,
    out: &Path,
    force: bool,
) -> Result<Vec<(PathBuf, bool)>, WriteError> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut files: Vec<(PathBuf, &[u8], bool)> = imported
        .passwords
        .iter()
        .map(|(name, password)| (dir.join(name), password.as_bytes(), true))
        .collect();
    files.push((out.to_path_buf(), imported.toml.as_bytes(), false));
    // Never through a symbolic link, --force or not (`exists` follows links: a dangling
    // one would look free and be written through).
    if let Some((link, ..)) = files
        .iter()
        .find(|(p, ..)| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()))
    {
        return Err(WriteError::Symlink(link.clone()));
    }
    if !force && let Some((existing, ..)) = files.iter().find(|(p, ..)| p.exists()) {
        return Err(WriteError::Exists(existing.clone()));
    }
    let mut written = Vec::new();
    for (path, bytes, private) in files {
        let text = if private {
            [bytes, b"\n"].concat()
        } else {
            bytes.to_vec()
        };
        crate::files::write(&path, &text, private).map_err(|source| WriteError::Io {
            path: path.clone(),
            source,
        })?;
        written.push((path, private));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Imported {
        super::super::convert(&[("master.conf".into(), text.into())], "mesh").unwrap()
    }

    #[cfg(unix)]
    #[test]
    fn written_password_files_are_private_also_when_forced_over_old_ones() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bridge.toml");
        let imported = one("connection b\naddress h:1\nremote_username u\nremote_password pw\n");
        let password = dir.path().join("b.password");
        std::fs::write(&password, "old").unwrap();
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            write(&imported, &out, false),
            Err(WriteError::Exists(p)) if p == password
        ));
        let written = write(&imported, &out, true).unwrap();
        assert_eq!(
            written,
            vec![(password.clone(), true), (out.clone(), false)]
        );
        assert_eq!(std::fs::read_to_string(&password).unwrap(), "pw\n");
        let mode = std::fs::metadata(&password).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the old file's 0644 does not survive");
    }

    #[test]
    fn read_takes_include_dirs_conf_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let conf_d = dir.path().join("conf d");
        std::fs::create_dir(&conf_d).unwrap();
        std::fs::write(conf_d.join("b.conf"), "connection b\n").unwrap();
        std::fs::write(conf_d.join("a.conf"), "connection a\n").unwrap();
        std::fs::write(conf_d.join("notes.txt"), "not read\n").unwrap();
        let main = dir.path().join("mosquitto.conf");
        std::fs::write(&main, "listener 1883\ninclude_dir \"conf d\"\n").unwrap();
        let files = read(&main).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|(n, _)| {
                Path::new(n)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, vec!["mosquitto.conf", "a.conf", "b.conf"]);
        let missing = dir.path().join("nope.conf");
        assert!(
            read(&missing)
                .unwrap_err()
                .to_string()
                .contains("nope.conf")
        );
        std::fs::write(&main, "include_dir gone\n").unwrap();
        assert!(
            read(&main)
                .unwrap_err()
                .to_string()
                .starts_with("include_dir ")
        );
    }
}
