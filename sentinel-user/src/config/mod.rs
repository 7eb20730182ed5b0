//! The daemon's configuration file (YAML). Every setting has a safe default, so no file is
//! needed for a first run.
//!
//! The file is read with bounds (a regular file of at most [`MAX_FILE_BYTES`]), parsed once
//! into a tree that remembers where each value was written, and checked section by section
//! by the sections' owners; the typed configuration comes out of that same walk, so what
//! `sentinel check` accepts is exactly what the daemon runs with.

use std::{
    fs::File,
    io::{self, Read},
    net::SocketAddr,
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::Path,
    time::Duration,
};

use prometheus_client::{
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use serde_saphyr::Spanned;

pub use crate::cgroup::CgroupBackend;
use crate::{
    Error,
    cgroup::stats::ResourceDetail,
    crowdsec::settings::{self as crowdsec, CrowdsecConfig},
    policy::Policy,
    port_scan::settings::{self as port_scan, PortScanConfig},
    ssh_guard::settings::{ModeSetting, SshGuardConfig},
    yaml::{self, Checker, Diagnostic, Diagnostics, Invalid, Node, parse_duration, parse_whole},
};

#[cfg(test)]
mod tests;

/// Where the daemon looks when `--config` is not given; a missing file there is not an error.
pub const DEFAULT_PATH: &str = "/etc/sentinel/sentinel.yaml";
/// Larger files are refused before parsing: a configuration is a few kilobytes.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The configuration file's sections.
pub(crate) const TOP_LEVEL_KEYS: &[&str] = &[
    "metrics",
    "services",
    "policies",
    "ssh_guard",
    "crowdsec",
    "port_scan",
];
const METRICS_KEYS: &[&str] = &["listen", "resource_refresh", "resource_detail"];
const SERVICES_KEYS: &[&str] = &["max_labels", "cgroup_backend", "forget_removed_after"];

const EXPECTED_LISTEN: &str = "an address and port such as 127.0.0.1:9848 or [::1]:9848";
const EXPECTED_LABELS: &str = "a whole number of at least 1";
const EXPECTED_BACKEND: &str = "auto, systemd or cgroupfs";
const EXPECTED_REFRESH: &str = "a duration from 1s to 1h, such as 10s or 1m";
const EXPECTED_DETAIL: &str = "basic or full";
const EXPECTED_FORGET: &str = "a duration from 1s to 1d, such as 10m";

/// Resource figures are read this often: fresher than a 15 s scrape interval needs, and a pass
/// over thousands of cgroups costs a fraction of a percent of a core at this pace.
const DEFAULT_RESOURCE_REFRESH: Duration = Duration::from_secs(10);
/// Below this, reading thousands of cgroups would keep a core busy.
const MIN_RESOURCE_REFRESH: Duration = Duration::from_secs(1);
/// Above this, the figures are too old to be worth exporting.
const MAX_RESOURCE_REFRESH: Duration = Duration::from_secs(3600);

/// A removed service's series stay this long, so that scrapes see its final values.
const DEFAULT_FORGET_REMOVED_AFTER: Duration = Duration::from_secs(600);
/// Below a second, a scrape could miss a removed service's final values.
const MIN_FORGET_REMOVED_AFTER: Duration = Duration::from_secs(1);
/// Beyond a day, label slots of long-gone services would crowd out live ones.
const MAX_FORGET_REMOVED_AFTER: Duration = Duration::from_secs(86_400);

/// Why a reload refuses a file without settings.
const NOTHING_TO_RELOAD: &str = "the file holds no settings (it is empty or only comments, as \
    while an editor is still writing it); a reload would lift every policy, so it is refused \
    and the running configuration stays; to remove every policy, write `policies: []`";

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    pub metrics: MetricsConfig,
    pub services: ServicesConfig,
    /// Per-service cgroup limits.
    pub policies: Policy,
    pub ssh_guard: SshGuardConfig,
    /// The CrowdSec fleet; `None` when the section is absent.
    pub crowdsec: Option<CrowdsecConfig>,
    /// Port-scan detection; `None` when the section is absent.
    pub port_scan: Option<PortScanConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Loopback unless the operator decides otherwise.
    pub listen: SocketAddr,
    /// How often the policed services' cgroup files are read; scrapes export the latest read.
    pub resource_refresh: Duration,
    /// Which resource series each policed service has.
    pub resource_detail: ResourceDetail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicesConfig {
    /// Distinct `service` label values; further services are reported as `other`.
    pub max_labels: usize,
    /// Where the limits of systemd units are set.
    pub cgroup_backend: CgroupBackend,
    /// How long a service whose cgroups are all gone keeps its series.
    pub forget_removed_after: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9848)),
            resource_refresh: DEFAULT_RESOURCE_REFRESH,
            resource_detail: ResourceDetail::Basic,
        }
    }
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            max_labels: 512,
            cgroup_backend: CgroupBackend::Auto,
            forget_removed_after: DEFAULT_FORGET_REMOVED_AFTER,
        }
    }
}

