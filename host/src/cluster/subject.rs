//! Names in NATS subjects, bucket names and keys: a name made only of
//! letters, digits, `-` and `_` is used as it is; any other is written as
//! `=` and its bytes in hex, so that no name can add a subject level (`.`)
//! or a wildcard (`*`, `>`).

use super::ClusterNames;

/// `name` as one token of a subject or key.
pub fn token(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        name.to_owned()
    } else {
        let mut out = String::with_capacity(1 + 2 * name.len());
        out.push('=');
        for b in name.bytes() {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

/// The subject of calls to the agent at `path` (`root/unit/...`):
/// `<prefix>.<unit>[.<segment>...]`; `None` unless `path` is below the
/// root.
pub fn call_subject(names: &ClusterNames, path: &str) -> Option<String> {
    let rest = path.strip_prefix(&names.root)?.strip_prefix('/')?;
    if rest.is_empty() || rest.split('/').any(str::is_empty) {
        return None;
    }
    let mut subject = names.calls.clone();
    for segment in rest.split('/') {
        subject.push('.');
        subject.push_str(&token(segment));
    }
    Some(subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_stay_and_others_cannot_add_levels() {
        assert_eq!(token("counter-1_a"), "counter-1_a");
        assert_eq!(token("a.b"), "=612e62");
        assert_eq!(token("*"), "=2a");
        assert_eq!(token(">"), "=3e");
        assert_eq!(token(""), "=");
    }

    #[test]
    fn a_path_becomes_one_token_per_segment_below_the_root() {
        let names = ClusterNames::of("root");
        assert_eq!(
            call_subject(&names, "root/team/a.b").as_deref(),
            Some("ah.root.call.team.=612e62")
        );
        assert_eq!(call_subject(&names, "root"), None);
        assert_eq!(call_subject(&names, "other/x"), None);
        assert_eq!(call_subject(&names, "root//x"), None);
        assert_eq!(call_subject(&names, "rooted/x"), None);
    }
}
