use anyhow::{Context as _, anyhow};
use sentinel_toolchain::{BPF_LINKER_VARIABLE, EbpfToolchain};

/// Builds the eBPF programs (crate `sentinel-ebpf`) for the BPF target with the pinned nightly
/// and the bpf-linker made for its LLVM; the daemon embeds the resulting object with
/// `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let workspace = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("no workspace directory above {manifest_dir}"))?;
    let toolchain = EbpfToolchain::installed()?;
    let linker = toolchain.bpf_linker(workspace)?;
    println!("cargo:rerun-if-changed={}", linker.display());
    // SAFETY: the build script has not started any thread; aya-build's cargo inherits this.
    unsafe { std::env::set_var(BPF_LINKER_VARIABLE, &linker) };
    let ebpf_dir = workspace.join("sentinel-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 workspace path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "sentinel-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain.channel),
    )
}
