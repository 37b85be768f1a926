//! `bridge certs`: a development PKI made with rcgen — a CA, a server certificate for the
//! brokers with the names and IPs they are dialled by, and a client certificate for the
//! bridge (mTLS). For production use your organisation's CA (see certs/README.md).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Why the certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// A name is not a DNS name or IP address.
    #[error("--name {0:?}: not a valid DNS name or IP address")]
    BadName(String),
    /// The files exist already.
    #[error("{0} exists already (use --force to overwrite)")]
    Exists(PathBuf),
    /// Writing failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// rcgen refused the parameters.
    #[error("cannot make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The files `generate` writes, in order.
pub(crate) const FILES: [&str; 6] = [
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    "client.crt",
    "client.key",
];

/// Writes a dev CA, a server certificate for `names` (DNS names and IPs) and a client
/// certificate into `out`. Keys are written readable by the owner only.
pub fn generate(out: &Path, names: &[String], force: bool) -> Result<Vec<PathBuf>, CertsError> {
    for n in names {
        if rustls::pki_types::ServerName::try_from(n.as_str()).is_err() {
            return Err(CertsError::BadName(n.clone()));
        }
    }
    let paths: Vec<PathBuf> = FILES.iter().map(|f| out.join(f)).collect();
    if !force && let Some(p) = paths.iter().find(|p| p.exists()) {
        return Err(CertsError::Exists(p.clone()));
    }
    std::fs::create_dir_all(out).map_err(|source| CertsError::Write {
        path: out.to_path_buf(),
        source,
    })?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "meshbridge dev CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let leaf = |cn: &str,
                sans: Vec<String>,
                usage: ExtendedKeyUsagePurpose|
     -> Result<(String, String), CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_crt, server_key) = leaf(
        "meshbridge broker",
        names.to_vec(),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_crt, client_key) = leaf(
        "meshbridge bridge",
        vec!["meshbridge".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    let contents = [
        ca.pem(),
        ca_key_pem,
        server_crt,
        server_key,
        client_crt,
        client_key,
    ];
    for (path, body) in paths.iter().zip(contents) {
        write(path, &body, path.extension().is_some_and(|e| e == "key"))?;
    }
    Ok(paths)
}

fn write(path: &Path, body: &str, secret: bool) -> Result<(), CertsError> {
    let err = |source| CertsError::Write {
        path: path.to_path_buf(),
        source,
    };
    crate::files::write(path, body.as_bytes(), secret).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_a_pki_the_tls_module_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["mqtt.internal".to_string(), "127.0.0.1".to_string()];
        let files = generate(dir.path(), &names, false).unwrap();
        assert_eq!(files.len(), 6);
        let files_ref = crate::tls::TlsFiles {
            ca: Some(("ca", &files[0])),
            client_auth: Some((("cert", &files[4]), ("key", &files[5]))),
            server_name: None,
            insecure: false,
        };
        crate::tls::client_config(&files_ref).expect("usable by the bridge");
        assert!(matches!(
            generate(dir.path(), &names, false),
            Err(CertsError::Exists(_))
        ));
        generate(dir.path(), &names, true).expect("--force overwrites");
        assert!(matches!(
            generate(dir.path(), &["bad name!".into()], true),
            Err(CertsError::BadName(_))
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files[5]).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "keys are private");
        }
    }
}
