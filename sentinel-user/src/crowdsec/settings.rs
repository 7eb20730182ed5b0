//! The `crowdsec:` section of the configuration file, and the credential files it names.

use std::{
    fs::File,
    io::Read,
    net::IpAddr,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use reqwest::Url;
use rustls::pki_types::{
    CertificateDer,
    pem::{self, PemObject},
};
use serde_saphyr::Spanned;

use crate::{
    Error,
    yaml::{Checker, Invalid, Node, absolute_path, parse_duration},
};

/// The section's settings, as written in the file.
pub(crate) const CROWDSEC_KEYS: &[&str] = &[
    "lapi_url",
    "bouncer_key_file",
    "machine_id",
    "password_file",
    "pull_interval",
    "ca_file",
];

const EXPECTED_URL: &str =
    "an http:// or https:// URL such as https://lapi.example.org:8080 or http://127.0.0.1:8080";
const EXPECTED_PATH: &str = "an absolute path";
const EXPECTED_MACHINE: &str = "a machine name as `cscli machines add` took it";
const EXPECTED_INTERVAL: &str = "a duration from 1s to 1h, such as 10s";

/// A CA bundle is a few certificates; anything larger is not one.
const MAX_CA_BYTES: u64 = 1 << 20;

/// A credential file is a line or two; anything larger is not one.
const MAX_SECRET_BYTES: u64 = 4096;

/// Where Sentinel meets the fleet. Pulling needs the bouncer key, pushing the machine's
/// credentials; either is enough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrowdsecConfig {
    pub lapi_url: Url,
    /// Enables the bouncer: LAPI's decisions banned here.
    pub bouncer_key_file: Option<PathBuf>,
    /// With `password_file`, enables the watcher: local bans pushed to LAPI as alerts.
    pub machine: Option<Machine>,
    pub pull_interval: Duration,
    /// The only CA trusted for LAPI's certificate, when set; the system's otherwise.
    pub ca: Option<CaFile>,
}

/// A private CA's certificates (PEM), read and checked when the file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile {
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub id: String,
    pub password_file: PathBuf,
}

pub const DEFAULT_PULL_INTERVAL: Duration = Duration::from_secs(10);

/// Every setting of the section, by its name in the file, and whether `new` sets it
/// differently: the LAPI client, its credentials and its tasks are set up at start only.
pub(crate) fn differences(
    old: Option<&CrowdsecConfig>,
    new: Option<&CrowdsecConfig>,
) -> Vec<(&'static str, bool)> {
    let lapi_url = |config: Option<&CrowdsecConfig>| config.map(|c| c.lapi_url.clone());
    let key_file =
        |config: Option<&CrowdsecConfig>| config.and_then(|c| c.bouncer_key_file.clone());
    let machine_id = |config: Option<&CrowdsecConfig>| {
        config.and_then(|c| c.machine.as_ref().map(|m| m.id.clone()))
    };
    let password_file = |config: Option<&CrowdsecConfig>| {
        config.and_then(|c| c.machine.as_ref().map(|m| m.password_file.clone()))
    };
    let interval = |config: Option<&CrowdsecConfig>| config.map(|c| c.pull_interval);
    let ca = |config: Option<&CrowdsecConfig>| config.and_then(|c| c.ca.clone());
    vec![
        ("crowdsec.lapi_url", lapi_url(old) != lapi_url(new)),
        ("crowdsec.bouncer_key_file", key_file(old) != key_file(new)),
        ("crowdsec.machine_id", machine_id(old) != machine_id(new)),
        (
            "crowdsec.password_file",
            password_file(old) != password_file(new),
        ),
        ("crowdsec.pull_interval", interval(old) != interval(new)),
        ("crowdsec.ca_file", ca(old) != ca(new)),
    ]
}