impl Config {
    /// Reads the configuration at start: `None` means the default path, which may be absent.
    /// An empty file means every default.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let path = match path {
            Some(path) => path,
            None if !Path::new(DEFAULT_PATH).exists() => return Ok(Self::default()),
            None => Path::new(DEFAULT_PATH),
        };
        Ok(Self::read(path)?.unwrap_or_default())
    }

    /// Reads the file that is to replace a running configuration. Unlike at start, a file
    /// without settings is refused: it is far more likely a save in progress than a wish to
    /// lift every limit.
    pub fn reload(path: &Path) -> Result<Self, Error> {
        Self::read(path)?.ok_or_else(|| {
            let name = path.display().to_string();
            invalid(vec![Diagnostic::whole_file(
                &name,
                NOTHING_TO_RELOAD.into(),
            )])
        })
    }

    /// Parses and checks a whole file; on failure returns every problem found, in file order.
    pub fn parse(name: &str, text: &str) -> Result<Self, Vec<Diagnostic>> {
        Self::parse_document(name, text).map(Option::unwrap_or_default)
    }

    /// `metrics.listen` as `--metrics-addr` overrides it, at start and on every reload.
    pub fn with_metrics_addr(mut self, addr: Option<SocketAddr>) -> Self {
        if let Some(addr) = addr {
            self.metrics.listen = addr;
        }
        self
    }

    /// Every setting that takes effect only when the daemon starts, by its name in the file,
    /// and whether `new` sets it differently. `policies` and most of `ssh_guard` apply while
    /// running.
    pub fn restart_only_changes(&self, new: &Self) -> Vec<(&'static str, bool)> {
        // Destructured, so that a new setting cannot be left out here.
        let Self {
            metrics:
                MetricsConfig {
                    listen,
                    resource_refresh,
                    resource_detail,
                },
            services:
                ServicesConfig {
                    max_labels,
                    cgroup_backend,
                    forget_removed_after,
                },
            policies: _,
            ssh_guard,
            crowdsec,
            port_scan,
        } = self;
        let mut changes = vec![
            ("metrics.listen", *listen != new.metrics.listen),
            (
                "metrics.resource_refresh",
                *resource_refresh != new.metrics.resource_refresh,
            ),
            (
                "metrics.resource_detail",
                *resource_detail != new.metrics.resource_detail,
            ),
            (
                "services.max_labels",
                *max_labels != new.services.max_labels,
            ),
            (
                "services.cgroup_backend",
                *cgroup_backend != new.services.cgroup_backend,
            ),
            (
                "services.forget_removed_after",
                *forget_removed_after != new.services.forget_removed_after,
            ),
        ];
        changes.extend(ssh_guard.differences(&new.ssh_guard));
        changes.extend(crowdsec::differences(
            crowdsec.as_ref(),
            new.crowdsec.as_ref(),
        ));
        changes.extend(port_scan::differences(
            port_scan.as_ref(),
            new.port_scan.as_ref(),
        ));
        changes
    }

    /// The file at `path`, bounded and checked; `None` when it holds no document.
    fn read(path: &Path) -> Result<Option<Self>, Error> {
        let name = path.display().to_string();
        let text = read_bounded(path, &name).map_err(|problem| invalid(vec![problem]))?;
        Self::parse_document(&name, &text).map_err(invalid)
    }

    /// `None` when the text holds no document: empty, blank or only comments.
    fn parse_document(name: &str, text: &str) -> Result<Option<Self>, Vec<Diagnostic>> {
        let root =
            yaml::parse(text).map_err(|error| vec![Diagnostic::from_yaml_error(name, &error)])?;
        if root.value == Node::Null {
            return Ok(None);
        }
        yaml::collect(|checker| checker.file(&root))
            .map(Some)
            .map_err(|problems| {
                let mut diagnostics: Vec<_> = problems
                    .into_iter()
                    .map(|problem| Diagnostic::from_problem(name, problem))
                    .collect();
                diagnostics.sort_by_key(|diagnostic| (diagnostic.line, diagnostic.column));
                diagnostics
            })
    }
}

fn invalid(diagnostics: Vec<Diagnostic>) -> Error {
    Error::ConfigInvalid(Diagnostics(diagnostics))
}

