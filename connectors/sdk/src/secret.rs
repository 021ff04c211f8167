//! The one redaction rule for secrets in configs, logs and errors.
//!
//! Every connector's config holds credentials somewhere: a password field,
//! a URL with a password in its user info (`https://user:pw@host`), a
//! client property such as `sasl.password`. Each is shown through these
//! functions, so a `Debug` of any config, a log line or an error message
//! never carries one; `tests/operations.rs` puts a canary in every such
//! slot and searches the daemon's output for it.

/// What a redacted value shows.
pub const REDACTED: &str = "<redacted>";

/// The URL with the password of its user info replaced (the user name
/// stays: it helps to tell which credential is used). Anything that is not
/// `scheme://...` comes back unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a, Some(p)))
        .unwrap_or((rest, None));
    let redacted = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{REDACTED}@{host}"),
            None => format!("{REDACTED}@{host}"),
        },
        None => authority.to_string(),
    };
    match path {
        Some(p) => format!("{scheme}://{redacted}/{p}"),
        None => format!("{scheme}://{redacted}"),
    }
}

/// Whether a client property (librdkafka's, say) holds a secret by its
/// name: passwords, secrets, keys in PEM, JAAS configs, tokens.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.ends_with(".pem")
        || k.contains("jaas")
        || k.contains("token")
}

/// A secret string: its `Debug` and `Display` show [`REDACTED`].
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{REDACTED}\"")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords_only() {
        assert_eq!(
            redact_url("redis://:pw@h:6379/0"),
            "redis://:<redacted>@h:6379/0"
        );
        assert_eq!(
            redact_url("https://u:p%40ss@es:9200"),
            "https://u:<redacted>@es:9200"
        );
        assert_eq!(redact_url("https://token@es/x"), "https://<redacted>@es/x");
        assert_eq!(redact_url("http://es:9200"), "http://es:9200");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn secret_keys() {
        for k in [
            "sasl.password",
            "ssl.key.password",
            "sasl.oauthbearer.client.secret",
            "sasl.jaas.config",
            "ssl.key.pem",
            "sasl.oauthbearer.token",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in ["bootstrap.servers", "sasl.username", "security.protocol"] {
            assert!(!is_secret_key(k), "{k}");
        }
    }

    #[test]
    fn a_secret_never_prints() {
        let s = Secret::new("canary");
        assert!(!format!("{s:?} {s}").contains("canary"));
        assert_eq!(s.expose(), "canary");
    }
}
