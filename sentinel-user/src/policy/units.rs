//! Sizes, CPU shares and durations as operators write them.

use std::time::Duration;

use super::model::CpuQuota;
use crate::yaml::{Invalid, TOO_LARGE, parse_duration, parse_whole};

const ZERO: Invalid = Invalid::Because("must be greater than zero");

/// Size suffixes and their powers of two: 1024-based, like the kernel and systemd.
const SIZE_UNITS: [(u8, u32); 6] = [
    (b'K', 10),
    (b'M', 20),
    (b'G', 30),
    (b'T', 40),
    (b'P', 50),
    (b'E', 60),
];

/// The kernel refuses a CPU quota below 1 ms per period (`min_cfs_quota_period`).
const MIN_CPU_QUOTA_MICROS: u64 = 1_000;
/// The kernel refuses a CPU quota above 2^44 - 1 µs (`max_cfs_runtime`).
const MAX_CPU_QUOTA_MICROS: u64 = (1 << 44) - 1;

/// `512M`, `2G`, `4096`: bytes, with an optional K, M, G, T, P or E suffix in either case.
pub(super) fn parse_size(text: &str) -> Result<u64, Invalid> {
    let last = text.bytes().last().map(|byte| byte.to_ascii_uppercase());
    let (number, shift) = match SIZE_UNITS.iter().find(|(unit, _)| Some(*unit) == last) {
        // The suffix is one ASCII byte, so cutting it off stays on a character boundary.
        Some(&(_, shift)) => (&text[..text.len() - 1], shift),
        None => (text, 0),
    };
    match parse_whole(number)?.checked_mul(1 << shift) {
        None => Err(TOO_LARGE),
        Some(0) => Err(ZERO),
        Some(bytes) => Ok(bytes),
    }
}

/// `512M` for 536870912: the largest suffix that divides the size exactly.
pub(super) fn format_size(bytes: u64) -> String {
    SIZE_UNITS
        .iter()
        .rev()
        .find(|&&(_, shift)| bytes >= 1 << shift && bytes.is_multiple_of(1 << shift))
        .map_or_else(
            || bytes.to_string(),
            |&(unit, shift)| format!("{}{}", bytes >> shift, char::from(unit)),
        )
}

/// `50%` or `0.5` is half a CPU, `2` two CPUs.
pub(super) fn parse_cpu_quota(text: &str) -> Result<CpuQuota, Invalid> {
    let (number, micros_per_unit) = match text.strip_suffix('%') {
        Some(percent) => (percent, CpuQuota::PERIOD_MICROS / 100),
        None => (text, CpuQuota::PERIOD_MICROS),
    };
    match scaled_decimal(number, micros_per_unit)? {
        micros if micros < MIN_CPU_QUOTA_MICROS => Err(Invalid::Because(
            "must be at least 1% of a CPU, the kernel's minimum",
        )),
        micros if micros > MAX_CPU_QUOTA_MICROS => {
            Err(Invalid::Because("is above the kernel's maximum"))
        }
        micros => Ok(CpuQuota { micros }),
    }
}

/// `text` (digits, optionally with up to nine decimals) times `scale`, rounded to the
/// nearest whole number; exact, where floating point would turn 0.29 CPUs into 28999 µs.
fn scaled_decimal(text: &str, scale: u64) -> Result<u64, Invalid> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let whole = parse_whole(whole)?;
    if fraction.len() > 9 || !fraction.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(Invalid::Unrecognized);
    }
    let numerator = u128::from(fraction.parse::<u64>().unwrap_or(0));
    let denominator = 10_u128.pow(fraction.len() as u32);
    let scaled = u128::from(whole) * u128::from(scale)
        + (numerator * u128::from(scale) + denominator / 2) / denominator;
    u64::try_from(scaled).map_err(|_| TOO_LARGE)
}

/// A duration given on the command line (`sentinel ban --for`), with a readable reason.
pub(crate) fn parse_duration_setting(text: &str) -> Result<Duration, String> {
    parse_duration(text.trim()).map_err(|invalid| match invalid {
        Invalid::Because(reason) => format!("{text:?} {reason}"),
        Invalid::Unrecognized => {
            format!("{text:?} is not a duration; write it like 30s, 10m, 4h, 7d or 1w")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
        assert_eq!(parse_size("16E"), Err(TOO_LARGE));
        assert_eq!(parse_size("18446744073709551616"), Err(TOO_LARGE));
        assert_eq!(parse_size("0M"), Err(ZERO));
        assert_eq!(
            parse_size("-1G"),
            Err(Invalid::Because("must not be negative"))
        );
        for bad in ["", "M", "1.5G", "512MB", "512 M", "1e9", "max"] {
            assert_eq!(parse_size(bad), Err(Invalid::Unrecognized), "{bad}");
        }
    }

    #[test]
    fn sizes_format_with_the_largest_exact_suffix() {
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(1536 << 20), "1536M");
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
    }

    #[test]
    fn cpu_shares_become_microseconds_per_period() {
        let micros = |text| parse_cpu_quota(text).map(|quota| quota.micros);
        assert_eq!(micros("50%"), Ok(50_000));
        assert_eq!(micros("1.5"), Ok(150_000));
        assert_eq!(micros("2"), Ok(200_000));
        assert_eq!(micros("250%"), Ok(250_000));
        assert_eq!(micros("12.5%"), Ok(12_500));
        assert_eq!(micros("0.29"), Ok(29_000));
        assert_eq!(micros("0.333333"), Ok(33_333));
        assert_eq!(micros("1%"), Ok(1_000));
        assert!(matches!(micros("0.9%"), Err(Invalid::Because(_))));
        assert!(matches!(micros("0"), Err(Invalid::Because(_))));
        assert!(matches!(micros("200000000"), Err(Invalid::Because(_))));
        assert_eq!(micros("-1"), Err(Invalid::Because("must not be negative")));
        for bad in ["", "%", "half", "1.5.0", ".5", "50 %", "1e3"] {
            assert_eq!(micros(bad), Err(Invalid::Unrecognized), "{bad}");
        }
    }
}
