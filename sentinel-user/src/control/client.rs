//! The command line's side of the control socket: one blocking request per command.

use std::{
    fmt::Write as _,
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{
    protocol::{Request, Response, to_line},
    report::{GuardReport, ReloadReport, StatsReport, StatusReport},
};
use crate::{
    Error,
    firewall::IpNet,
    policy::{enforcer::ServiceOutcome, parse_duration_setting},
    ssh_guard::{BanInfo, GuardMode, Unbanned},
};

/// Longer than the daemon gives the SSH guard, so that its "did not answer" arrives first.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `request` to the daemon listening at `path` and returns its answer.
pub fn request(path: &Path, request: &Request) -> Result<Response, Error> {
    let mut stream = UnixStream::connect(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => Error::DaemonUnreachable {
            path: path.to_owned(),
        },
        io::ErrorKind::PermissionDenied => Error::ControlPermissionDenied,
        _ => Error::ControlIo {
            path: path.to_owned(),
            source,
        },
    })?;
    let io_error = |source: io::Error| Error::ControlIo {
        path: path.to_owned(),
        source: match source.kind() {
            // What a socket timeout looks like.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {} s", ANSWER_TIMEOUT.as_secs()),
            ),
            _ => source,
        },
    };
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(ANSWER_TIMEOUT)))
        .map_err(io_error)?;
    // A daemon that refuses the connection (busy) answers and closes at once, maybe before the
    // request is written: its answer is read all the same.
    if let Err(error) = stream.write_all(&to_line(request))
        && !matches!(
            error.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        )
    {
        return Err(io_error(error));
    }
    let mut line = String::new();
    let read = BufReader::new(stream)
        .read_line(&mut line)
        .map_err(io_error)?;
    if read == 0 {
        return Err(Error::ControlProtocol(
            "it closed the connection without answering".into(),
        ));
    }
    serde_json::from_str(&line).map_err(|error| Error::ControlProtocol(error.to_string()))
}

/// The bans in force, as the daemon lists them.
pub fn ban_list(path: &Path) -> Result<Vec<BanInfo>, Error> {
    match request(path, &Request::Bans {})? {
        Response::Bans(bans) => Ok(bans),
        other => Err(unexpected(other)),
    }
}

/// `sentinel bans`: the bans in force as a table sorted by address.
pub fn bans(path: &Path) -> Result<String, Error> {
    ban_list(path).map(ban_table)
}

/// `sentinel status`.
pub fn status(path: &Path) -> Result<StatusReport, Error> {
    match request(path, &Request::Status {})? {
        Response::Status(status) => Ok(*status),
        other => Err(unexpected(other)),
    }
}

/// The figures behind `sentinel top`.
pub fn stats(path: &Path) -> Result<StatsReport, Error> {
    match request(path, &Request::Stats {})? {
        Response::Stats(stats) => Ok(*stats),
        other => Err(unexpected(other)),
    }
}

/// `sentinel reload`: the outcome, refused or not; an error only when it could not be asked.
pub fn reload(path: &Path) -> Result<ReloadReport, Error> {
    match request(path, &Request::Reload {})? {
        Response::Reloaded(report) => Ok(report),
        other => Err(unexpected(other)),
    }
}

/// `sentinel ban ADDRESS --for DURATION`.
pub fn ban(path: &Path, address: &str, duration: &str) -> Result<String, Error> {
    let address = parse_address(address)?;
    let duration = duration.trim();
    let parsed = parse_duration_setting(duration).map_err(Error::InvalidArgument)?;
    if parsed.is_zero() || parsed.subsec_nanos() != 0 {
        return Err(Error::InvalidArgument(format!(
            "{duration:?} is not a whole number of seconds, one or more"
        )));
    }
    let net = changed(request(
        path,
        &Request::Ban {
            address,
            for_seconds: parsed.as_secs(),
        },
    )?)?;
    Ok(format!("banned {net} for {duration}"))
}

