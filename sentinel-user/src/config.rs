//! The daemon's configuration file (YAML). Every field has a safe default, so no file is
//! needed for a first run.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{Error, policy::Policy, ssh_guard::settings::SshGuardConfig};

/// Where the daemon looks when `--config` is not given; a missing file there is not an error.
pub const DEFAULT_PATH: &str = "/etc/sentinel/sentinel.yaml";
/// Larger files are refused before parsing.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub metrics: MetricsConfig,
    pub services: ServicesConfig,
    /// Per-service cgroup limits.
    pub policies: Policy,
    pub ssh_guard: SshGuardConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Loopback unless the operator decides otherwise.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServicesConfig {
    /// Distinct `service` label values; further services are reported as `other`.
    pub max_labels: usize,
    /// `auto` refuses to write the cgroups of systemd units on a systemd host (systemd owns
    /// them); `cgroupfs` writes every matched cgroup.
    pub cgroup_backend: CgroupBackend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupBackend {
    Auto,
    Cgroupfs,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9848)),
        }
    }
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            max_labels: 512,
            cgroup_backend: CgroupBackend::Auto,
        }
    }
}

impl Config {
    /// Reads `path`; `None` means the default path, which may be absent.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let (path, required) = match path {
            Some(path) => (path.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let read_error = |source| Error::ConfigRead {
            path: path.clone(),
            source,
        };
        match std::fs::metadata(&path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Self::default());
            }
            Err(error) => return Err(read_error(error)),
            Ok(meta) if meta.len() > MAX_FILE_BYTES => {
                return Err(Error::ConfigInvalid {
                    message: format!(
                        "{}: the file is {} bytes; the limit is 1 MiB",
                        path.display(),
                        meta.len()
                    ),
                    path,
                });
            }
            Ok(_) => {}
        }
        let text = std::fs::read_to_string(&path).map_err(read_error)?;
        Self::parse(&path.display().to_string(), &text).map_err(|problems| Error::ConfigInvalid {
            path,
            message: problems.join("\n"),
        })
    }

    /// Parses and checks the whole file; on failure returns every problem found, those of
    /// the `policies` section each with `file:line:column`.
    pub fn parse(name: &str, text: &str) -> Result<Self, Vec<String>> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        // The policy checker reports every problem at once, with locations.
        if let Err(diagnostics) = crate::policy::check_str(name, text) {
            return Err(diagnostics.iter().map(ToString::to_string).collect());
        }
        let config: Self =
            serde_saphyr::from_str(text).map_err(|e| vec![format!("{name}: {e}")])?;
        let mut problems = config.ssh_guard.problems();
        if config.services.max_labels == 0 {
            problems.push("services.max_labels must be at least 1".into());
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems
                .into_iter()
                .map(|problem| format!("{name}: {problem}"))
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        assert_eq!(Config::parse("t", "").unwrap(), Config::default());
        assert_eq!(
            Config::default().metrics.listen.to_string(),
            "127.0.0.1:9848"
        );
    }

    #[test]
    fn reads_fields() {
        let config = Config::parse(
            "t",
            "metrics:\n  listen: 0.0.0.0:9000\nservices:\n  max_labels: 3\nssh_guard:\n  ban_for: 1h\n  allow: [10.0.0.0/8]\n",
        )
        .unwrap();
        assert_eq!(
            config.ssh_guard.ban_for,
            std::time::Duration::from_secs(3600)
        );
        assert_eq!(config.ssh_guard.allow, vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(config.metrics.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(config.services.max_labels, 3);
    }

    #[test]
    fn rejects_unknown_keys_with_a_location() {
        let error = Config::parse("t", "metrics:\n  lisen: 1.2.3.4:1\n")
            .unwrap_err()
            .join("\n");
        assert!(error.contains("listen"), "{error}");
        assert!(error.contains("line 2"), "no line number in: {error}");
    }

    #[test]
    fn the_sample_configuration_is_valid() {
        let config = Config::parse("sentinel.yaml", include_str!("../../deploy/sentinel.yaml"));
        assert!(config.is_ok(), "{:?}", config.err());
    }

    #[test]
    fn policy_problems_carry_their_location() {
        let text = "policies:\n  - name: web\n    cgroup: web\n    memroy.max: 1G\n";
        let problems = Config::parse("f.yaml", text).unwrap_err();
        assert!(
            problems.contains(
                &r#"f.yaml:4:5: unknown policy key "memroy.max"; did you mean "memory.max"?"#
                    .to_string()
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn nonsense_guard_settings_are_refused() {
        let problems = Config::parse(
            "t",
            "ssh_guard:\n  max_failures: 0\n  ban_for: 2h\n  max_ban: 1h\n",
        )
        .unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn missing_default_file_is_fine_but_a_named_one_is_not() {
        assert!(Config::load(Some(Path::new("/nonexistent/sentinel.yaml"))).is_err());
    }
}
