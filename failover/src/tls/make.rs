//! `understudy certs`: makes a pair's credentials — a CA of its own and, for each host, a
//! certificate it signed (good as a TLS client and server) and its key. The CA's key is
//! used for these and thrown away: no one can sign another member of the pair later (a
//! new pair of credentials is made instead).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// How many years the certificates are valid for, from the start of this year.
const VALID_YEARS: i32 = 10;

/// What `make_pair` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairFiles {
    /// The CA's certificate (`ca.pem`): each host's `tls_ca`.
    pub ca: PathBuf,
    /// Per host, in the order given: its certificate (`HOST.pem`, its `tls_cert`) and key
    /// (`HOST.key`, its `tls_key`).
    pub hosts: Vec<(String, PathBuf, PathBuf)>,
}

/// Why credentials could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// A host name that cannot name a file and a certificate.
    #[error("host {0:?}: a host is named with letters, digits, '.', '-' and '_' only")]
    BadHost(String),
    /// Fewer than one host, or a host named twice.
    #[error("give each host once, at least one (e.g. --hosts a,b)")]
    Hosts,
    /// A file to write exists: credentials are never overwritten.
    #[error(
        "{0} exists: credentials are not overwritten (remove it, or choose another directory)"
    )]
    Exists(PathBuf),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// rcgen could not make a key or a certificate.
    #[error("making a certificate: {0}")]
    Make(#[from] rcgen::Error),
}

/// Makes a CA and a certificate and key per host in `dir` (made if missing).
pub fn make_pair(dir: &Path, hosts: &[String]) -> Result<PairFiles, CertsError> {
    let distinct: std::collections::BTreeSet<&String> = hosts.iter().collect();
    if hosts.is_empty() || distinct.len() != hosts.len() {
        return Err(CertsError::Hosts);
    }
    for host in hosts {
        let fits = !host.is_empty()
            && !host.starts_with('.')
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !fits {
            return Err(CertsError::BadHost(host.clone()));
        }
    }
    let ca_path = dir.join("ca.pem");
    let paths: Vec<(String, PathBuf, PathBuf)> = hosts
        .iter()
        .map(|h| {
            (
                h.clone(),
                dir.join(format!("{h}.pem")),
                dir.join(format!("{h}.key")),
            )
        })
        .collect();
    for path in std::iter::once(&ca_path).chain(paths.iter().flat_map(|(_, c, k)| [c, k])) {
        if path.exists() {
            return Err(CertsError::Exists(path.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let year = this_year();
    let valid = |params: &mut CertificateParams| {
        params.not_before = rcgen::date_time_ymd(year, 1, 1);
        params.not_after = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "understudy pair CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    valid(&mut ca);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    write(&ca_path, ca.pem().as_bytes(), 0o644)?;
    for (host, cert_path, key_path) in &paths {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.clone()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, host.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Each host is both ends: it listens for its peer and connects to it.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        valid(&mut params);
        let cert = params.signed_by(&key, &ca)?;
        write(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write(cert_path, cert.pem().as_bytes(), 0o644)?;
    }
    Ok(PairFiles {
        ca: ca_path,
        hosts: paths,
    })
}

/// The current year (UTC), near enough for a validity period's start.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // 365.2425 days a year; a day early or late at a year's turn does not matter here.
    1970 + (secs / 31_556_952) as i32
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertsError> {
    let failed = |source| CertsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(failed)?;
    file.write_all(bytes).map_err(failed)
}