/// `sentinel unban ADDRESS`.
pub fn unban(path: &Path, address: &str) -> Result<Unbanned, Error> {
    let address = parse_address(address)?;
    match request(path, &Request::Unban { address })? {
        Response::Changed(net) => Ok(Unbanned {
            net,
            fleet_override: None,
        }),
        Response::FleetOverride(unbanned) => Ok(unbanned),
        other => Err(unexpected(other)),
    }
}

/// What `sentinel unban` did, for people: a fleet ban is lifted on this host only.
pub fn unbanned_text(unbanned: &Unbanned) -> String {
    let net = unbanned.net;
    let Some(left) = unbanned.fleet_override else {
        return format!("unbanned {net}");
    };
    let single = net.prefix_len() == IpNet::from(net.network()).prefix_len();
    let option = if single { "--ip" } else { "--range" };
    format!(
        "unbanned {net} on this host only, for {}: a ban from the CrowdSec fleet, lifted here \
         until it would end; `cscli decisions delete {option} {net}` ends it for the whole fleet",
        format_duration(left)
    )
}

/// `sentinel release SERVICE`: what the daemon undid.
pub fn release(path: &Path, service: &str) -> Result<String, Error> {
    match request(
        path,
        &Request::Release {
            service: service.to_owned(),
        },
    )? {
        Response::Released(released) => Ok(released),
        other => Err(unexpected(other)),
    }
}

/// An address or a network; a network with host bits set is refused rather than guessed at.
fn parse_address(text: &str) -> Result<IpNet, Error> {
    let net: IpNet = text.parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "{text:?} is not an IP address or network; write it like 203.0.113.7, \
             203.0.113.0/24 or 2001:db8::/64"
        ))
    })?;
    match text.split_once('/') {
        Some((address, _)) if address.parse() != Ok(net.network()) => Err(Error::InvalidArgument(
            format!("{text:?} has host bits set; the network is {net}"),
        )),
        _ => Ok(net),
    }
}

fn changed(response: Response) -> Result<IpNet, Error> {
    match response {
        Response::Changed(net) => Ok(net),
        other => Err(unexpected(other)),
    }
}

/// The daemon's refusal, or an answer that does not fit the request.
fn unexpected(response: Response) -> Error {
    match response {
        Response::Error(message) => Error::ControlRejected(message),
        other => Error::ControlProtocol(format!("unexpected answer {other:?}")),
    }
}

fn ban_table(mut bans: Vec<BanInfo>) -> String {
    if bans.is_empty() {
        return "no bans in force".into();
    }
    // Numeric order: 10.0.0.2 before 10.0.0.10, IPv4 before IPv6.
    bans.sort_by_cached_key(|ban| (ban.address.parse::<IpNet>().ok(), ban.address.clone()));
    let header = ["ADDRESS", "REASON", "FAILURES", "EXPIRES"].map(String::from);
    let rows: Vec<[String; 4]> = std::iter::once(header)
        .chain(bans.into_iter().map(|ban| {
            [
                ban.address,
                ban.reason,
                ban.failures.to_string(),
                format!(
                    "in {}",
                    format_duration(Duration::from_secs(ban.expires_in_seconds))
                ),
            ]
        }))
        .collect();
    let widths: [usize; 4] =
        std::array::from_fn(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0));
    let mut table = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            write!(line, "{cell:<width$}  ").expect("writing to a String cannot fail");
        }
        table.push_str(line.trim_end());
        table.push('\n');
    }
    table.pop();
    table
}

