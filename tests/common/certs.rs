//! A test certificate authority and the server certificates it issues,
//! written as PEM files for Pier and for the clients that must trust it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};

/// The names every server certificate here covers: the mirror's domain,
/// its host-prefix names, and the loopback address.
pub const SERVER_NAMES: &[&str] = &["m.pier.test", "*.m.pier.test"];

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A certificate and its key as PEM files in a directory.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The leaf certificate, DER, to compare with what a server presents.
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = issuer.as_ref().pem();
        TestCa { issuer, pem }
    }

    /// Writes the CA certificate to `path`.
    pub fn write(&self, path: &Path) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, &self.pem).unwrap();
    }

    /// A server certificate for [`SERVER_NAMES`] and 127.0.0.1, written to
    /// `dir/<stem>.crt` (leaf then CA) and `dir/<stem>.key`.
    pub fn issue(&self, dir: &Path, stem: &str) -> Issued {
        self.issue_until(dir, stem, None)
    }

    /// Like `issue`, valid from a year ago until `until` from now.
    pub fn issue_until(&self, dir: &Path, stem: &str, until: Option<Duration>) -> Issued {
        let names: Vec<String> = SERVER_NAMES.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        if let Some(until) = until {
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::days(365);
            params.not_after = now + until;
        }
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("pier test {stem}"));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let issued = Issued {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&issued.cert, format!("{}{}", cert.pem(), self.pem)).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        issued
    }
}
