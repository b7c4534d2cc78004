//! Secrets kept out of errors and logs.
//!
//! Connection URLs carry passwords (`redis://user:password@host`), and Kafka
//! properties carry SASL and SSL secrets. Wherever thaw names a URL in an error
//! or a log line it goes through [`url`]; the settings' `Debug` output goes
//! through [`properties`], so even a settings dump at debug level shows none.

use std::collections::BTreeMap;

/// What a secret is shown as.
pub const MASK: &str = "***";

/// `url` with the password of its user info replaced by [`MASK`] (a user
/// info without `:` is masked whole: some schemes read it as the password).
/// A string without `scheme://` is not shown at all, since where its secret
/// sits cannot be told.
pub fn url(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return format!(
            "<{} characters, not shown: no scheme://>",
            url.chars().count()
        );
    };
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let user = match authority[..at].split_once(':') {
        Some((name, _)) => format!("{name}:{MASK}"),
        None => MASK.to_string(),
    };
    format!("{}{user}{}", &url[..start], &rest[at..])
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
            ("redis://a:p@ss:w@rd@r/1?x=@", "redis://a:***@r/1?x=@"),
        ] {
            assert_eq!(url(raw), shown);
            assert!(!url(raw).contains("hunter2") && !url(raw).contains("ss:w"));
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