/// `sentinel status` for people; the problems come last, where the eye lands.
pub fn status_text(status: &StatusReport) -> String {
    let mut text = format!(
        "sentinel {}, up {}\n",
        status.version,
        format_duration(Duration::from_secs(status.uptime_seconds))
    );
    let attached = status.probes.iter().filter(|probe| probe.attached).count();
    let _ = writeln!(
        text,
        "probes: {attached} of {} attached",
        status.probes.len()
    );
    for probe in &status.probes {
        match &probe.reason {
            None if probe.attached => {
                let _ = writeln!(text, "  {:<22} attached", probe.name);
            }
            reason => {
                let reason = reason.as_deref().unwrap_or("no reason given");
                let _ = writeln!(text, "  {:<22} NOT ATTACHED: {reason}", probe.name);
            }
        }
    }
    if status.policies.is_empty() {
        text.push_str("policies: none\n");
    } else {
        text.push_str("policies:\n");
    }
    for policy in &status.policies {
        let mode = serde_json::to_value(policy.mode).unwrap_or_default();
        let mode = mode.as_str().unwrap_or("?");
        if policy.services.is_empty() {
            let _ = writeln!(text, "  {} ({mode}): matches no service", policy.name);
            continue;
        }
        let _ = writeln!(text, "  {} ({mode}):", policy.name);
        for service in &policy.services {
            let state = match &service.outcome {
                ServiceOutcome::Enforcing => "enforcing".to_owned(),
                ServiceOutcome::Observing => "observing".to_owned(),
                ServiceOutcome::Refused { reason } => format!("REFUSED: {reason}"),
                ServiceOutcome::Failed { reason } => format!("FAILED: {reason}"),
            };
            let _ = writeln!(text, "    {:<40} {state}", service.service);
        }
    }
    let guard = match &status.ssh_guard {
        GuardReport::Disabled => "disabled".to_owned(),
        GuardReport::Running(guard) => format!(
            "{}, {} tracked {}, {} {} in force",
            match guard.mode {
                GuardMode::Enforce => "enforcing",
                GuardMode::Observe => "observing",
            },
            guard.tracked_addresses,
            plural(guard.tracked_addresses, "address", "addresses"),
            guard.bans_in_force,
            plural(guard.bans_in_force, "ban", "bans"),
        ),
        GuardReport::NotAnswering { reason } => format!("NOT ANSWERING: {reason}"),
    };
    let _ = writeln!(text, "ssh guard: {guard}");
    if status.containment.is_empty() {
        text.push_str("containment: no service is held\n");
    } else {
        text.push_str("containment (undo with `sentinel release SERVICE`):\n");
    }
    for held in &status.containment {
        let ran = match held.executable.as_str() {
            "" => String::new(),
            executable => format!(" after it ran {executable}"),
        };
        let _ = writeln!(
            text,
            "  {:<40} {} by policy {} since {}{ran}",
            held.service,
            if held.action == "freeze" {
                "FROZEN"
            } else {
                "ISOLATED"
            },
            held.policy,
            held.since,
        );
    }
    match &status.last_reload {
        None => text.push_str("last reload: none since the start\n"),
        Some(reload) => {
            let ago = SystemTime::now()
                .duration_since(UNIX_EPOCH + Duration::from_secs(reload.at_unix_seconds))
                .unwrap_or_default();
            let _ = writeln!(
                text,
                "last reload: {} ago ({}): {}",
                format_duration(ago),
                reload.trigger,
                reload_text(reload).replace('\n', "\n  ")
            );
        }
    }
    let problems = status.problems();
    if problems.is_empty() {
        text.push_str("everything Sentinel is asked to do works");
    } else {
        let _ = write!(
            text,
            "{} {}:",
            problems.len(),
            plural(problems.len() as u64, "problem", "problems")
        );
        for problem in problems {
            let _ = write!(text, "\n  - {problem}");
        }
    }
    text
}

/// A reload's outcome: what applies now, or why nothing changed.
pub fn reload_text(reload: &ReloadReport) -> String {
    if reload.ok {
        let policies = reload.policies.unwrap_or(0);
        let mut text = format!(
            "ok, {policies} {} in force",
            plural(policies as u64, "policy", "policies")
        );
        if !reload.restart_required.is_empty() {
            let _ = write!(
                text,
                "; changed settings that apply only after a restart: {}",
                reload.restart_required.join(", ")
            );
        }
        return text;
    }
    let mut text = "refused; the running configuration stays in force".to_owned();
    for problem in &reload.problems {
        let _ = write!(text, "\n{problem}");
    }
    if let Some(error) = &reload.error {
        let _ = write!(text, "\n{error}");
    }
    text
}

