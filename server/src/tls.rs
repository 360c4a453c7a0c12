//! HTTPS and the join URL. Browsers give WebGPU only to secure contexts
//! (HTTPS, or localhost), so a volunteer joining over a LAN needs HTTPS to
//! train on their GPU; without it their tab falls back to the CPU and says
//! why.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};

use anyhow::Context;
use axum_server::tls_rustls::RustlsConfig;

/// Where the server's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// A certificate chain and its private key, PEM files.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// Its private key.
        key: PathBuf,
    },
    /// A self-signed certificate made at start-up for localhost and the LAN
    /// address, kept in `dir` so browsers see the same one after a restart.
    SelfSigned {
        /// Folder of `cert.pem` and `key.pem`.
        dir: PathBuf,
    },
}

/// The rustls settings for `source`; makes the self-signed certificate
/// when there is none yet.
pub async fn rustls_config(source: &TlsSource) -> anyhow::Result<RustlsConfig> {
    // One process-wide crypto provider (ring); installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cert, key) = match source {
        TlsSource::Files { cert, key } => (cert.clone(), key.clone()),
        TlsSource::SelfSigned { dir } => self_signed(dir)?,
    };
    RustlsConfig::from_pem_file(&cert, &key)
        .await
        .with_context(|| {
            format!(
                "reading the certificate {} and key {}",
                cert.display(),
                key.display()
            )
        })
}

/// The self-signed certificate in `dir`, made if missing.
fn self_signed(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if let Some(ip) = lan_ip() {
        names.push(ip.to_string());
    }
    let made = rcgen::generate_simple_self_signed(names).context("making a certificate")?;
    std::fs::write(&cert, made.cert.pem())?;
    std::fs::write(&key, made.signing_key.serialize_pem())?;
    tracing::info!(path = %cert.display(), "made a self-signed certificate");
    Ok((cert, key))
}

/// This machine's address on its LAN: the source address of the route to
/// a public address (nothing is sent), or `None` without such a route.
pub fn lan_ip() -> Option<IpAddr> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// The URL volunteers open: the LAN address when the server listens on
/// every interface, else the address it listens on.
pub fn join_url(https: bool, bound: SocketAddr) -> String {
    let scheme = if https { "https" } else { "http" };
    let host = match bound.ip() {
        ip if ip.is_unspecified() => lan_ip().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ip => ip,
    };
    match host {
        IpAddr::V6(v6) => format!("{scheme}://[{v6}]:{}/", bound.port()),
        IpAddr::V4(v4) => format!("{scheme}://{v4}:{}/", bound.port()),
    }
}

/// Whether tabs opening `url` get a secure context (and so WebGPU).
pub fn is_secure_origin(url: &str) -> bool {
    url.starts_with("https://")
        || url.starts_with("http://127.0.0.1")
        || url.starts_with("http://localhost")
        || url.starts_with("http://[::1]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_join_url_names_the_bound_address_or_the_lan_one() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(join_url(false, local), "http://127.0.0.1:8080/");
        assert_eq!(join_url(true, local), "https://127.0.0.1:8080/");
        let any: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        let url = join_url(false, any);
        assert!(
            url.starts_with("http://") && url.ends_with(":9000/"),
            "{url}"
        );
        assert!(!url.contains("0.0.0.0"), "{url}");
    }

    #[test]
    fn only_https_and_loopback_are_secure_origins() {
        assert!(is_secure_origin("https://192.168.1.20:8443/"));
        assert!(is_secure_origin("http://127.0.0.1:8080/"));
        assert!(!is_secure_origin("http://192.168.1.20:8080/"));
    }

    #[tokio::test]
    async fn a_self_signed_certificate_is_made_once_and_loads() {
        let dir = std::env::temp_dir().join(format!("astraea-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let source = TlsSource::SelfSigned { dir: dir.clone() };

        rustls_config(&source).await.unwrap();
        let first = std::fs::read(dir.join("cert.pem")).unwrap();
        rustls_config(&source).await.unwrap();
        let second = std::fs::read(dir.join("cert.pem")).unwrap();

        assert!(String::from_utf8_lossy(&first).starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(first, second, "a restart keeps the certificate");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
