//! The daemon's configuration file (YAML). Every field has a safe default, so no file is
//! needed for a first run.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::Error;

/// Where the daemon looks when `--config` is not given; a missing file there is not an error.
pub const DEFAULT_PATH: &str = "/etc/sentinel/sentinel.yaml";
/// Larger files are refused before parsing.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub metrics: MetricsConfig,
    pub services: ServicesConfig,
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            metrics: MetricsConfig::default(),
            services: ServicesConfig::default(),
        }
    }
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
        Self { max_labels: 512 }
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
                    path,
                    message: format!("file is {} bytes; the limit is 1 MiB", meta.len()),
                });
            }
            Ok(_) => {}
        }
        let text = std::fs::read_to_string(&path).map_err(read_error)?;
        Self::parse(&text).map_err(|message| Error::ConfigInvalid { path, message })
    }

    fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let config: Self = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        if config.services.max_labels == 0 {
            return Err("services.max_labels must be at least 1".into());
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        assert_eq!(
            Config::default().metrics.listen.to_string(),
            "127.0.0.1:9848"
        );
    }

    #[test]
    fn reads_fields() {
        let config =
            Config::parse("metrics:\n  listen: 0.0.0.0:9000\nservices:\n  max_labels: 3\n")
                .unwrap();
        assert_eq!(config.metrics.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(config.services.max_labels, 3);
    }

    #[test]
    fn rejects_unknown_keys_with_a_location() {
        let error = Config::parse("metrics:\n  lisen: 1.2.3.4:1\n").unwrap_err();
        assert!(error.contains("listen"), "{error}");
        assert!(error.contains('2'), "no line number in: {error}");
    }

    #[test]
    fn missing_default_file_is_fine_but_a_named_one_is_not() {
        assert!(Config::load(Some(Path::new("/nonexistent/sentinel.yaml"))).is_err());
    }
}