fn plural<'a>(count: u64, one: &'a str, many: &'a str) -> &'a str {
    if count == 1 { one } else { many }
}

/// The largest unit and the one below it, e.g. `9m 58s` or `1h`: enough to read at a glance.
pub fn format_duration(duration: Duration) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut rest = duration.as_secs();
    let Some(largest) = UNITS.iter().position(|&(size, _)| rest >= size) else {
        return "0s".into();
    };
    let mut parts = Vec::new();
    for &(size, suffix) in UNITS[largest..].iter().take(2) {
        let count = rest / size;
        rest %= size;
        if count > 0 {
            parts.push(format!("{count}{suffix}"));
        }
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban_info(address: &str, reason: &str, failures: u32, expires_in_seconds: u64) -> BanInfo {
        BanInfo {
            address: address.into(),
            reason: reason.into(),
            failures,
            expires_in_seconds,
        }
    }

    #[test]
    fn durations_show_two_units() {
        let text = |seconds| format_duration(Duration::from_secs(seconds));
        assert_eq!(text(0), "0s");
        assert_eq!(text(45), "45s");
        assert_eq!(text(598), "9m 58s");
        assert_eq!(text(3600), "1h");
        assert_eq!(text(3661), "1h 1m");
        assert_eq!(text(7 * 86_400), "7d");
        assert_eq!(text(86_400 + 59), "1d");
    }

    #[test]
    fn table_is_aligned_and_sorted_by_address() {
        let table = ban_table(vec![
            ban_info("2001:db8::/64", "ssh_failures", 5, 3600),
            ban_info("10.0.0.10", "ssh_repeat_offender", 12, 86_400),
            ban_info("10.0.0.2", "operator", 0, 598),
        ]);
        assert_eq!(
            table,
            "ADDRESS        REASON               FAILURES  EXPIRES\n\
             10.0.0.2       operator             0         in 9m 58s\n\
             10.0.0.10      ssh_repeat_offender  12        in 1d\n\
             2001:db8::/64  ssh_failures         5         in 1h"
        );
    }

    #[test]
    fn empty_table_says_so() {
        assert_eq!(ban_table(Vec::new()), "no bans in force");
    }

    #[test]
    fn bad_arguments_are_refused_before_connecting() {
        let nowhere = Path::new("/nonexistent/control.sock");
        let message = |result: Result<String, Error>| match result {
            Err(Error::InvalidArgument(message)) => message,
            other => panic!("expected an invalid argument, got {other:?}"),
        };
        assert_eq!(
            message(unban(nowhere, "1.2.3").map(|unbanned| unbanned_text(&unbanned))),
            "\"1.2.3\" is not an IP address or network; write it like 203.0.113.7, \
             203.0.113.0/24 or 2001:db8::/64"
        );
        assert!(message(ban(nowhere, "1.2.3.4/33", "1h")).contains("not an IP address"));
        assert_eq!(
            message(ban(nowhere, "203.0.113.7/24", "1h")),
            "\"203.0.113.7/24\" has host bits set; the network is 203.0.113.0/24"
        );
        assert!(message(ban(nowhere, "1.2.3.4", "soon")).contains("is not a duration"));
        for too_fine in ["0s", "1500ms"] {
            assert_eq!(
                message(ban(nowhere, "1.2.3.4", too_fine)),
                format!("{too_fine:?} is not a whole number of seconds, one or more")
            );
        }
    }

    #[test]
    fn missing_daemon_is_explained() {
        let error = bans(Path::new("/nonexistent/control.sock")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot reach the sentinel daemon at /nonexistent/control.sock: is it running? \
             (start it with `sentinel run`)"
        );
    }
}
