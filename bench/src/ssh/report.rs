//! The SSH section's Markdown report.

use std::{
    fmt::{self, Display, Formatter},
    time::Duration,
};

use super::{
    attack::AttackResults,
    flood::{ADDRESSES, BOUND, FloodResults},
    guards::{Guard, MAX_FAILURES},
    preauth::{MAX_ATTEMPTS, PreauthResults, SETTLE},
};
use serde_json::json;

use crate::{
    report::{mebibytes, median},
    summary::Summary,
    system::Machine,
};

/// Sentinel's targets from the issue.
const COMMIT_MEDIAN_TARGET_MS: f64 = 1.0;
const COMMIT_MAX_TARGET_MS: f64 = 5.0;
const RSS_TARGET_MB: f64 = 30.0;

pub struct SshReport<'a> {
    pub machine: &'a Machine,
    pub attacks: u32,
    pub results: &'a [AttackResults],
    /// Peers that could not be measured here, and why.
    pub unavailable: &'a [(Guard, String)],
    pub flood: &'a FloodResults,
    /// The key-only attack, per guard.
    pub preauth: &'a [PreauthResults],
    /// Peers that could not be measured against the key-only sshd, and why.
    pub preauth_unavailable: &'a [(Guard, String)],
    pub elapsed: Duration,
}

impl Display for SshReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "## SSH brute-force benchmark (`cargo xtask bench --only ssh`)\n"
        )?;
        writeln!(
            f,
            "{}. One OpenSSH server in a network namespace; per tool {} attacks, each from a \
             fresh address: {MAX_FAILURES} failing password logins with `sshpass` + `ssh`, one \
             connection each ({} at once, then the last alone). Every tool: ban at {MAX_FAILURES} \
             failures within 10 min, for 60 s, nftables drop. {:.1} minutes in all.\n",
            self.machine,
            self.attacks,
            MAX_FAILURES - 1,
            self.elapsed.as_secs_f64() / 60.0
        )?;
        self.write_attack_table(f)?;
        writeln!(f)?;
        self.write_attack_notes(f)?;
        writeln!(f)?;
        self.write_flood_table(f)?;
        writeln!(f)?;
        write_flood_notes(f)?;
        writeln!(f)?;
        self.write_preauth_table(f)?;
        writeln!(f)?;
        self.write_preauth_notes(f)
    }
}

