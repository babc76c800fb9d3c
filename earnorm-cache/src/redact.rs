//! Removing credentials from Redis URLs before they reach logs, errors or `Debug`.

/// Returns `url` with the password (and a lone username-as-password) replaced
/// by `***`. Anything that does not look like `scheme://userinfo@host` is
/// returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let redacted_userinfo = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        // `redis://secret@host` passes `secret` as the password.
        None => "***".to_owned(),
    };
    format!("{}{}@{}", &url[..scheme_end + 3], redacted_userinfo, &rest[at + 1..])
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn hides_passwords() {
        assert_eq!(
            redact_url("redis://:hunter2@localhost:6379/0"),
            "redis://:***@localhost:6379/0"
        );
        assert_eq!(redact_url("redis://app:hunter2@h/1"), "redis://app:***@h/1");
        assert_eq!(redact_url("rediss://hunter2@h"), "rediss://***@h");
        assert_eq!(redact_url("redis://a:p@ss@h:1"), "redis://a:***@h:1");
        assert_eq!(redact_url("redis://localhost:6379"), "redis://localhost:6379");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
