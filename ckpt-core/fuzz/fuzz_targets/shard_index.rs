//! `ShardIndex::decode` must never panic, and an accepted index must survive an encode/decode
//! round trip unchanged.
#![no_main]

use ckpt_core::format::ShardIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(idx) = ShardIndex::decode(data) {
        let again = ShardIndex::decode(&idx.encode()).expect("an encoded index must decode");
        assert_eq!(idx, again, "index changed in an encode/decode round trip");
    }
});
