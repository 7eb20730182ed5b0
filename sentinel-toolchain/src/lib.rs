//! The toolchains Sentinel is built with, each named in one file: the stable toolchain in the
//! workspace's `rust-toolchain.toml`, the eBPF nightly in `sentinel-ebpf/rust-toolchain.toml`.
//! The daemon's build script builds the eBPF object with exactly that nightly and a bpf-linker
//! made for the nightly's LLVM; `cargo xtask setup` installs both. A bpf-linker made for another
//! LLVM cannot read the nightly's bitcode ("Invalid record"), so the pair is checked, not assumed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

const STABLE_FILE: &str = include_str!("../../rust-toolchain.toml");
const EBPF_FILE: &str = include_str!("../../sentinel-ebpf/rust-toolchain.toml");

/// The bpf-linker release to build for the eBPF nightly's LLVM; it must offer the feature
/// `llvm-<major>` for that LLVM.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where cargo takes the BPF target's linker from; the daemon's build script sets it for the
/// eBPF build, so no other bpf-linker on `PATH` is ever used.
pub const BPF_LINKER_VARIABLE: &str = "CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run rustup, which runs the pinned eBPF toolchain `{channel}`: {source}")]
    NoRustup {
        channel: &'static str,
        source: std::io::Error,
    },
    #[error(
        "the eBPF toolchain `{channel}` (pinned in sentinel-ebpf/rust-toolchain.toml) is not \
         installed ({detail}): run `cargo xtask setup`"
    )]
    ToolchainMissing {
        channel: &'static str,
        detail: String,
    },
    #[error("`rustup run {channel} rustc -vV` names no LLVM version")]
    NoLlvmVersion { channel: &'static str },
    #[error(
        "bpf-linker {BPF_LINKER_VERSION} for LLVM {llvm_major} (what `{channel}` needs) is not \
         installed at {path}: run `cargo xtask setup`"
    )]
    LinkerMissing {
        channel: &'static str,
        llvm_major: u32,
        path: PathBuf,
    },
    #[error("bpf-linker at {path} does not work ({detail}): run `cargo xtask setup` to rebuild it")]
    LinkerBroken { path: PathBuf, detail: String },
    #[error(
        "bpf-linker at {path} is linked against LLVM {linked}, but the eBPF toolchain `{channel}` \
         emits LLVM {llvm_major} bitcode, which it cannot read: run `cargo xtask setup` to rebuild it"
    )]
    LinkerMismatch {
        path: PathBuf,
        linked: u32,
        channel: &'static str,
        llvm_major: u32,
    },
}

/// A toolchain pin: the `channel` and `components` of a `rust-toolchain.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub channel: &'static str,
    pub components: Vec<&'static str>,
}

/// The stable toolchain of the user-space crates, xtask and the tests.
pub fn stable_pin() -> Pin {
    parse_pin(STABLE_FILE).expect("rust-toolchain.toml names a channel (checked by a unit test)")
}

/// The nightly that builds and lints the eBPF crate.
pub fn ebpf_pin() -> Pin {
    parse_pin(EBPF_FILE)
        .expect("sentinel-ebpf/rust-toolchain.toml names a channel (checked by a unit test)")
}

