//! The control socket's messages: request lines as the daemon decodes them (bytes), response
//! lines as the client does (text). Whatever decodes must encode and decode to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sentinel_user::control::{Request, Response};

fuzz_target!(|line: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<Request>(line) {
        let encoded = serde_json::to_vec(&request).expect("a request always encodes");
        let decoded = serde_json::from_slice::<Request>(&encoded);
        assert_eq!(decoded.ok(), Some(request));
    }
    let Ok(text) = std::str::from_utf8(line) else {
        return;
    };
    if let Ok(response) = serde_json::from_str::<Response>(text) {
        let encoded = serde_json::to_string(&response).expect("a response always encodes");
        let decoded = serde_json::from_str::<Response>(&encoded);
        assert_eq!(decoded.ok(), Some(response));
    }
});