impl SshReport<'_> {
    fn write_attack_table(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| Tool | attacks banned | time-to-ban end to end, median / max | 5th failure logged \
             → ban element committed, median / max | CPU-s per attack | RSS during the \
             attacks (peak since start) | allow-listed address banned |"
        )?;
        writeln!(f, "|---|--:|--:|--:|--:|--:|--:|")?;
        for results in self.results {
            let ends = end_to_end_ms(results);
            let commits = commits_ms(results);
            writeln!(
                f,
                "| {} | {}/{} | {} | {} | {:.3} | {:.1} MiB ({:.1} MiB) | {} |",
                results.guard.label(),
                ends.len(),
                results.samples.len(),
                median_and_max(&ends, 1),
                median_and_max(&commits, 2),
                results.cpu_seconds_per_attack,
                mebibytes(results.rss_kib),
                mebibytes(results.hwm_kib),
                if results.allowlisted_banned {
                    "YES"
                } else {
                    "no"
                },
            )?;
        }
        for (guard, _) in self.unavailable {
            writeln!(
                f,
                "| {} | not run (see below) | — | — | — | — | — |",
                guard.label()
            )?;
        }
        Ok(())
    }

    fn write_attack_notes(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if let Some(sentinel) = self.sentinel() {
            writeln!(
                f,
                "- Sentinel's targets (reported, not asserted): {}.",
                self.verdicts(sentinel)
            )?;
            if let Some((sum, count)) = sentinel.own_latency.filter(|(_, count)| *count > 0) {
                writeln!(
                    f,
                    "- Sentinel's own `sentinel_ban_latency_seconds` (kernel timestamp of the \
                     failing `pam_authenticate` → ban committed) agrees: mean {:.2} ms over \
                     {count} bans.",
                    sum / count as f64 * 1e3
                )?;
            }
        }
        writeln!(
            f,
            "- End to end: from sshd's 5th `Failed password` line to the first dropped probe. \
             Probes start as that line is read, one every millisecond: a TCP connect from the \
             attacker's address to a closed port of the server, reset until the ban and \
             dropped after it (every tool drops all TCP from a banned address; after each ban a \
             connect to sshd's port is checked to be dropped too). Resolution about 1.2 ms. The \
             client's own exit is no useful start: sshd holds a failure back for at least as \
             long as the attempt took (about 2 s with PAM's delay), and every tool had banned \
             before the client knew it had failed."
        )?;
        writeln!(
            f,
            "- Committed: from sshd's 5th `Failed password` line (logged right after \
             `pam_authenticate` returns, the moment Sentinel's uprobe sees) to the ban's \
             element reported by `nft monitor new elements` in the server namespace. The bench \
             reads both through pipes and stamps them on one clock, independently of the tools."
        )?;
        writeln!(
            f,
            "- fail2ban (pyinotify backend, `nftables-allports`, blocktype drop, own table) and \
             sshguard (`sshg-logtail | sshg-parser | sshg-blocker | sshg-fw-nft-sets`) run in \
             the foreground with the bench's own configuration, reading a syslog-format copy of \
             sshd's log that the bench writes as each line arrives. sshguard scores 10 per \
             failed password plus 2 per `Connection closed by authenticating user` line, so \
             its threshold is 50: the 5th failed password crosses it, as the 5th failure \
             does for the others."
        )?;
        writeln!(
            f,
            "- CPU: the tool's cgroup (`cpu.stat`, every process including the `nft` commands \
             the peers start) from the first attack to the last ban, per attack; for Sentinel \
             this includes all its other monitoring of the host meanwhile. RSS: summed over the \
             tool's processes, the most seen after any attack; peak: each process's VmHWM \
             since it started, summed."
        )?;
        writeln!(
            f,
            "- Allow-listed: {} failures from an address inside every tool's allow list, then \
             3 s of watching the firewall and probing.",
            2 * MAX_FAILURES
        )?;
        for (guard, reason) in self.unavailable {
            writeln!(
                f,
                "- {} could not be measured here: {reason}",
                guard.label()
            )?;
        }
        Ok(())
    }

    fn sentinel(&self) -> Option<&AttackResults> {
        self.results
            .iter()
            .find(|results| results.guard == Guard::Sentinel)
    }

    fn verdicts(&self, sentinel: &AttackResults) -> String {
        let commits = commits_ms(sentinel);
        let ends = end_to_end_ms(sentinel);
        let megabytes = |kib: u64| kib as f64 * 1024.0 / 1e6;
        let rss_mb = megabytes(sentinel.rss_kib);
        let mut verdicts = vec![
            verdict(
                &format!("commit median ≤ {COMMIT_MEDIAN_TARGET_MS} ms"),
                &format!("{:.2} ms", median(&commits)),
                median(&commits) <= COMMIT_MEDIAN_TARGET_MS,
            ),
            verdict(
                &format!("commit max ≤ {COMMIT_MAX_TARGET_MS} ms"),
                &format!("{:.2} ms", maximum(&commits)),
                maximum(&commits) <= COMMIT_MAX_TARGET_MS,
            ),
            verdict(
                &format!("daemon under {RSS_TARGET_MB} MB RSS"),
                &format!(
                    "{rss_mb:.1} MB during the attacks (peak since start {:.1} MB)",
                    megabytes(sentinel.hwm_kib)
                ),
                rss_mb < RSS_TARGET_MB,
            ),
        ];
        let all_banned = ends.len() == sentinel.samples.len();
        for peer in self
            .results
            .iter()
            .filter(|results| results.guard != Guard::Sentinel)
        {
            let peer_ends = end_to_end_ms(peer);
            verdicts.push(verdict(
                &format!("end to end below {}'s", peer.guard.label()),
                &format!(
                    "median {:.1} vs {:.1} ms, max {:.1} vs {:.1} ms",
                    median(&ends),
                    median(&peer_ends),
                    maximum(&ends),
                    maximum(&peer_ends)
                ),
                all_banned
                    && median(&ends) < median(&peer_ends)
                    && maximum(&ends) < maximum(&peer_ends),
            ));
            if peer.guard == Guard::Sshguard {
                verdicts.push(verdict(
                    "no more CPU than sshguard",
                    &format!(
                        "{:.3} vs {:.3} CPU-s",
                        sentinel.cpu_seconds_per_attack, peer.cpu_seconds_per_attack
                    ),
                    sentinel.cpu_seconds_per_attack <= peer.cpu_seconds_per_attack,
                ));
            }
        }
        verdicts.join("; ")
    }

    fn write_flood_table(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let flood = self.flood;
        writeln!(
            f,
            "| Flood at Sentinel's detection input (max_tracked = max_banned = {BOUND}) | |"
        )?;
        writeln!(f, "|---|--:|")?;
        let rows = [
            (
                "failures fed / counted / lost".to_owned(),
                format!("{} / {} / {}", flood.fed, flood.counted, flood.lost),
            ),
            (
                format!("tracked addresses after the spray of {ADDRESSES} / evictions counted"),
                format!("{} / {}", flood.tracked_after_spray, flood.evictions),
            ),
            (
                format!("bans committed / refused as `ban_table_full` ({ADDRESSES} addresses)"),
                format!("{} / {}", flood.bans, flood.refused),
            ),
            (
                "elements in the kernel set afterwards".to_owned(),
                flood.elements.to_string(),
            ),
            (
                "bans committed per second (`nft monitor`)".to_owned(),
                format!("{:.0}", flood.bans_per_second),
            ),
            (
                "feeding the flood took / last ban committed after".to_owned(),
                format!(
                    "{:.2} s / {:.2} s",
                    flood.feed_time.as_secs_f64(),
                    flood.all_committed_after.as_secs_f64()
                ),
            ),
            (
                "daemon RSS: idle → after the spray → after the flood (peak)".to_owned(),
                format!(
                    "{:.1} → {:.1} → {:.1} MiB ({:.1} MiB)",
                    mebibytes(flood.rss_idle_kib),
                    mebibytes(flood.rss_after_spray_kib),
                    mebibytes(flood.rss_after_kib),
                    mebibytes(flood.hwm_kib)
                ),
            ),
            (
                "daemon CPU for both passes".to_owned(),
                format!("{:.2} s", flood.cpu_seconds),
            ),
        ];
        for (measure, value) in rows {
            writeln!(f, "| {measure} | {value} |")?;
        }
        Ok(())
    }
}

