//! Secrets kept out of errors and logs.
//!
//! Connection URLs carry passwords (`redis://user:password@host`), and Kafka
//! properties carry SASL and SSL secrets. Wherever thaw names a URL in an error
//! or a log line it goes through [`url`]; the settings' `Debug` output goes
//! through [`properties`], so even a settings dump at debug level shows none.

use std::collections::BTreeMap;

/// What a secret is shown as.
pub const MASK: &str = "***";

/// `url` with its secrets replaced by [`MASK`]: the password of its user
/// info (a user info without `:` is masked whole: some schemes read it as
/// the password) and the value of a `pass`/`password` query parameter
/// (`redis+unix:///s.sock?pass=...`). The user info is taken up to the last
/// `@` of the whole string, so a password holding `/`, `?`, `#` or `@` is
/// masked too (a URL with an `@` later on is masked more than needed). A
/// string without `scheme://` is not shown at all: where its secret sits
/// cannot be told.
pub fn url(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return format!(
            "<{} characters, not shown: no scheme://>",
            url.chars().count()
        );
    };
    let (scheme, rest) = url.split_at(start);
    let rest = match rest.rfind('@') {
        None => rest.to_string(),
        Some(at) => {
            let user = match rest[..at].split_once(':') {
                Some((name, _)) if !name.contains(['/', '?', '#']) => format!("{name}:{MASK}"),
                _ => MASK.to_string(),
            };
            format!("{user}{}", &rest[at..])
        }
    };
    format!("{scheme}{}", mask_query(&rest))
}

/// `s` with the values of `pass` and `password` query parameters masked.
fn mask_query(s: &str) -> String {
    let Some((head, query)) = s.split_once('?') else {
        return s.to_string();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if ["pass", "password"].contains(&k.to_ascii_lowercase().as_str()) => {
                format!("{k}={MASK}")
            }
            _ => p.to_string(),
        })
        .collect();
    let mut out = format!("{head}?{}", params.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// Whether a configuration key names a secret (`sasl.password`,
/// `ssl.key.password`, `sasl.oauthbearer.client.secret`, a JAAS config ...).
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "token",
        "ssl.key.pem",
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// `props` with the values of secret keys replaced by [`MASK`].
pub fn properties(props: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    props
        .iter()
        .map(|(k, v)| {
            let v = if is_secret_key(k) { MASK } else { v.as_str() };
            (k.as_str(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_masked() {
        for (raw, shown) in [
            ("redis://:hunter2@r:6379/0", "redis://:***@r:6379/0"),
            ("rediss://app:hunter2@r:6380", "rediss://app:***@r:6380"),
            ("redis://hunter2@r", "redis://***@r"),
            ("redis://r:6379", "redis://r:6379"),
            ("redis://a:hunter2@x@r/1", "redis://a:***@r/1"),
            ("redis://:hun/ter2@r", "redis://:***@r"),
            ("redis://:hun#ter2@r", "redis://:***@r"),
            ("redis://:hun?ter2@r", "redis://:***@r"),
            (
                "redis+unix:///s.sock?db=1&pass=hunter2",
                "redis+unix:///s.sock?db=1&pass=***",
            ),
            (
                "redis://r/0?password=hunter2#x",
                "redis://r/0?password=***#x",
            ),
        ] {
            assert_eq!(url(raw), shown, "{raw}");
            for secret in ["hunter2", "ter2"] {
                assert!(!url(raw).contains(secret), "{raw}");
            }
        }
        let bad = url("hunter2@r:6379");
        assert!(!bad.contains("hunter2"), "{bad}");
    }

    #[test]
    fn secret_properties_are_masked() {
        let props: BTreeMap<String, String> = [
            ("sasl.password", "hunter2"),
            ("sasl.username", "app"),
            ("ssl.key.password", "hunter2"),
            ("sasl.oauthbearer.client.secret", "hunter2"),
            ("security.protocol", "SASL_SSL"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let shown = format!("{:?}", properties(&props));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("app") && shown.contains("SASL_SSL"));
    }
}
