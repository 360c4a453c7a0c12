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

/// Why a `wss://` connection failed for good, when `error` is a TLS
/// failure that retrying would only repeat (the certificate refused, a
/// server that does not speak TLS on that port, no common protocol), with
/// what to do about it; `None` for any other error (the server away, a
/// network fault), which reconnecting may cure.
pub(crate) fn tls_refusal(error: &tokio_tungstenite::tungstenite::Error) -> Option<String> {
    use rustls::CertificateError as Certificate;
    use tokio_tungstenite::tungstenite::Error;
    let rustls_error = match error {
        Error::Tls(tokio_tungstenite::tungstenite::error::TlsError::InvalidDnsName) => {
            return Some("the server's name in the URL is not a valid DNS name".into());
        }
        Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
        _ => return None,
    };
    Some(match rustls_error {
        rustls::Error::InvalidCertificate(why) => {
            let advice = match why {
                Certificate::UnknownIssuer | Certificate::BadSignature => {
                    "give the client the server's certificate with --ca-cert"
                }
                Certificate::NotValidForName | Certificate::NotValidForNameContext { .. } => {
                    "connect by a name or address the certificate names (a self-signed one \
                     names localhost and the LAN address it was made for: delete the server's \
                     tls/ folder to make a new one)"
                }
                Certificate::Expired | Certificate::ExpiredContext { .. } => {
                    "the certificate has expired: the server needs a new one"
                }
                _ => "check the server's certificate",
            };
            format!("the server's certificate is not trusted ({why:?}): {advice}")
        }
        other => {
            format!("the TLS handshake failed ({other}): is the server serving TLS on that port?")
        }
    })
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
