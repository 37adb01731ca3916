//! A throwaway certificate authority for loopback test servers: `aap dev-server --tls`, the
//! demo's git server and the tests' HTTPS fronts all get their certificates here, so there is
//! one way to make them. The CA's key lives in memory only and dies with the value.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use std::sync::Arc;

/// A CA made now; [`ThrowawayCa::server_config`] issues server certificates from it.
pub struct ThrowawayCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

/// The names every certificate of a loopback server is for.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

fn fail(what: &str, e: &dyn std::fmt::Display) -> Error {
    Error::internal(format!("throwaway TLS setup: {what}: {e}"))
        .hint("retry without TLS to narrow it down: aap dev-server")
}

impl ThrowawayCa {
    /// A fresh CA whose certificate's common name is `common_name`.
    pub fn generate(common_name: &str) -> Result<ThrowawayCa> {
        let ca_key = rcgen::KeyPair::generate().map_err(|e| fail("CA key", &e))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| fail("CA params", &e))?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params
            .self_signed(&ca_key)
            .map_err(|e| fail("CA cert", &e))?;
        Ok(ThrowawayCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, ca_key),
        })
    }

    /// The CA's certificate as PEM (not secret: clients are given it to trust the servers).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A rustls server config with a fresh certificate for localhost, 127.0.0.1 and ::1
    /// (common name `common_name`) issued by this CA.
    pub fn server_config(&self, common_name: &str) -> Result<Arc<rustls::ServerConfig>> {
        let leaf_key = rcgen::KeyPair::generate().map_err(|e| fail("server key", &e))?;
        let mut leaf = rcgen::CertificateParams::new(LOOPBACK_NAMES.map(String::from).to_vec())
            .map_err(|e| fail("server params", &e))?;
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let leaf_cert = leaf
            .signed_by(&leaf_key, &self.issuer)
            .map_err(|e| fail("server cert", &e))?;
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail("protocol versions", &e))?
            .with_no_client_auth()
            .with_single_cert(vec![leaf_cert.der().clone()], key_der)
            .map_err(|e| fail("server config", &e))?;
        Ok(Arc::new(cfg))
    }
}
