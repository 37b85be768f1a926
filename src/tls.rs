//! rustls client configurations built from PEM files, with the ring provider.
//!
//! Two verifier wrappers cover what operators need when they dial brokers by IP:
//! [`NameOverride`] checks the certificate against a configured `server_name` instead of the
//! dialled host, and [`AcceptAny`] implements `insecure_skip_verify` (labs only; logged at start).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// A TLS setting that cannot be used: the config key at fault and why (the config turns it
/// into its own error naming the key).
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub(crate) struct TlsError {
    /// The config key, e.g. `tls.ca_file` or `broker[1].key_file`.
    pub(crate) key: String,
    /// What is wrong (with the file's path where there is one).
    pub(crate) message: String,
}

/// A file and the config key that named it (for error messages).
pub(crate) type KeyedPath<'a> = (&'a str, &'a Path);

/// The files and options of one broker's TLS settings.
pub(crate) struct TlsFiles<'a> {
    /// CA bundle (`None` only together with `insecure`).
    pub(crate) ca: Option<KeyedPath<'a>>,
    /// Client certificate and key for mTLS.
    pub(crate) client_auth: Option<(KeyedPath<'a>, KeyedPath<'a>)>,
    /// Name to verify instead of the dialled host.
    pub(crate) server_name: Option<ServerName<'static>>,
    /// Skip certificate verification.
    pub(crate) insecure: bool,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn err(key: &str, path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError {
        key: key.to_string(),
        message: format!("{}: {message}", path.display()),
    }
}

/// Reads every certificate of a PEM file; an empty or unreadable file is an error.
pub(crate) fn load_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| err(key, path, e))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| err(key, path, format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(err(key, path, "no PEM certificate found"));
    }
    Ok(certs)
}

fn load_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| err(key, path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| err(key, path, format!("no usable PEM private key ({e})")))
}

