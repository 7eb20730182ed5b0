//! Sentinel's kernel side: one module per hook family. Every program is a thin entry point
//! around a function that can fail; failures never propagate to the traced kernel path.
#![no_std]
#![no_main]

mod cgroup;
mod containment;
mod exec;
mod kernel;
mod maps;
mod oom;
mod resources;
mod scan;
mod ssh;
mod tcp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic, so this is unreachable.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