impl Checker {
    /// The `crowdsec` section; every setting is checked even after one has failed.
    pub(crate) fn crowdsec(&mut self, node: &Spanned<Node>) -> Option<Option<CrowdsecConfig>> {
        let mut fields = self.section(node, "crowdsec", CROWDSEC_KEYS)?;
        if fields.is_empty() {
            return Some(None);
        }
        let lapi_url = match fields.remove("lapi_url") {
            Some(field) => self.value(&field, EXPECTED_URL, lapi_url),
            None => {
                self.report(
                    node.referenced,
                    "crowdsec: lapi_url is required: the Local API's address".into(),
                );
                None
            }
        };
        let bouncer_key_file = self.setting(&mut fields, "bouncer_key_file", None, |c, f| {
            c.value(f, EXPECTED_PATH, absolute_path).map(Some)
        });
        let machine_field = fields.remove("machine_id");
        let password_field = fields.remove("password_file");
        let machine_id = machine_field
            .as_ref()
            .map(|field| self.value(field, EXPECTED_MACHINE, machine_id));
        let password_file = password_field
            .as_ref()
            .map(|field| self.value(field, EXPECTED_PATH, absolute_path));
        let pull_interval = self.setting(
            &mut fields,
            "pull_interval",
            DEFAULT_PULL_INTERVAL,
            |c, f| c.value(f, EXPECTED_INTERVAL, pull_interval),
        );
        let ca = self.setting(&mut fields, "ca_file", None, |c, f| {
            let path = c.value(f, EXPECTED_PATH, absolute_path)?;
            match read_ca(&path) {
                Ok(pem) => Some(Some(CaFile { path, pem })),
                Err(reason) => {
                    c.report(f.value.referenced, format!("ca_file: {reason}"));
                    None
                }
            }
        });
        let machine = match (machine_id, password_file) {
            (Some(id), Some(password_file)) => Some(Some(Machine {
                id: id?,
                password_file: password_file?,
            })),
            (None, None) => Some(None),
            (Some(_), None) => {
                let at = machine_field.as_ref().expect("machine_id was set");
                self.report(
                    at.key_at,
                    "machine_id needs password_file: the machine's password, in a root-only file"
                        .into(),
                );
                None
            }
            (None, Some(_)) => {
                let at = password_field.as_ref().expect("password_file was set");
                self.report(
                    at.key_at,
                    "password_file needs machine_id: the name given to `cscli machines add`".into(),
                );
                None
            }
        };
        if bouncer_key_file.as_ref().is_some_and(Option::is_none)
            && machine.as_ref().is_some_and(Option::is_none)
        {
            self.report(
                node.referenced,
                "crowdsec: set bouncer_key_file (to enforce the fleet's decisions), or \
                 machine_id and password_file (to share this host's bans), or both"
                    .into(),
            );
            return None;
        }
        Some(Some(CrowdsecConfig {
            lapi_url: lapi_url?,
            bouncer_key_file: bouncer_key_file?,
            machine: machine?,
            pull_interval: pull_interval?,
            ca: ca?,
        }))
    }
}

/// An http(s) URL. Plain http is accepted only to this host: it would carry the bouncer key and
/// the machine's password in clear.
fn lapi_url(text: &str) -> Result<Url, Invalid> {
    let url = Url::parse(text).map_err(|_| Invalid::Unrecognized)?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Invalid::Because(
            "must not hold credentials: they belong in root-only files (bouncer_key_file, \
             password_file)",
        ));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(Invalid::Because(
            "plain http is accepted only to this host (127.0.0.1, [::1], localhost): it would \
             send the bouncer key and the machine's password in clear; use https://",
        )),
        _ => Err(Invalid::Unrecognized),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|addr| addr.is_loopback()),
        None => false,
    }
}

fn machine_id(text: &str) -> Result<String, Invalid> {
    let fits = !text.is_empty()
        && text.len() <= 255
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if fits {
        Ok(text.to_owned())
    } else {
        Err(Invalid::Because(
            "must be 1 to 255 letters, digits, `-`, `_`, `.` or `@`",
        ))
    }
}

fn pull_interval(text: &str) -> Result<Duration, Invalid> {
    match parse_duration(text)? {
        interval if interval < Duration::from_secs(1) => Err(Invalid::Because(
            "must be at least 1s: LAPI answers every bouncer's poll",
        )),
        interval if interval > Duration::from_secs(3600) => Err(Invalid::Because(
            "must be at most 1h: the fleet's bans would arrive that late",
        )),
        interval => Ok(interval),
    }
}

/// The certificates of a CA file, which must hold at least one and nothing that is not one.
fn read_ca(path: &Path) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| format!("cannot open {shown}: {error}"))?;
    let meta = file
        .metadata()
        .map_err(|error| format!("cannot read {shown}: {error}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mut pem = Vec::new();
    file.take(MAX_CA_BYTES + 1)
        .read_to_end(&mut pem)
        .map_err(|error| format!("cannot read {shown}: {error}"))?;
    if pem.len() as u64 > MAX_CA_BYTES {
        return Err(format!(
            "{shown} is over {MAX_CA_BYTES} bytes: not a CA file"
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|error| match error {
            pem::Error::MissingSectionEnd { .. } => {
                format!("{shown} is not PEM: a section has no END line")
            }
            error => format!("{shown} is not PEM: {error}"),
        })?;
        roots
            .add(cert)
            .map_err(|error| format!("{shown} holds a certificate that is not valid: {error}"))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{shown} holds no PEM certificate (BEGIN CERTIFICATE)"
        ));
    }
    Ok(pem)
}