/// Reads the file, refusing what would hang or exhaust the reader: anything but a regular
/// file (a FIFO blocks until some writer comes, a device may never end) and files over
/// [`MAX_FILE_BYTES`]. `name` labels the problem.
fn read_bounded(path: &Path, name: &str) -> Result<String, Diagnostic> {
    let whole_file = |reason| Diagnostic::whole_file(name, reason);
    let cannot_read = |error: io::Error| whole_file(format!("cannot read the file: {error}"));
    // Non-blocking, so that opening a FIFO returns at once instead of waiting for a writer;
    // regular files read the same either way.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(cannot_read)?;
    // Checked on the open file, so a file swapped in after the check is never read.
    let meta = file.metadata().map_err(cannot_read)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let found = if kind.is_fifo() {
            "a FIFO (named pipe)"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "a special file"
        };
        return Err(whole_file(format!(
            "not a regular file but {found}; the configuration must be a regular file"
        )));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(whole_file(too_large(meta.len())));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(whole_file(
            "the file grew beyond the limit of 1 MiB while it was read".into(),
        ));
    }
    String::from_utf8(bytes).map_err(|error| not_utf8(name, &error))
}

fn too_large(bytes: u64) -> String {
    format!("the file is {bytes} bytes; the limit is 1 MiB ({MAX_FILE_BYTES} bytes)")
}

/// Points at the first byte that is not UTF-8.
fn not_utf8(name: &str, error: &std::string::FromUtf8Error) -> Diagnostic {
    let bytes = error.as_bytes();
    let valid = &bytes[..error.utf8_error().valid_up_to()];
    let line_start = valid
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(0, |at| at + 1);
    let column = String::from_utf8_lossy(&valid[line_start..])
        .chars()
        .count()
        + 1;
    let line = valid.iter().filter(|&&byte| byte == b'\n').count() + 1;
    Diagnostic {
        file: name.to_owned(),
        line: line as u64,
        column: column as u64,
        reason: format!(
            "the file is not UTF-8 text: byte 0x{:02x} here is not valid",
            bytes[valid.len()]
        ),
    }
}

impl Checker {
    /// The whole file: a mapping of sections, each checked by its owner, all of them even
    /// after one has failed.
    fn file(&mut self, root: &Spanned<Node>) -> Option<Config> {
        let expected = "expected a mapping with the sections metrics, services, policies, \
                        ssh_guard, crowdsec and port_scan";
        let entries = self.entries(root, expected)?;
        let mut fields = self.fields(entries, TOP_LEVEL_KEYS, "top-level key");
        let defaults = Config::default();
        let metrics = self.setting(
            &mut fields,
            "metrics",
            defaults.metrics,
            |checker, field| checker.metrics(field.value),
        );
        let services = self.setting(
            &mut fields,
            "services",
            defaults.services,
            |checker, field| checker.services(field.value),
        );
        let policies = self.setting(
            &mut fields,
            "policies",
            defaults.policies,
            |checker, field| checker.policies(field.value),
        );
        let ssh_guard = self.setting(
            &mut fields,
            "ssh_guard",
            defaults.ssh_guard,
            |checker, field| checker.ssh_guard(field.value),
        );
        let crowdsec_at = fields.get("crowdsec").map(|field| field.key_at);
        let crowdsec = self.setting(&mut fields, "crowdsec", None, |checker, field| {
            checker.crowdsec(field.value)
        });
        if let (Some(Some(_)), Some(ssh_guard), Some(at)) = (&crowdsec, &ssh_guard, crowdsec_at)
            && !ssh_guard.enabled
        {
            self.report(
                at,
                "crowdsec needs the SSH guard (ssh_guard.enabled: true): it owns the firewall \
                 the fleet's bans go into and makes the bans that are shared"
                    .into(),
            );
            return None;
        }
        let port_scan_at = fields.get("port_scan").map(|field| field.key_at);
        let port_scan = self.setting(&mut fields, "port_scan", None, |checker, field| {
            checker.port_scan(field.value).map(Some)
        });
        if let (Some(Some(port_scan)), Some(ssh_guard), Some(at)) =
            (&port_scan, &ssh_guard, port_scan_at)
        {
            let problem = if !ssh_guard.enabled {
                Some(
                    "port_scan needs the SSH guard (ssh_guard.enabled: true): it owns the \
                     firewall, the allow list and the ban settings port-scan bans use",
                )
            } else if port_scan.mode == ModeSetting::Enforce
                && ssh_guard.mode == ModeSetting::Observe
            {
                Some(
                    "port_scan.mode: enforce needs ssh_guard.mode: enforce: port-scan bans go \
                     into the SSH guard's firewall, which an observing guard does not touch; \
                     set port_scan.mode: observe, or ssh_guard.mode: enforce",
                )
            } else {
                None
            };
            if let Some(problem) = problem {
                self.report(at, problem.into());
                return None;
            }
        }
        Some(Config {
            metrics: metrics?,
            services: services?,
            policies: policies?,
            ssh_guard: ssh_guard?,
            crowdsec: crowdsec?,
            port_scan: port_scan?,
        })
    }

