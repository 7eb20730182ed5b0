use sentinel_toolchain::BPF_LINKER_VARIABLE;

/// The eBPF object is linked by `bpf-linker`, which cargo does not track: relink when the linker
/// named by the daemon's build script changes.
fn main() {
    println!("cargo:rerun-if-env-changed={BPF_LINKER_VARIABLE}");
    if let Some(linker) = std::env::var_os(BPF_LINKER_VARIABLE) {
        println!(
            "cargo:rerun-if-changed={}",
            std::path::Path::new(&linker).display()
        );
    }
}