impl SshReport<'_> {
    fn write_preauth_table(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| Tool, key-only sshd | attackers banned | attempts until the ban (each attacker) \
             | banning attempt's end → first dropped probe, median / max | attacker's last log \
             line → ban element committed, median / max | CPU-s per attacker | attempts \
             counted by Sentinel |"
        )?;
        writeln!(f, "|---|--:|--:|--:|--:|--:|--:|")?;
        for results in self.preauth {
            let attempts: Vec<String> = results
                .samples
                .iter()
                .map(|sample| match (sample.banned_at, sample.time_to_drop) {
                    (None, _) => "none".to_owned(),
                    (Some(attempt), Some(_)) => attempt.to_string(),
                    (Some(attempt), None) => format!("{attempt} (during it)"),
                })
                .collect();
            writeln!(
                f,
                "| {} | {}/{} | {} | {} | {} | {:.3} | {} |",
                results.guard.label(),
                results.banned(),
                results.samples.len(),
                attempts.join(", "),
                median_and_max(&results.times_to_drop_ms(), 2),
                median_and_max(&results.lines_to_commit_ms(), 2),
                results.cpu_seconds_per_attack,
                results.counted.map_or_else(
                    || "—".to_owned(),
                    |counted| format!("{counted} of {}", results.attempts)
                ),
            )?;
        }
        for (guard, _) in self.preauth_unavailable {
            writeln!(
                f,
                "| {} | not run (see below) | — | — | — | — | — |",
                guard.label()
            )?;
        }
        Ok(())
    }

    fn write_preauth_notes(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "- Attackers that never reach a password: sshd with `PasswordAuthentication no` \
             (public keys only, PAM on); per tool {} attackers, each from a fresh address, one \
             connection at a time with `ssh -i` and a key the server does not know, \
             alternating the real account `nobody` and an unknown user name, until the address \
             is dropped or {MAX_ATTEMPTS} attempts were made (\"none\"). After each refused \
             attempt the address is probed for {SETTLE:?} before the next one. The same \
             thresholds as above: Sentinel bans at {MAX_FAILURES} failures with the default \
             `preauth_weight: 0.5` per connection that ends before authenticating, reading no \
             log; fail2ban at {MAX_FAILURES} matches of Debian's sshd filter (normal mode); \
             sshguard at a score of 50, from the same syslog-format copy of sshd's log.",
            self.preauth
                .first()
                .map_or(0, |results| results.samples.len())
        )?;
        writeln!(
            f,
            "- End: the attempt's client exited, refused (`Permission denied (publickey)`); \
             an attempt whose own connection the ban cut (\"during it\": a peer banned on a \
             line sshd logged before the attempt ended) has no end and is not in the median. Log \
             line → element: the last line sshd logged about the attacker before `nft \
             monitor` showed the ban's element, both stamped as read. CPU: the tool's cgroup \
             from the first attempt to the last, per attacker."
        )?;
        for (guard, reason) in self.preauth_unavailable {
            writeln!(
                f,
                "- {} could not be measured against the key-only sshd: {reason}",
                guard.label()
            )?;
        }
        Ok(())
    }
}

