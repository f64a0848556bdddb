//! `Trailer::decode` must never panic, and an accepted trailer must survive an encode/decode
//! round trip.
//!
//! Raw inputs rarely carry a valid trailer checksum, so each input is also tried with its first 40
//! bytes sealed (correct crc32c and end magic), which lets the fuzzer reach the field checks.
#![no_main]

use ckpt_core::format::{TRAILER_LEN, Trailer};
use libfuzzer_sys::fuzz_target;

fn check(bytes: &[u8]) {
    if let Ok(t) = Trailer::decode(bytes) {
        let again = Trailer::decode(&t.encode()).expect("an encoded trailer must decode");
        assert_eq!(t, again, "trailer changed in an encode/decode round trip");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 40 {
        let mut sealed = [0u8; TRAILER_LEN];
        sealed[..40].copy_from_slice(&data[..40]);
        let crc = crc32c::crc32c(&sealed[..40]);
        sealed[40..44].copy_from_slice(&crc.to_le_bytes());
        sealed[44..48].copy_from_slice(b"SHRD");
        check(&sealed);
    }
});
