use std::env;

/// The eBPF object is linked by `bpf-linker`, which cargo does not know about: rebuild when the
/// linker binary changes.
fn main() {
    let Ok(linker) = which::which("bpf-linker") else {
        println!("cargo:warning=bpf-linker not found on PATH; run `cargo xtask setup`");
        return;
    };
    println!("cargo:rerun-if-changed={}", linker.display());
    println!("cargo:rerun-if-env-changed=PATH");
    let _ = env::var_os("PATH");
}
