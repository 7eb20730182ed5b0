//! Ctrl-C and SIGTERM end the bench through the ordinary error path, so that every guard
//! (child processes, the cgroup, the sysctl, tracefs) still cleans up.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn record(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

pub fn install() -> Result<()> {
    let handler: extern "C" fn(libc::c_int) = record;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if unsafe { libc::signal(signal, handler as libc::sighandler_t) } == libc::SIG_ERR {
            bail!(
                "cannot install the handler for signal {signal}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Fails once Ctrl-C or SIGTERM has arrived; long loops call this at every step.
pub fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}
