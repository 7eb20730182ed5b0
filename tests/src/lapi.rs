//! CrowdSec's Local API for the fleet suite and the bench: Debian's crowdsec 1.4.6 runs it alone
//! and offline (`crowdsec -no-cs -no-capi`) with a configuration, SQLite database and empty hub
//! of its own, on loopback; `cscli` with the same configuration registers bouncers and
//! machines and adds and deletes decisions.

use std::{
    fs::{self, File},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{
    TempDir, eventually, free_port, http_get,
    netlab::{Netns, in_netns},
};

/// Far beyond the ~0.3 s it takes to answer `/health`.
const START_WAIT: Duration = Duration::from_secs(20);

/// CrowdSec's Local API, alone and offline, with everything in its own directory.
pub struct Lapi {
    process: Option<Child>,
    port: u16,
    dir: TempDir,
    /// Served over TLS, with a certificate from a CA made for it (`ca`).
    tls: bool,
    /// Where Debian's crowdsec package was unpacked.
    crowdsec: PathBuf,
    /// The network namespace it listens in (its loopback), and `cscli` runs in; `None`: this
    /// process's.
    netns: Option<PathBuf>,
}

impl Lapi {
    /// Plain HTTP on this process's loopback; `crowdsec` is where Debian's package was unpacked.
    pub fn start(crowdsec: &Path) -> Self {
        Self::serve(crowdsec, false, None)
    }

    /// Over TLS, with a certificate for 127.0.0.1 signed by a CA of its own.
    pub fn start_tls(crowdsec: &Path) -> Self {
        Self::serve(crowdsec, true, None)
    }

    /// Plain HTTP on the loopback of `netns`, for consumers that run in there, with SQLite's
    /// write-ahead log: without it, thousands of decisions imported at once while bouncers pull
    /// fail with `database is locked`.
    pub fn start_in(crowdsec: &Path, netns: &Netns) -> Self {
        Self::serve(crowdsec, false, Some(netns))
    }

    fn serve(crowdsec: &Path, tls: bool, netns: Option<&Netns>) -> Self {
        let dir = TempDir::new("sentinel-lapi");
        for sub in ["data", "hub", "config"] {
            fs::create_dir_all(dir.path().join(sub)).expect("create the LAPI's directories");
        }
        // An empty hub: the Local API needs no parsers or scenarios.
        fs::write(dir.path().join("hub/.index.json"), "{}").expect("write the hub index");
        fs::write(
            dir.path().join("config/simulation.yaml"),
            "simulation: false\n",
        )
        .expect("write simulation.yaml");
        fs::copy(
            crowdsec.join("etc/crowdsec/profiles.yaml"),
            dir.path().join("config/profiles.yaml"),
        )
        .expect("copy the package's profiles.yaml");
        if tls {
            make_certificates(&dir.path().join("tls"));
        }
        let mut lapi = Self {
            process: None,
            port: free_port(),
            dir,
            tls,
            crowdsec: crowdsec.to_path_buf(),
            netns: netns.map(Netns::path),
        };
        fs::write(lapi.config(), lapi.config_text()).expect("write the LAPI's config");
        lapi.resume();
        lapi
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config/config.yaml")
    }

    /// The CA that signed the TLS LAPI's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("tls/ca.pem")
    }

    fn config_text(&self) -> String {
        let dir = self.dir.path().display();
        let tls = if self.tls {
            format!(
                "    tls:\n      cert_file: {dir}/tls/lapi.pem\n      key_file: {dir}/tls/lapi.key\n"
            )
        } else {
            String::new()
        };
        format!(
            "common:
  daemonize: false
  log_media: stdout
  log_level: info
config_paths:
  config_dir: {dir}/config/
  data_dir: {dir}/data/
  simulation_path: {dir}/config/simulation.yaml
  hub_dir: {dir}/hub/
  index_path: {dir}/hub/.index.json
  notification_dir: {dir}/config/notifications/
  plugin_dir: {dir}/plugins/
crowdsec_service:
  acquisition_path: {dir}/config/acquis.yaml
db_config:
  type: sqlite
  db_path: {dir}/data/crowdsec.db
  use_wal: {wal}
api:
  client:
    credentials_path: {dir}/config/local_api_credentials.yaml
  server:
    listen_uri: 127.0.0.1:{port}
{tls}    profiles_path: {dir}/config/profiles.yaml
    trusted_ips:
      - 127.0.0.1
prometheus:
  enabled: false
",
            port = self.port,
            wal = self.netns.is_some(),
        )
    }

    /// `program` of the unpacked package, run in the LAPI's namespace.
    fn command(&self, program: &str) -> Command {
        let program = self.crowdsec.join(program);
        match &self.netns {
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net={}", netns.display()))
                    .arg(program);
                command
            }
            None => Command::new(program),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Starts (again) the Local API on the same database, and waits until `/health` answers.
    pub fn resume(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("crowdsec.log"))
            .expect("open the LAPI's log");
        let process = self
            .command("usr/bin/crowdsec")
            .arg("-c")
            .arg(self.config())
            .args(["-no-cs", "-no-capi"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log"))
            .stderr(log)
            .spawn()
            .expect("start crowdsec");
        self.process = Some(process);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        // Over TLS, an open port: LAPI opens it once it serves.
        let up = eventually(START_WAIT, || {
            let answers = || {
                if self.tls {
                    TcpStream::connect(addr).is_ok()
                } else {
                    http_get(addr, "/health", None).is_ok()
                }
            };
            match &self.netns {
                Some(netns) => in_netns(netns, answers),
                None => answers(),
            }
        });
        assert!(up, "the LAPI did not answer /health:\n{}", self.log());
    }

    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("crowdsec.log")).unwrap_or_default()
    }

    /// `cscli ARGS` against this LAPI's configuration; returns stdout.
    pub fn cscli(&self, args: &[&str]) -> String {
        let mut cscli = self.command("usr/bin/cscli");
        cscli.arg("-c").arg(self.config()).args(args);
        if self.tls {
            // Go reads the CAs it trusts from here.
            cscli.env("SSL_CERT_FILE", self.ca());
        }
        let output = cscli.output().expect("run cscli");
        assert!(
            output.status.success(),
            "cscli {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("cscli prints UTF-8")
    }

    /// `cscli decisions add TARGET VALUE --duration 1h`: TARGET is `--ip` or `--range`.
    pub fn ban(&self, target: &str, value: &str) {
        self.cscli(&["decisions", "add", target, value, "--duration", "1h"]);
    }

    /// Registers a bouncer and returns its key.
    pub fn add_bouncer(&self, name: &str) -> String {
        self.cscli(&["bouncers", "add", name, "-o", "raw"])
            .trim()
            .to_string()
    }

    /// Registers a watcher with `password`.
    pub fn add_machine(&self, name: &str, password: &str) {
        self.cscli(&[
            "machines",
            "add",
            name,
            "--password",
            password,
            "-f",
            "/dev/null",
        ]);
    }

    /// `cscli LISTING list -o json` (`alerts` or `decisions`): alerts either way, with their
    /// decisions inside; `null` when there are none.
    pub fn alerts(&self, listing: &str) -> Vec<serde_json::Value> {
        let printed = self.cscli(&[listing, "list", "-o", "json"]);
        let alerts: Option<Vec<serde_json::Value>> =
            serde_json::from_str(&printed).expect("cscli prints JSON");
        alerts.unwrap_or_default()
    }

    /// The alerts LAPI holds about `address`.
    pub fn alerts_about(&self, address: &str) -> Vec<serde_json::Value> {
        self.alerts("alerts")
            .into_iter()
            .filter(|alert| alert["source"]["value"] == address)
            .collect()
    }

    /// The decisions in force about `address`.
    pub fn decisions_about(&self, address: &str) -> Vec<serde_json::Value> {
        self.alerts("decisions")
            .iter()
            .filter_map(|alert| alert["decisions"].as_array())
            .flatten()
            .filter(|decision| decision["value"] == address)
            .cloned()
            .collect()
    }

    /// Registers the machine `cscli decisions` and `cscli alerts` log in as.
    pub fn add_operator(&self) {
        self.cscli(&[
            "machines",
            "add",
            "operator",
            "--auto",
            "--url",
            &self.url(),
        ]);
    }
}

/// A CA, and a certificate for 127.0.0.1 it signed (`lapi.pem`, `lapi.key`), in `dir`.
fn make_certificates(dir: &Path) {
    fs::create_dir_all(dir).expect("create the certificates' directory");
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let new_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &new_key,
            &[
                "-subj",
                "/CN=Sentinel fleet test CA",
                "-days",
                "1",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &new_key,
            &[
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "lapi.key",
                "-out",
                "lapi.csr",
            ],
        ]
        .concat(),
    );
    fs::write(
        dir.join("lapi.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write the certificate's extensions");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "lapi.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "lapi.ext",
        "-out",
        "lapi.pem",
    ]);
}

impl Drop for Lapi {
    fn drop(&mut self) {
        self.stop();
    }
}
