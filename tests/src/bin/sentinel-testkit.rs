//! Workloads the privileged tests run inside their cgroups:
//!   listen ADDR COUNT           bind, print the port, accept COUNT connections
//!   connect ADDR COUNT          open and close COUNT connections
//!   hog MIB                     allocate and touch MIB mebibytes at once, then sleep
//!   leak MIB_PER_SEC [ignore-term]
//!                               grow by MIB_PER_SEC; on SIGTERM print "terminated" and exit
//!                               0, or ignore SIGTERM with `ignore-term`
//!   spin SECONDS                burn one CPU for SECONDS
//!   forkbomb COUNT              try to start COUNT sleeping children; print how many started
//!   pam CONFDIR RHOST FAILURES [session]
//!                               call libpam as sshd does (service `sentinel-forge` from
//!                               CONFDIR, PAM_RHOST=RHOST): fail FAILURES authentications, then
//!                               optionally open a session and keep it until stdin closes

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

const MIB: usize = 1024 * 1024;

static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| anyhow::anyhow!("missing argument {i}"))
    };
    match arg(0)? {
        "listen" => {
            let listener = TcpListener::bind(arg(1)?.parse::<SocketAddr>()?)?;
            println!("{}", listener.local_addr()?.port());
            std::io::stdout().flush()?;
            for _ in 0..arg(2)?.parse::<usize>()? {
                drop(listener.accept()?);
            }
        }
        "connect" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            for _ in 0..arg(2)?.parse::<usize>()? {
                drop(TcpStream::connect(addr)?);
            }
        }
        "hog" => {
            let memory = touched(arg(1)?.parse::<usize>()? * MIB);
            println!("allocated {} bytes", memory.len());
            std::thread::sleep(Duration::from_secs(3600));
        }
        "leak" => leak(
            arg(1)?.parse()?,
            args.get(2).map(String::as_str) == Some("ignore-term"),
        )?,
        "spin" => {
            let until = Instant::now() + Duration::from_secs(arg(1)?.parse()?);
            let mut x = 0u64;
            while Instant::now() < until {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        "forkbomb" => {
            let mut started = 0;
            for _ in 0..arg(1)?.parse::<usize>()? {
                // SAFETY: the child only sleeps and exits.
                match unsafe { libc::fork() } {
                    0 => {
                        std::thread::sleep(Duration::from_secs(30));
                        // SAFETY: leaving the forked child without running destructors.
                        unsafe { libc::_exit(0) };
                    }
                    -1 => break,
                    _ => started += 1,
                }
            }
            println!("{started}");
            std::io::stdout().flush()?;
        }
        "pam" => pam(
            arg(1)?,
            arg(2)?,
            arg(3)?.parse()?,
            args.get(4).map(String::as_str) == Some("session"),
        )?,
        other => anyhow::bail!("unknown mode {other}"),
    }
    Ok(())
}

/// libpam's C interface, loaded at run time so that nothing else of this program needs it.
#[repr(C)]
struct PamConversation {
    conv: extern "C" fn(
        libc::c_int,
        *const *const libc::c_void,
        *mut *mut libc::c_void,
        *mut libc::c_void,
    ) -> libc::c_int,
    appdata: *mut libc::c_void,
}

extern "C" fn refuse_questions(
    _: libc::c_int,
    _: *const *const libc::c_void,
    _: *mut *mut libc::c_void,
    _: *mut libc::c_void,
) -> libc::c_int {
    const PAM_CONV_ERR: libc::c_int = 19;
    PAM_CONV_ERR
}

fn pam(confdir: &str, rhost: &str, failures: u32, session: bool) -> anyhow::Result<()> {
    use std::ffi::CString;
    type Start = unsafe extern "C" fn(
        *const libc::c_char,
        *const libc::c_char,
        *const PamConversation,
        *const libc::c_char,
        *mut *mut libc::c_void,
    ) -> libc::c_int;
    type SetItem =
        unsafe extern "C" fn(*mut libc::c_void, libc::c_int, *const libc::c_void) -> libc::c_int;
    type Step = unsafe extern "C" fn(*mut libc::c_void, libc::c_int) -> libc::c_int;
    const PAM_RHOST: libc::c_int = 4;

    // SAFETY: loading a system library and looking up functions whose C signatures are
    // declared above, as libpam's headers declare them.
    let (start, set_item, authenticate, open_session) = unsafe {
        let library = libc::dlopen(c"libpam.so.0".as_ptr(), libc::RTLD_NOW);
        anyhow::ensure!(!library.is_null(), "cannot load libpam.so.0");
        let symbol = |name: &std::ffi::CStr| {
            let address = libc::dlsym(library, name.as_ptr());
            anyhow::ensure!(!address.is_null(), "libpam has no {name:?}");
            Ok(address)
        };
        (
            std::mem::transmute::<*mut libc::c_void, Start>(symbol(c"pam_start_confdir")?),
            std::mem::transmute::<*mut libc::c_void, SetItem>(symbol(c"pam_set_item")?),
            std::mem::transmute::<*mut libc::c_void, Step>(symbol(c"pam_authenticate")?),
            std::mem::transmute::<*mut libc::c_void, Step>(symbol(c"pam_open_session")?),
        )
    };
    let conversation = PamConversation {
        conv: refuse_questions,
        appdata: std::ptr::null_mut(),
    };
    let (service, user) = (CString::new("sentinel-forge")?, CString::new("nobody")?);
    let (confdir, rhost) = (CString::new(confdir)?, CString::new(rhost)?);
    let mut handle = std::ptr::null_mut();
    // SAFETY: valid C strings and pointers that outlive the calls.
    unsafe {
        let status = start(
            service.as_ptr(),
            user.as_ptr(),
            &conversation,
            confdir.as_ptr(),
            &mut handle,
        );
        anyhow::ensure!(status == 0, "pam_start_confdir failed: {status}");
        set_item(handle, PAM_RHOST, rhost.as_ptr().cast());
        for _ in 0..failures {
            println!("authenticate {}", authenticate(handle, 0));
        }
        if session {
            println!("session {}", open_session(handle, 0));
        }
    }
    std::io::stdout().flush()?;
    if session {
        // Keeps the "session" open until the test closes stdin.
        std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    }
    Ok(())
}

fn leak(mib_per_second: usize, ignore_term: bool) -> anyhow::Result<()> {
    let handler = if ignore_term {
        libc::SIG_IGN
    } else {
        on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t
    };
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGTERM, handler) };
    let mut held = Vec::new();
    let step = Duration::from_millis(100);
    loop {
        if TERMINATED.load(Ordering::SeqCst) {
            println!("terminated");
            std::io::stdout().flush()?;
            return Ok(());
        }
        held.push(touched(mib_per_second * MIB / 10));
        std::thread::sleep(step);
    }
}

/// `bytes` of memory with every page written, so it is really resident.
fn touched(bytes: usize) -> Vec<u8> {
    let mut memory = vec![0u8; bytes];
    for page in memory.chunks_mut(4096) {
        page[0] = 1;
    }
    memory
}
