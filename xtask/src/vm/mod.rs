//! QEMU harness for the cgroup v2 suites (placeholder until the harness lands).

#[derive(clap::Args)]
pub struct VmTestArgs {}

pub fn vm_test(_args: &VmTestArgs) -> anyhow::Result<()> {
    anyhow::bail!("vm-test is not implemented yet")
}
