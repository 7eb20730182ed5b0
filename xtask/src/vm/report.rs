//! Reads what the guest wrote to its second serial port (see guest_init.sh).

const JOB_START: &str = "SENTINEL-JOB-START ";
const JOB_END: &str = "SENTINEL-JOB-END ";
const DMESG_START: &str = "SENTINEL-DMESG-START";
const DMESG_END: &str = "SENTINEL-DMESG-END";
const VERDICT: &str = "SENTINEL-VERDICT ";
/// A line a job wants shown on the host with its result (a measurement, say).
const NOTE: &str = "SENTINEL-NOTE ";

pub struct JobResult {
    pub name: String,
    /// None if the job never finished (the guest died or hung during it).
    pub status: Option<i32>,
    pub seconds: Option<String>,
    /// libtest's "test result: ..." lines and the job's notes.
    pub summaries: Vec<String>,
    /// Tests for which libtest printed a "---- NAME stdout ----" failure block.
    pub failed_tests: Vec<String>,
    /// Every line the job printed (stdout and stderr).
    pub output: Vec<String>,
}

#[derive(Default)]
pub struct GuestResults {
    pub jobs: Vec<JobResult>,
    /// "pass", "fail ..." or "setup-failed REASON".
    pub verdict: Option<String>,
}

pub fn parse(text: &str) -> GuestResults {
    let mut results = GuestResults::default();
    let mut in_dmesg = false;
    for raw_line in text.lines() {
        let line = raw_line.trim_end_matches('\r');
        if in_dmesg {
            in_dmesg = line != DMESG_END;
        } else if line == DMESG_START {
            in_dmesg = true;
        } else if let Some(name) = line.strip_prefix(JOB_START) {
            results.jobs.push(JobResult {
                name: name.to_owned(),
                status: None,
                seconds: None,
                summaries: Vec::new(),
                failed_tests: Vec::new(),
                output: Vec::new(),
            });
        } else if let Some(verdict) = line.strip_prefix(VERDICT) {
            results.verdict = Some(verdict.to_owned());
        } else if let Some(job) = results.jobs.last_mut() {
            // Output without a final newline puts the end marker mid-line.
            if let Some(at) = line.find(JOB_END) {
                if at > 0 {
                    job.output.push(line[..at].to_owned());
                }
                for field in line[at + JOB_END.len()..].split_whitespace() {
                    if let Some(status) = field.strip_prefix("status=") {
                        job.status = status.parse().ok();
                    } else if let Some(seconds) = field.strip_prefix("seconds=") {
                        job.seconds = Some(seconds.to_owned());
                    }
                }
                continue;
            }
            job.output.push(line.to_owned());
            if line.starts_with("test result: ") {
                job.summaries.push(line.to_owned());
            } else if let Some(note) = line.strip_prefix(NOTE) {
                job.summaries.push(note.to_owned());
            } else if let Some(test) = line
                .strip_prefix("---- ")
                .and_then(|rest| rest.strip_suffix(" stdout ----"))
            {
                job.failed_tests.push(test.to_owned());
            }
        }
    }
    results
}

/// The first "Kernel panic" line of the console log, if any.
pub fn kernel_panic(console: &str) -> Option<&str> {
    console
        .lines()
        .find(|line| line.contains("Kernel panic"))
        .map(str::trim)
}