fn write_flood_notes(f: &mut Formatter<'_>) -> fmt::Result {
    writeln!(
        f,
        "- A real flood of SSH logins is impractical (each takes sshd seconds), so a program \
         named `sshd-flood` calls libpam the way sshd does (run as root and listed in this run's \
         `ssh_guard.sshd_paths`, as only sshd's executables are trusted), with a PAM service \
         that always fails: Sentinel's real uprobes, guard and firewall see {ADDRESSES} addresses fail once \
         each (the spray, which only fills the tracking table), then {ADDRESSES} others fail \
         twice each, the threshold of this run."
    )
}

/// Every attack's end-to-end time-to-ban, in milliseconds, of those that were banned.
impl SshReport<'_> {
    /// Sentinel's time-to-ban, CPU and memory over each peer's, and the raw figures.
    pub fn summarize(&self, summary: &mut Summary) {
        const SECTION: &str = "SSH brute force";
        let figures = |results: &AttackResults| {
            json!({
                "attacks_banned": end_to_end_ms(results).len(),
                "attacks": results.samples.len(),
                "time_to_ban_ms_median": median(&end_to_end_ms(results)),
                "commit_ms_median": median(&commits_ms(results)),
                "cpu_seconds_per_attack": results.cpu_seconds_per_attack,
                "rss_mib": mebibytes(results.rss_kib),
                "peak_rss_mib": mebibytes(results.hwm_kib),
            })
        };
        let mut raw = serde_json::Map::new();
        for results in self.results {
            raw.insert(results.guard.label().into(), figures(results));
        }
        let flood = self.flood;
        raw.insert(
            "flood".into(),
            json!({
                "fed": flood.fed,
                "counted": flood.counted,
                "lost": flood.lost,
                "bans": flood.bans,
                "refused": flood.refused,
                "bans_per_second": flood.bans_per_second,
                "peak_rss_mib": mebibytes(flood.hwm_kib),
                "cpu_seconds": flood.cpu_seconds,
            }),
        );
        let preauth = |results: &PreauthResults| {
            json!({
                "attackers_banned": results.banned(),
                "attackers": results.samples.len(),
                "attempts_to_ban": results.attempts_to_ban(),
                "attempt_end_to_drop_ms_median": median(&results.times_to_drop_ms()),
                "line_to_commit_ms_median": median(&results.lines_to_commit_ms()),
                "cpu_seconds_per_attack": results.cpu_seconds_per_attack,
                "cpu_seconds_per_attempt": results.cpu_seconds_per_attempt(),
                "attempts": results.attempts,
                "counted": results.counted,
            })
        };
        raw.insert(
            "key_only".into(),
            self.preauth
                .iter()
                .map(|results| (results.guard.label().to_owned(), preauth(results)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        );
        summary.record("ssh", raw.into());
        self.summarize_preauth(summary);
        let Some(ours) = self.sentinel() else {
            return;
        };
        for theirs in self.results.iter().filter(|r| r.guard != Guard::Sentinel) {
            let peer = theirs.guard.label();
            let compare =
                |summary: &mut Summary, measure, unit, value: fn(&AttackResults) -> f64| {
                    summary.compare(SECTION, measure, unit, value(ours), peer, value(theirs));
                };
            compare(summary, "time-to-ban end to end (median)", "ms", |r| {
                median(&end_to_end_ms(r))
            });
            compare(summary, "CPU per attack", "s", |r| r.cpu_seconds_per_attack);
            compare(summary, "peak RSS", "MiB", |r| mebibytes(r.hwm_kib));
        }
    }
}

impl SshReport<'_> {
    /// Attempts until the ban and CPU per attacker, Sentinel over each peer.
    fn summarize_preauth(&self, summary: &mut Summary) {
        const SECTION: &str = "SSH, key-only attackers";
        let Some(ours) = self
            .preauth
            .iter()
            .find(|results| results.guard == Guard::Sentinel)
        else {
            return;
        };
        for theirs in self.preauth.iter().filter(|r| r.guard != Guard::Sentinel) {
            let peer = theirs.guard.label();
            summary.compare(
                SECTION,
                format!("attempts until the ban (median; none if not banned in {MAX_ATTEMPTS})"),
                "attempts",
                median(&ours.attempts_to_ban()),
                peer,
                median(&theirs.attempts_to_ban()),
            );
            summary.compare(
                SECTION,
                "CPU per attacker",
                "s",
                ours.cpu_seconds_per_attack,
                peer,
                theirs.cpu_seconds_per_attack,
            );
            // Apart from how many attempts each lets an attacker make before the ban.
            summary.compare(
                SECTION,
                "CPU per attempt",
                "s",
                ours.cpu_seconds_per_attempt(),
                peer,
                theirs.cpu_seconds_per_attempt(),
            );
        }
    }
}

fn end_to_end_ms(results: &AttackResults) -> Vec<f64> {
    results
        .samples
        .iter()
        .filter_map(|sample| sample.time_to_ban)
        .map(|time| time.as_secs_f64() * 1e3)
        .collect()
}

fn commits_ms(results: &AttackResults) -> Vec<f64> {
    results
        .samples
        .iter()
        .filter_map(|sample| sample.commit_ms)
        .collect()
}

/// "12.3 / 40.1 ms", or "—" without values.
fn median_and_max(values: &[f64], decimals: usize) -> String {
    if values.is_empty() {
        return "—".to_owned();
    }
    format!(
        "{:.decimals$} / {:.decimals$} ms",
        median(values),
        maximum(values)
    )
}

/// NaN for no values, so that no comparison with it holds.
fn maximum(values: &[f64]) -> f64 {
    values.iter().copied().reduce(f64::max).unwrap_or(f64::NAN)
}

/// "commit max ≤ 5 ms: 0.90 ms, met"
fn verdict(target: &str, measured: &str, met: bool) -> String {
    format!(
        "{target}: {measured}, {}",
        if met { "met" } else { "NOT met" }
    )
}