    fn metrics(&mut self, node: &Spanned<Node>) -> Option<MetricsConfig> {
        let mut fields = self.section(node, "metrics", METRICS_KEYS)?;
        let defaults = MetricsConfig::default();
        let listen = self.setting(&mut fields, "listen", defaults.listen, |checker, field| {
            checker.value(field, EXPECTED_LISTEN, |text| {
                match text.parse::<SocketAddr>() {
                    Ok(addr) if addr.port() == 0 => Err(Invalid::Because(
                        "needs a port: 0 would pick a different one at every start",
                    )),
                    Ok(addr) => Ok(addr),
                    Err(_) => Err(Invalid::Unrecognized),
                }
            })
        });
        let resource_refresh = self.setting(
            &mut fields,
            "resource_refresh",
            defaults.resource_refresh,
            |checker, field| {
                checker.value(field, EXPECTED_REFRESH, |text| {
                    duration_between(
                        text,
                        (MIN_RESOURCE_REFRESH, "must be at least 1s"),
                        (MAX_RESOURCE_REFRESH, "must be at most 1h"),
                    )
                })
            },
        );
        let resource_detail = self.setting(
            &mut fields,
            "resource_detail",
            defaults.resource_detail,
            |checker, field| {
                checker.value(field, EXPECTED_DETAIL, |text| match text {
                    "basic" => Ok(ResourceDetail::Basic),
                    "full" => Ok(ResourceDetail::Full),
                    _ => Err(Invalid::Unrecognized),
                })
            },
        );
        Some(MetricsConfig {
            listen: listen?,
            resource_refresh: resource_refresh?,
            resource_detail: resource_detail?,
        })
    }

    fn services(&mut self, node: &Spanned<Node>) -> Option<ServicesConfig> {
        let mut fields = self.section(node, "services", SERVICES_KEYS)?;
        let defaults = ServicesConfig::default();
        let max_labels = self.setting(
            &mut fields,
            "max_labels",
            defaults.max_labels,
            |checker, field| {
                checker.value(field, EXPECTED_LABELS, |text| match parse_whole(text)? {
                    0 => Err(Invalid::Because("must be at least 1")),
                    labels => usize::try_from(labels).map_err(|_| yaml::TOO_LARGE),
                })
            },
        );
        let cgroup_backend = self.setting(
            &mut fields,
            "cgroup_backend",
            defaults.cgroup_backend,
            |checker, field| {
                checker.value(field, EXPECTED_BACKEND, |text| match text {
                    "auto" => Ok(CgroupBackend::Auto),
                    "systemd" => Ok(CgroupBackend::Systemd),
                    "cgroupfs" => Ok(CgroupBackend::Cgroupfs),
                    _ => Err(Invalid::Unrecognized),
                })
            },
        );
        let forget_removed_after = self.setting(
            &mut fields,
            "forget_removed_after",
            defaults.forget_removed_after,
            |checker, field| {
                checker.value(field, EXPECTED_FORGET, |text| {
                    duration_between(
                        text,
                        (MIN_FORGET_REMOVED_AFTER, "must be at least 1s"),
                        (MAX_FORGET_REMOVED_AFTER, "must be at most 1d"),
                    )
                })
            },
        );
        Some(ServicesConfig {
            max_labels: max_labels?,
            cgroup_backend: cgroup_backend?,
            forget_removed_after: forget_removed_after?,
        })
    }
}

/// A duration from `min` to `max`; each bound comes with the reason a value beyond it is refused.
fn duration_between(
    text: &str,
    min: (Duration, &'static str),
    max: (Duration, &'static str),
) -> Result<Duration, Invalid> {
    match parse_duration(text)? {
        duration if duration < min.0 => Err(Invalid::Because(min.1)),
        duration if duration > max.0 => Err(Invalid::Because(max.1)),
        duration => Ok(duration),
    }
}

/// `sentinel_config_restart_required{setting}`: whether the file sets a setting that applies
/// only at start to a value the daemon does not run with.
#[derive(Clone)]
pub struct RestartRequired(Family<Vec<(&'static str, String)>, Gauge>);

impl RestartRequired {
    pub fn register(registry: &mut Registry) -> Self {
        let family = Family::default();
        registry.register(
            "sentinel_config_restart_required",
            "1 when the configuration file changed this setting since the daemon started; it \
             applies only after a restart",
            family.clone(),
        );
        Self(family)
    }

    /// Records `changes`, as [`Config::restart_only_changes`] lists them.
    pub fn set(&self, changes: &[(&'static str, bool)]) {
        for &(setting, changed) in changes {
            self.0
                .get_or_create(&vec![("setting", setting.to_owned())])
                .set(i64::from(changed));
        }
    }
}
