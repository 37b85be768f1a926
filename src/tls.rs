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
