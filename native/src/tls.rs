//! `wss://`: the native client over TLS. A server refuses plain `ws://`
//! from other machines unless its operator allowed it (`--allow-insecure`),
//! so a native client on another machine joins over TLS, trusting the web's
//! public roots (Mozilla's, from `webpki-roots`, compiled in: nothing is
//! read from the system or downloaded) and any certificate the operator
//! hands out, such as the self-signed one `serve --tls` keeps in its
//! `tls/` folder.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

pub use rustls::ClientConfig;

/// TLS settings for a client: the public web roots, plus every certificate
/// in the PEM file `extra_roots` when given (a server's self-signed
/// certificate, or a private CA's).
///
/// # Errors
/// The file cannot be read, holds no certificate, or a certificate in it
/// is malformed.
pub fn client_config(extra_roots: Option<&Path>) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_roots {
        let certificates = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading certificates from {}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("a malformed certificate in {}", path.display()))?;
        anyhow::ensure!(
            !certificates.is_empty(),
            "{} holds no PEM certificate",
            path.display()
        );
        for certificate in certificates {
            roots
                .add(certificate)
                .with_context(|| format!("a certificate in {} is not usable", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The settings for `wss://` when a client was given none: the public
/// roots alone, built once per process.
pub(crate) fn public_roots() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| client_config(None).expect("the compiled-in roots and ring always build"))
        .clone()
}

/// Why the server's certificate was not accepted, when `error` (from a
/// `wss://` connection) is that; `None` for any other error.
pub(crate) fn untrusted_certificate(
    error: &tokio_tungstenite::tungstenite::Error,
) -> Option<String> {
    let tokio_tungstenite::tungstenite::Error::Io(io) = error else {
        return None;
    };
    match io.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(why) => Some(format!("{why:?}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_a_certificate_is_refused_with_its_name() {
        let path = std::env::temp_dir().join(format!("astraea-not-a-cert-{}", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();

        let error = client_config(Some(&path)).unwrap_err();

        assert!(
            format!("{error:#}").contains("holds no PEM certificate"),
            "{error:#}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_missing_file_is_an_error_not_a_panic() {
        let error = client_config(Some(Path::new("/nonexistent/cert.pem"))).unwrap_err();

        assert!(format!("{error:#}").contains("/nonexistent/cert.pem"));
    }
}