/// Builds a client configuration; every file problem names its key.
pub(crate) fn client_config(files: &TlsFiles<'_>) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError {
            key: "tls".into(),
            message: e.to_string(),
        })?;
    let verifier: Arc<dyn ServerCertVerifier> = if files.insecure {
        Arc::new(AcceptAny(provider.clone()))
    } else {
        let (key, path) = files.ca.ok_or_else(|| TlsError {
            key: "tls.ca_file".into(),
            message: "TLS is on but no CA is set".into(),
        })?;
        let mut roots = RootCertStore::empty();
        for cert in load_certs(key, path)? {
            roots
                .add(cert)
                .map_err(|e| err(key, path, format!("unusable CA certificate ({e})")))?;
        }
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| err(key, path, e))?;
        match &files.server_name {
            Some(name) => Arc::new(NameOverride {
                inner: webpki,
                name: name.clone(),
            }),
            None => webpki,
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match files.client_auth {
        Some(((ckey, cpath), (kkey, kpath))) => {
            let certs = load_certs(ckey, cpath)?;
            let private = load_key(kkey, kpath)?;
            builder.with_client_auth_cert(certs, private).map_err(|e| {
                err(
                    kkey,
                    kpath,
                    format!("does not match the certificate or is unsupported ({e})"),
                )
            })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Verifies against a configured name rather than the host that was dialled.
#[derive(Debug)]
struct NameOverride {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NameOverride {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `insecure_skip_verify`: any certificate is accepted, signatures are still checked.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A broker's TLS files, read again at every new connection (see [`TlsSource::config`]): a
/// client certificate renewed in place (cert-manager, an ACME timer, a short-lived internal CA)
/// is used from the next connection on, without a restart.
#[derive(Debug)]
pub(crate) struct TlsSource {
    /// CA bundle, with the config key that named it.
    ca: Option<(String, std::path::PathBuf)>,
    /// Client certificate and key, with their keys.
    client_auth: Option<((String, std::path::PathBuf), (String, std::path::PathBuf))>,
    server_name: Option<ServerName<'static>>,
    insecure: bool,
    state: std::sync::Mutex<Loaded>,
}

/// What a [`TlsSource`] last built, and from which versions of the files.
#[derive(Debug)]
struct Loaded {
    config: Arc<ClientConfig>,
    /// Length and modification time of each file, in the order of [`TlsSource::paths`].
    stamps: Vec<Option<(u64, std::time::SystemTime)>>,
    /// The client certificate's end of validity, seconds since the Unix epoch.
    expires: Option<u64>,
    /// Builds that failed since the start.
    failures: u64,
}

impl TlsSource {
    /// Builds the first configuration (every problem names its key, as at start).
    pub(crate) fn new(files: &TlsFiles<'_>) -> Result<Self, TlsError> {
        let config = client_config(files)?;
        let owned = |(k, p): KeyedPath<'_>| (k.to_string(), p.to_path_buf());
        let source = Self {
            ca: files.ca.map(owned),
            client_auth: files.client_auth.map(|(c, k)| (owned(c), owned(k))),
            server_name: files.server_name.clone(),
            insecure: files.insecure,
            state: std::sync::Mutex::new(Loaded {
                config,
                stamps: Vec::new(),
                expires: None,
                failures: 0,
            }),
        };
        let stamps = source.stamps();
        let expires = source.client_expiry();
        let mut state = source.lock();
        state.stamps = stamps;
        state.expires = expires;
        drop(state);
        Ok(source)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn paths(&self) -> Vec<&Path> {
        let mut paths: Vec<&Path> = self.ca.iter().map(|(_, p)| p.as_path()).collect();
        if let Some(((_, c), (_, k))) = &self.client_auth {
            paths.push(c);
            paths.push(k);
        }
        paths
    }

    fn stamps(&self) -> Vec<Option<(u64, std::time::SystemTime)>> {
        self.paths()
            .iter()
            .map(|p| {
                let m = std::fs::metadata(p).ok()?;
                Some((m.len(), m.modified().ok()?))
            })
            .collect()
    }

    /// The client certificate's end of validity (seconds since the Unix epoch), read from its
    /// file now.
    fn client_expiry(&self) -> Option<u64> {
        let ((key, path), _) = self.client_auth.as_ref()?;
        let first = load_certs(key, path).ok()?.into_iter().next()?;
        let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref()).ok()?;
        u64::try_from(cert.validity().not_after.timestamp()).ok()
    }

    /// The configuration for a new connection: built again when a file changed since the last
    /// build (its length or modification time). A file that does not build keeps the last good
    /// configuration; that is logged once per change, naming the file, and counted.
    pub(crate) fn config(&self) -> Arc<ClientConfig> {
        let stamps = self.stamps();
        let mut state = self.lock();
        if stamps == state.stamps {
            return state.config.clone();
        }
        state.stamps = stamps;
        let files = TlsFiles {
            ca: self.ca.as_ref().map(|(k, p)| (k.as_str(), p.as_path())),
            client_auth: self.client_auth.as_ref().map(|((ck, cp), (kk, kp))| {
                ((ck.as_str(), cp.as_path()), (kk.as_str(), kp.as_path()))
            }),
            server_name: self.server_name.clone(),
            insecure: self.insecure,
        };
        match client_config(&files) {
            Ok(config) => {
                state.config = config;
                drop(state);
                let expires = self.client_expiry();
                self.lock().expires = expires;
                tracing::info!("TLS files changed: the next connections use them");
                self.lock().config.clone()
            }
            Err(e) => {
                state.failures += 1;
                tracing::error!(error = %e, "TLS files changed but cannot be used: the connections keep the previous ones");
                state.config.clone()
            }
        }
    }

    /// The client certificate's end of validity (seconds since the Unix epoch), as last built.
    pub(crate) fn expires(&self) -> Option<u64> {
        self.lock().expires
    }

    /// Builds from changed files that failed since the start.
    pub(crate) fn failures(&self) -> u64 {
        self.lock().failures
    }
}
