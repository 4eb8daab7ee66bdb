//! What the property tests of every crate share (feature `testing`): a bounded config
//! that writes no failure-persistence files, and the generators of hostile input.

use proptest::prelude::*;
use proptest::sample::Index;

/// `cases` cases, no failure-persistence files in the repository.
pub fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// C0 (NUL included), DEL or C1.
pub fn control_char() -> impl Strategy<Value = char> {
    prop_oneof![0u32..0x20, Just(0x7f), 0x80u32..0xa0].prop_map(|c| char::from_u32(c).unwrap())
}

/// `s` with `c` inserted at a char boundary.
pub fn insert(s: &str, at: Index, c: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let i = at.index(chars.len() + 1);
    let mut out: String = chars[..i].iter().collect();
    out.push_str(c);
    out.extend(&chars[i..]);
    out
}

/// One safe path component (letters, digits, `_`, `-`, `.` not first).
pub fn component() -> impl Strategy<Value = String> {
    "[a-z0-9_-][a-z0-9_.-]{0,7}"
}