/// Reads `channel = "..."` and `components = [...]` from a rust-toolchain.toml; both files are
/// the project's own and written one value per line.
fn parse_pin(file: &'static str) -> Option<Pin> {
    let value = |key: &str| {
        file.lines().find_map(|line| {
            let (name, value) = line.split_once('=')?;
            (name.trim() == key).then_some(value.trim())
        })
    };
    let channel = value("channel")?.strip_prefix('"')?.strip_suffix('"')?;
    let components = value("components")
        .and_then(|list| list.strip_prefix('[')?.strip_suffix(']'))
        .map(|list| {
            list.split(',')
                .map(|item| item.trim().trim_matches('"'))
                .filter(|item| !item.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Some(Pin {
        channel,
        components,
    })
}

/// The installed eBPF nightly and the LLVM it emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EbpfToolchain {
    pub channel: &'static str,
    pub llvm_major: u32,
}

impl EbpfToolchain {
    /// Asks the pinned nightly for its LLVM version; fails, saying how to fix it, when rustup or
    /// the toolchain is missing.
    pub fn installed() -> Result<Self, Error> {
        let channel = ebpf_pin().channel;
        let output = Command::new("rustup")
            .args(["run", channel, "rustc", "-vV"])
            .output()
            .map_err(|source| Error::NoRustup { channel, source })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let detail = stderr.lines().next().unwrap_or("rustup failed").trim();
            return Err(Error::ToolchainMissing {
                channel,
                detail: detail.to_owned(),
            });
        }
        let llvm_major = llvm_major(&String::from_utf8_lossy(&output.stdout))
            .ok_or(Error::NoLlvmVersion { channel })?;
        Ok(Self {
            channel,
            llvm_major,
        })
    }

    /// The install root of the bpf-linker made for this toolchain's LLVM: the LLVM major is part
    /// of the name, so moving the pin to another LLVM never picks up the old linker.
    pub fn bpf_linker_root(&self, workspace: &Path) -> PathBuf {
        workspace.join("target/tools").join(format!(
            "bpf-linker-{BPF_LINKER_VERSION}-llvm{}",
            self.llvm_major
        ))
    }

    /// The bpf-linker for this toolchain, once it is installed, runs, is the pinned version and
    /// is linked against this toolchain's LLVM.
    pub fn bpf_linker(&self, workspace: &Path) -> Result<PathBuf, Error> {
        let path = self.bpf_linker_root(workspace).join("bin/bpf-linker");
        if !path.exists() {
            return Err(Error::LinkerMissing {
                channel: self.channel,
                llvm_major: self.llvm_major,
                path,
            });
        }
        let broken = |detail: String| Error::LinkerBroken {
            path: path.clone(),
            detail,
        };
        let output = Command::new(&path)
            .arg("--version")
            .output()
            .map_err(|error| broken(error.to_string()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(broken(stderr.trim().to_owned()));
        }
        if stdout.trim() != format!("bpf-linker {BPF_LINKER_VERSION}") {
            return Err(broken(format!(
                "it says `{}`, not version {BPF_LINKER_VERSION}",
                stdout.trim()
            )));
        }
        let binary = std::fs::read(&path).map_err(|error| broken(error.to_string()))?;
        match linked_llvm_major(&binary) {
            Some(linked) if linked != self.llvm_major => Err(Error::LinkerMismatch {
                path,
                linked,
                channel: self.channel,
                llvm_major: self.llvm_major,
            }),
            // A statically linked bpf-linker names no libLLVM; its install root names its LLVM.
            _ => Ok(path),
        }
    }
}

/// The LLVM major version in `rustc -vV` output (`LLVM version: 22.1.8`).
pub fn llvm_major(rustc_verbose_version: &str) -> Option<u32> {
    rustc_verbose_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))?
        .split('.')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The LLVM major of the shared libLLVM an executable needs (`libLLVM.so.22.1` or
/// `libLLVM-22.so` in its dynamic string table), if it names one.
pub fn linked_llvm_major(binary: &[u8]) -> Option<u32> {
    const NAME: &[u8] = b"libLLVM";
    binary
        .windows(NAME.len())
        .enumerate()
        .filter(|(_, window)| *window == NAME)
        .find_map(|(start, _)| {
            let rest = &binary[start + NAME.len()..];
            let digits = rest
                .strip_prefix(b".so.")
                .or_else(|| rest.strip_prefix(b"-"))?;
            let end = digits.iter().position(|byte| !byte.is_ascii_digit())?;
            std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ebpf_toolchain_is_a_dated_nightly_with_what_the_build_and_lints_need() {
        let pin = ebpf_pin();
        let date = pin
            .channel
            .strip_prefix("nightly-")
            .expect("the eBPF toolchain is a nightly (-Z build-std)");
        let parts: Vec<&str> = date.split('-').collect();
        assert!(
            parts.len() == 3 && parts.iter().all(|part| part.parse::<u32>().is_ok()),
            "`{}` is not a dated nightly: a floating nightly changes under the build",
            pin.channel
        );
        assert_eq!(pin.components, ["rust-src", "clippy", "rustfmt"]);
    }

    #[test]
    fn the_stable_toolchain_is_an_exact_release() {
        let pin = stable_pin();
        let parts: Vec<&str> = pin.channel.split('.').collect();
        assert!(
            parts.len() == 3 && parts.iter().all(|part| part.parse::<u32>().is_ok()),
            "`{}` is not an exact stable release",
            pin.channel
        );
        assert_eq!(pin.components, ["clippy", "rustfmt"]);
    }

    #[test]
    fn a_pin_without_a_channel_is_refused() {
        assert_eq!(parse_pin("[toolchain]\nprofile = \"minimal\"\n"), None);
    }

    #[test]
    fn llvm_major_comes_from_rustc_verbose_version() {
        let output = "rustc 1.99.0-nightly (da80ed070 2026-07-14)\nbinary: rustc\n\
                      host: x86_64-unknown-linux-gnu\nrelease: 1.99.0-nightly\n\
                      LLVM version: 22.1.8\n";
        assert_eq!(llvm_major(output), Some(22));
        assert_eq!(llvm_major("rustc 1.99.0\nbinary: rustc\n"), None);
    }

    #[test]
    fn linked_llvm_comes_from_the_needed_library_name() {
        assert_eq!(
            linked_llvm_major(b"\0libc.so.6\0libLLVM.so.22.1\0libz.so.1\0"),
            Some(22)
        );
        assert_eq!(linked_llvm_major(b"\0libLLVM-23.so\0"), Some(23));
        // A mention without a version (an error message, say) is not a linked library.
        assert_eq!(
            linked_llvm_major(b"cannot load libLLVM\0libLLVM.so.21.1\0"),
            Some(21)
        );
        assert_eq!(linked_llvm_major(b"\0libc.so.6\0"), None);
    }
}
