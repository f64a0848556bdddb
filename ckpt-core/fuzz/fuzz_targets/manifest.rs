//! `Manifest::decode` must never panic, and an accepted manifest must survive an encode/decode
//! round trip unchanged.
//!
//! Raw inputs almost never end in a matching `crc32c=` line, so each input is also tried with a
//! correct checksum line appended, which lets the fuzzer reach the JSON and validation checks.
#![no_main]

use ckpt_core::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fn check(bytes: &[u8]) {
    if let Ok(m) = Manifest::decode(bytes) {
        let again = Manifest::decode(&m.encode()).expect("an encoded manifest must decode");
        assert_eq!(m, again, "manifest changed in an encode/decode round trip");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut sealed = data.to_vec();
    let crc = crc32c::crc32c(&sealed);
    sealed.extend_from_slice(format!("crc32c={crc:08x}\n").as_bytes());
    check(&sealed);
});
