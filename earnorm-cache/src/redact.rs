//! Removing credentials from connection URLs (Redis and MongoDB) before they
//! reach logs, errors or `Debug`. When in doubt, it redacts.

/// Query options whose values are shown: settings, never secrets. Every
/// other option's value (`pass`, `password`, `proxyPassword`,
/// `tlsCertificateKeyFilePassword`, `authMechanismProperties`, and any
/// option this list does not know) is replaced by `***`. Compared in lower
/// case, after percent-decoding.
const SHOWN_OPTIONS: &[&str] = &[
    "db",
    "protocol",
    "replicaset",
    "authsource",
    "authmechanism",
    "tls",
    "ssl",
    "tlsinsecure",
    "tlsallowinvalidcertificates",
    "tlsallowinvalidhostnames",
    "tlscafile",
    "tlscertificatekeyfile",
    "directconnection",
    "loadbalanced",
    "appname",
    "compressors",
    "zlibcompressionlevel",
    "w",
    "wtimeoutms",
    "journal",
    "retrywrites",
    "retryreads",
    "readpreference",
    "readpreferencetags",
    "readconcernlevel",
    "maxstalenessseconds",
    "maxpoolsize",
    "minpoolsize",
    "maxconnecting",
    "maxidletimems",
    "waitqueuetimeoutms",
    "connecttimeoutms",
    "sockettimeoutms",
    "serverselectiontimeoutms",
    "heartbeatfrequencyms",
    "localthresholdms",
    "timeoutms",
    "srvmaxhosts",
    "srvservicename",
    "uuidrepresentation",
    "proxyhost",
    "proxyport",
];

/// Returns `url` with its credentials replaced by `***`:
///
/// * the password in the userinfo (everything up to the last `@` of the
///   URL, since passwords may contain `/`, `?`, `#` or `@`), keeping the
///   user name; a userinfo without `:` is redacted whole (`redis://secret@h`
///   passes `secret` as the password);
/// * the value of every query option not known to be a harmless setting
///   (option names are percent-decoded first, so `pa%73s` is `pass`);
/// * an authority without `@` whose port is not a number (`redis://:pw`):
///   it is replaced whole;
/// * anything without `://` (it is not a URL this can take apart): only a
///   scheme-like start is kept (`redis:/:pw@h` becomes `redis:***`).
pub fn redact_url(url: &str) -> String {
    if url.is_empty() {
        return String::new();
    }
    let Some(scheme_end) = url.find("://") else {
        return match url.split_once(':') {
            Some((scheme, _)) if is_scheme(scheme) => format!("{scheme}:***"),
            _ => "***".to_owned(),
        };
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
                None => out.push_str("***@"),
            }
            &rest[at + 1..]
        }
        None => rest,
    };
    let (before_fragment, fragment) = match tail.split_once('#') {
        Some((before, fragment)) => (before, Some(fragment)),
        None => (tail, None),
    };
    let (path, query) = match before_fragment.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (before_fragment, None),
    };
    let authority_end = path.find('/').unwrap_or(path.len());
    if authority_is_plain(&path[..authority_end]) {
        out.push_str(path);
    } else {
        out.push_str("***");
        out.push_str(&path[authority_end..]);
    }
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query.split('&').map(redact_param).collect();
        out.push_str(&params.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(if fragment == "insecure" { fragment } else { "***" });
    }
    out
}

/// Whether `text` looks like a URL scheme (`redis`, `mongodb+srv`, ...).
fn is_scheme(text: &str) -> bool {
    text.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Whether a host list (`h1:27017,h2`, `[::1]:6379`) holds nothing but
/// hosts and numeric ports.
fn authority_is_plain(authority: &str) -> bool {
    authority.split(',').all(|host| {
        let port = match host.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((_, after)) => after.strip_prefix(':'),
                None => return false,
            },
            None => host.split_once(':').map(|(_, port)| port),
        };
        port.is_none_or(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// One `name=value` query option, its value redacted unless harmless.
fn redact_param(param: &str) -> String {
    match param.split_once('=') {
        Some((name, _)) if !SHOWN_OPTIONS.contains(&percent_decode(name).to_ascii_lowercase().as_str()) => {
            format!("{name}=***")
        }
        Some(_) => param.to_owned(),
        // A bare word could be a secret written without a name.
        None if param.is_empty() => String::new(),
        None => "***".to_owned(),
    }
}

/// `%XX` sequences decoded (invalid ones kept as they are).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
        assert_eq!(redact_url("rediss://h:6380/0#insecure"), "rediss://h:6380/0#insecure");
        assert_eq!(redact_url("redis://[::1]:6379/0"), "redis://[::1]:6379/0");
    }

    #[test]
    fn when_in_doubt_it_redacts() {
        for (url, secret) in [
            ("redis+unix:///r.sock?pa%73s=SECRET", "SECRET"),
            ("redis+unix:///r.sock?PASSWORD=SECRET", "SECRET"),
            ("redis:/:SECRET@h", "SECRET"),
            ("redis://:SECRET", "SECRET"),
            ("redis://h:SECRET/0", "SECRET"),
            ("SECRET", "SECRET"),
            ("mongodb://h/?proxyPassword=SECRET", "SECRET"),
            ("mongodb://h/?tlsCertificateKeyFilePassword=SECRET", "SECRET"),
            (
                "mongodb://h/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:SECRET",
                "SECRET",
            ),
            ("mongodb://h/?someFutureOption=SECRET", "SECRET"),
            ("mongodb://h/db?SECRET", "SECRET"),
            ("rediss://h/0#SECRET", "SECRET"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} became {shown}");
            assert!(shown.contains("***"), "{url} became {shown}");
        }
        assert_eq!(redact_url("redis:/:SECRET@h"), "redis:***");
        assert_eq!(redact_url("redis://:SECRET"), "redis://***");
        assert_eq!(
            redact_url("mongodb://h/?authSource=admin&replicaSet=rs&tls=true"),
            "mongodb://h/?authSource=admin&replicaSet=rs&tls=true"
        );
    }
}
