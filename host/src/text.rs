//! Text helpers: bounding text that comes from outside the host (guests,
//! agents) at the boundary where it enters, and a stable content hash.

/// `s` cut to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `text` itself if it has at most `max` bytes; otherwise its first bytes
/// (cut on a character boundary) followed by a marker saying that it was cut
/// and how long it was, the whole at most `max` bytes (the marker alone if
/// `max` is smaller than it). Bounding bounded text changes nothing.
pub(crate) fn bound(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let marker = format!("… [cut: {} bytes in all]", text.len());
    let mut kept = truncate(&text, max.saturating_sub(marker.len())).to_owned();
    kept.push_str(&marker);
    kept
}

/// 64-bit FNV-1a: small, and stable across builds, Rust versions and hosts
/// (what it names is kept on disk and shown to users).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv1a_is_the_reference_function() {
        // Test vectors of the FNV reference implementation.
        assert_eq!(super::fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn bound_keeps_short_text_and_marks_cut_text() {
        assert_eq!(bound("short".into(), 5), "short");
        let marker = "… [cut: 40 bytes in all]";
        let cut = bound("a".repeat(40), 30);
        assert_eq!(cut, format!("{}{marker}", "a".repeat(30 - marker.len())));
        assert_eq!(cut.len(), 30);
        assert_eq!(bound(cut.clone(), 30), cut, "idempotent");
        // Cut on a character boundary: 3 bytes of room hold one `é`.
        let cut = bound("é".repeat(20), marker.len() + 3);
        assert_eq!(cut, format!("é{marker}"));
        assert_eq!(bound("abcdef".into(), 2), "… [cut: 6 bytes in all]");
    }
}