/// The secret in a credential file: its first line. The file must be a regular file owned by
/// the daemon's user and readable by nobody else, so that no local user can take the key.
pub fn read_secret(path: &Path) -> Result<String, Error> {
    let refuse = |reason: String| Error::CrowdsecCredentials {
        path: path.to_path_buf(),
        reason,
    };
    // Not following a link: the checks below are about the file itself.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| refuse(format!("cannot open it: {error}")))?;
    let meta = file
        .metadata()
        .map_err(|error| refuse(format!("cannot read it: {error}")))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    let owner = nix::unistd::geteuid().as_raw();
    if meta.uid() != owner {
        return Err(refuse(format!(
            "owned by uid {}, not by this daemon's uid {owner}; `chown root: {}`",
            meta.uid(),
            path.display()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(refuse(format!(
            "mode {:o} lets other users read it; `chmod 600 {}`",
            meta.mode() & 0o777,
            path.display()
        )));
    }
    if meta.len() > MAX_SECRET_BYTES {
        return Err(refuse(format!(
            "{} bytes; a credential is one line",
            meta.len()
        )));
    }
    let mut text = String::new();
    file.take(MAX_SECRET_BYTES)
        .read_to_string(&mut text)
        .map_err(|error| refuse(format!("cannot read it: {error}")))?;
    let secret = text.lines().next().unwrap_or_default().trim();
    if secret.is_empty() {
        return Err(refuse("it is empty".into()));
    }
    Ok(secret.to_owned())
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt};

    use super::*;
    use crate::config::Config;

    fn parse(yaml: &str) -> Result<Option<CrowdsecConfig>, Vec<String>> {
        Config::parse("c.yaml", yaml)
            .map(|config| config.crowdsec)
            .map_err(|problems| problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_full_section_is_read() {
        let config = parse(
            "crowdsec:\n  lapi_url: https://lapi.example.org:8080/\n  bouncer_key_file: \
             /etc/sentinel/bouncer.key\n  machine_id: web-1\n  password_file: \
             /etc/sentinel/machine.password\n  pull_interval: 5s\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(config.lapi_url.as_str(), "https://lapi.example.org:8080/");
        assert_eq!(
            config.bouncer_key_file,
            Some(PathBuf::from("/etc/sentinel/bouncer.key"))
        );
        assert_eq!(
            config.machine,
            Some(Machine {
                id: "web-1".into(),
                password_file: "/etc/sentinel/machine.password".into()
            })
        );
        assert_eq!(config.pull_interval, Duration::from_secs(5));
        assert_eq!(parse("crowdsec:\n").unwrap(), None);
        assert_eq!(parse("metrics: {}\n").unwrap(), None);
    }

    #[test]
    fn each_bad_setting_is_refused_where_it_is_written() {
        let cases = [
            (
                "crowdsec:\n  lapi_url: http://lapi.example.org:8080\n  bouncer_key_file: /k\n",
                "c.yaml:2:13: lapi_url: plain http is accepted only to this host (127.0.0.1, \
                 [::1], localhost): it would send the bouncer key and the machine's password in \
                 clear; use https://, found \"http://lapi.example.org:8080\"",
            ),
            (
                "crowdsec:\n  lapi_url: ftp://127.0.0.1\n  bouncer_key_file: /k\n",
                "c.yaml:2:13: lapi_url: expected an http:// or https:// URL such as \
                 https://lapi.example.org:8080 or http://127.0.0.1:8080, found \
                 \"ftp://127.0.0.1\"",
            ),
            (
                "crowdsec:\n  bouncer_key_file: /k\n",
                "c.yaml:2:3: crowdsec: lapi_url is required: the Local API's address",
            ),
            (
                "crowdsec:\n  lapi_url: http://127.0.0.1:8080\n  bouncer_key_file: key\n",
                "c.yaml:3:21: bouncer_key_file: expected an absolute path, found \"key\"",
            ),
            (
                "crowdsec:\n  lapi_url: http://127.0.0.1:8080\n  machine_id: web-1\n",
                "c.yaml:3:3: machine_id needs password_file: the machine's password, in a \
                 root-only file",
            ),
            (
                "crowdsec:\n  lapi_url: http://127.0.0.1:8080\n",
                "c.yaml:2:3: crowdsec: set bouncer_key_file (to enforce the fleet's decisions), \
                 or machine_id and password_file (to share this host's bans), or both",
            ),
            (
                "crowdsec:\n  lapi_url: http://[::1]:8080\n  bouncer_key_file: /k\n  \
                 pull_interval: 500ms\n",
                "c.yaml:4:18: pull_interval: must be at least 1s: LAPI answers every bouncer's \
                 poll, found \"500ms\"",
            ),
            (
                "crowdsec:\n  lapi_url: http://localhost:8080\n  bouncer_key_file: /k\n  \
                 pul_interval: 5s\n",
                "c.yaml:4:3: unknown crowdsec setting \"pul_interval\"; did you mean \
                 \"pull_interval\"?",
            ),
            (
                "crowdsec:\n  lapi_url: https://user:secret@lapi.example.org\n  \
                 bouncer_key_file: /k\n",
                "c.yaml:2:13: lapi_url: must not hold credentials: they belong in root-only \
                 files (bouncer_key_file, password_file), found \
                 \"https://user:secret@lapi.example.org\"",
            ),
            (
                "crowdsec:\n  lapi_url: http://127.0.0.1:8080\n  bouncer_key_file: /k\nssh_guard: \
                 {enabled: false}\n",
                "c.yaml:1:1: crowdsec needs the SSH guard (ssh_guard.enabled: true): it owns the \
                 firewall the fleet's bans go into and makes the bans that are shared",
            ),
        ];
        for (yaml, expected) in cases {
            assert_eq!(parse(yaml), Err(vec![expected.to_string()]), "{yaml}");
        }
    }

    /// A self-signed CA certificate (EC P-256), only ever read, never trusted for anything.
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBnTCCAUOgAwIBAgIUGuBULCsfyZfdh05uuebCtBn6cQowCgYIKoZIzj0EAwIw\n\
GzEZMBcGA1UEAwwQU2VudGluZWwgdGVzdCBDQTAgFw0yNjEyMDIwOTI5MzdaGA8y\n\
MTI2MTEwODA5MjkzN1owGzEZMBcGA1UEAwwQU2VudGluZWwgdGVzdCBDQTBZMBMG\n\
ByqGSM49AgEGCCqGSM49AwEHA0IABHW9EfujGtHPYn3w5xfwHa7bJEh3iozaa0Ic\n\
hlIToxuMCDjgDVcmUfQ3ADP96wopW/3hJfBiFevwpI1cfObyOKmjYzBhMB0GA1Ud\n\
DgQWBBSxHR0R3bNHiBofZt4gKUMxJoI1bDAfBgNVHSMEGDAWgBSxHR0R3bNHiBof\n\
Zt4gKUMxJoI1bDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwICBDAKBggq\n\
hkjOPQQDAgNIADBFAiBj05dUsGL5OYu31z71q2qz6usbQ8Aq3xYm5olTEaiMRgIh\n\
AOJ19sR6K6Xp5d23KG6Ylvhy6IbZBO2h/UZ4CQo4GU9Z\n\
-----END CERTIFICATE-----\n";

    #[test]
    fn a_ca_file_is_read_when_the_file_is_checked_and_refused_where_it_is_named() {
        let dir = std::env::temp_dir().join(format!("sentinel-ca-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        fs::write(&ca, TEST_CA).unwrap();
        let section = |path: &Path| {
            format!(
                "crowdsec:\n  lapi_url: https://lapi.example.org\n  bouncer_key_file: /k\n  \
                 ca_file: {}\n",
                path.display()
            )
        };
        let config = parse(&section(&ca)).unwrap().unwrap();
        assert_eq!(
            config.ca,
            Some(CaFile {
                path: ca.clone(),
                pem: TEST_CA.as_bytes().to_vec()
            })
        );
        let not_pem = dir.join("key.txt");
        fs::write(&not_pem, "0123abcd\n").unwrap();
        let cut = dir.join("cut.pem");
        fs::write(&cut, &TEST_CA[..200]).unwrap();
        let missing = dir.join("missing.pem");
        let cases = [
            (
                missing.clone(),
                format!(
                    "cannot open {}: No such file or directory (os error 2)",
                    missing.display()
                ),
            ),
            (
                dir.clone(),
                format!("{} is not a regular file", dir.display()),
            ),
            (
                not_pem.clone(),
                format!(
                    "{} holds no PEM certificate (BEGIN CERTIFICATE)",
                    not_pem.display()
                ),
            ),
            (
                cut.clone(),
                format!("{} is not PEM: a section has no END line", cut.display()),
            ),
        ];
        for (path, reason) in cases {
            assert_eq!(
                parse(&section(&path)),
                Err(vec![format!("c.yaml:4:12: ca_file: {reason}")]),
                "{}",
                path.display()
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_credential_file_must_be_the_daemons_own_and_private() {
        let dir = std::env::temp_dir().join(format!("sentinel-secret-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bouncer.key");
        fs::write(&file, "  0123abcd  \nignored\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&file).unwrap(), "0123abcd");
        for (mode, shown) in [(0o640, "640"), (0o604, "604")] {
            fs::set_permissions(&file, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(
                read_secret(&file).unwrap_err().to_string(),
                format!(
                    "the CrowdSec credential file {0}: mode {shown} lets other users read it; \
                     `chmod 600 {0}`",
                    file.display()
                )
            );
        }
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&file, "\n").unwrap();
        assert!(
            read_secret(&file)
                .unwrap_err()
                .to_string()
                .ends_with(": it is empty")
        );
        let link = dir.join("link.key");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(
            read_secret(&link)
                .unwrap_err()
                .to_string()
                .contains("cannot open it")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
