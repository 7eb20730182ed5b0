//! The configuration file's parser and the policy validator behind it: any text gives a
//! configuration or the problems with it, never a panic, a hang or unbounded memory.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sentinel_user::config::Config;

fuzz_target!(|data: &[u8]| {
    // The loader reads the file as UTF-8 text; other bytes never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(problems) = Config::parse("fuzz.yaml", text) {
        assert!(!problems.is_empty(), "a refused file must say why");
    }
});
