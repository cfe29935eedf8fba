//! Bounding text that comes from outside the host (guests, agents), at the
//! boundary where it enters.

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
/// (on a character boundary) followed by a marker saying it was cut and how
/// long it was, the whole at most `max` bytes plus the marker.
pub(crate) fn bound(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let len = text.len();
    let mut kept = truncate(&text, max).to_owned();
    kept.push_str(&format!("… [cut: {len} bytes in all]"));
    kept
}

#[cfg(test)]
mod tests {
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
        assert_eq!(bound("abcdef".into(), 4), "abcd… [cut: 6 bytes in all]");
        assert_eq!(bound("ééé".into(), 3), "é… [cut: 6 bytes in all]");
    }
}
