//! The decoder of ring buffer records: the eBPF programs write them, but a record of any size
//! and content must decode to an event or to nothing.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sentinel_user::events::decode;

fuzz_target!(|record: &[u8]| {
    let event = decode(record);
    // Every record starts with its 4-byte kind.
    assert!(record.len() >= 4 || event.is_none());
});
