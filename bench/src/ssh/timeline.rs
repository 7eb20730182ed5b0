//! Lines of a child's output, each stamped with the moment this process read it. sshd's log
//! and `nft monitor` are read the same way, so the delay of a pipe and a thread wake-up is in
//! both stamps and cancels out of the time between them. The reading threads run under a
//! real-time policy, so that a busy CPU does not hold a stamp back by milliseconds.

use std::{
    io::{BufRead, BufReader, Read},
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::Instant,
};

/// SCHED_FIFO priority of the reading threads, and of the processes they read from.
pub const REALTIME_PRIORITY: i32 = 10;

#[derive(Clone)]
pub struct Stamped {
    pub at: Instant,
    pub text: String,
}

/// Every line read so far; the reading thread ends with the output (when the child exits).
pub struct Timeline {
    lines: Arc<Mutex<Vec<Stamped>>>,
}

impl Timeline {
    /// Reads `source` line by line on a thread of its own; `forward` sees each line first.
    pub fn record(
        source: impl Read + Send + 'static,
        mut forward: impl FnMut(&Stamped) + Send + 'static,
    ) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&lines);
        thread::spawn(move || {
            run_in_realtime();
            for text in BufReader::new(source).lines() {
                let Ok(text) = text else { break };
                let line = Stamped {
                    at: Instant::now(),
                    // sshd ends its lines with CR LF when it logs to stderr.
                    text: text.trim_end_matches('\r').to_owned(),
                };
                forward(&line);
                lock(&recorded).push(line);
            }
        });
        Self { lines }
    }

    /// How many lines have been read: a bookmark for `since`.
    pub fn len(&self) -> usize {
        lock(&self.lines).len()
    }

    /// The lines read after `bookmark` that `matches`, oldest first.
    pub fn since(&self, bookmark: usize, matches: impl Fn(&str) -> bool) -> Vec<Stamped> {
        lock(&self.lines)
            .iter()
            .skip(bookmark)
            .filter(|line| matches(&line.text))
            .cloned()
            .collect()
    }

    /// The last line read, for error messages.
    pub fn last_line(&self) -> Option<String> {
        lock(&self.lines).last().map(|line| line.text.clone())
    }
}

/// A thread that panicked while holding the lock left whole values behind: they are still good.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn run_in_realtime() {
    let parameters = libc::sched_param {
        sched_priority: REALTIME_PRIORITY,
    };
    // SAFETY: pthread_self is always valid for the calling thread, and the parameters are a
    // valid sched_param for the call.
    let error =
        unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &parameters) };
    if error != 0 {
        eprintln!(
            "[bench] WARNING: no real-time priority for a log reader ({}): its stamps may be \
             late on a busy machine",
            std::io::Error::from_raw_os_error(error)
        );
    }
}
