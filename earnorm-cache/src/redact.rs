//! Removing credentials from Redis URLs before they reach logs, errors or `Debug`.

/// Returns `url` with its password replaced by `***`: the userinfo up to the
/// last `@` (passwords may contain `/`, `?`, `#` or `@`), keeping the user
/// name, and the values of `pass`/`password` query parameters (as in
/// `redis+unix:///run/redis.sock?pass=...`). When in doubt it redacts more,
/// never less. Anything without `://` is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let start = scheme_end + 3;
    let rest = &url[start..];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..start]);
    let tail = match rest.rfind('@') {
        Some(at) => {
            match rest[..at].find(':') {
                Some(colon) => {
                    out.push_str(&rest[..colon]);
                    out.push_str(":***@");
                }
                // `redis://secret@host` passes `secret` as the password.
                None => out.push_str("***@"),
            }
            &rest[at + 1..]
        }
        None => rest,
    };
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("pass") || name.eq_ignore_ascii_case("password") => {
                        format!("{name}=***")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(tail),
    }
    out
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
        assert_eq!(redact_url("redis://:ab/cd?e#f@h:6379"), "redis://:***@h:6379");
        assert_eq!(
            redact_url("mongodb://u:x/y@h1,h2/db?replicaSet=rs"),
            "mongodb://u:***@h1,h2/db?replicaSet=rs"
        );
        assert_eq!(
            redact_url("redis+unix:///run/r.sock?db=1&pass=s3cret"),
            "redis+unix:///run/r.sock?db=1&pass=***"
        );
        assert_eq!(redact_url("redis://localhost:6379"), "redis://localhost:6379");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
