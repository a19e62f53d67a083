//! Which Bitwarden servers a request may send its credentials to.
//!
//! Both the allowed entries and the URLs a request names are parsed as URLs and compared part by
//! part (scheme, host, port, and the path on segment boundaries); a URL with a user name,
//! password, query or fragment is refused outright. Requests to Bitwarden are built from the
//! parsed URL, never from the header's text.

use std::fmt;

/// A Bitwarden server's base URL, parsed and normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    https: bool,
    /// Lower-case, without a trailing dot; IPv6 addresses in brackets.
    host: String,
    port: u16,
    segments: Vec<String>,
}

impl UpstreamUrl {
    /// Parses a base URL, saying what is wrong with it (never quoting it: it may carry a
    /// password).
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let url = url::Url::parse(text.trim()).map_err(|_| "it is not a URL")?;
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            _ => return Err("its scheme is not https or http"),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err("it carries a user name or password");
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("it has a query or fragment");
        }
        let host = match url.host() {
            Some(url::Host::Domain(domain)) => domain.trim_end_matches('.').to_ascii_lowercase(),
            Some(url::Host::Ipv4(address)) => address.to_string(),
            Some(url::Host::Ipv6(address)) => format!("[{address}]"),
            None => return Err("it names no host"),
        };
        if host.is_empty() {
            return Err("it names no host");
        }
        let port = url
            .port_or_known_default()
            .ok_or("it names no port and its scheme has none")?;
        let mut segments: Vec<String> = url
            .path_segments()
            .ok_or("it has no path")?
            .map(str::to_owned)
            .collect();
        while segments.last().is_some_and(String::is_empty) {
            segments.pop();
        }
        Ok(Self {
            https,
            host,
            port,
            segments,
        })
    }

    /// Whether `other` is this server, at this path or below it.
    pub fn covers(&self, other: &Self) -> bool {
        self.https == other.https
            && self.host == other.host
            && self.port == other.port
            && other.segments.starts_with(&self.segments)
    }
}

/// The URL as requests are built from it: no trailing slash, the default port left out.
impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, default_port) = if self.https {
            ("https", 443)
        } else {
            ("http", 80)
        };
        write!(f, "{scheme}://{}", self.host)?;
        if self.port != default_port {
            write!(f, ":{}", self.port)?;
        }
        for segment in &self.segments {
            write!(f, "/{segment}")?;
        }
        Ok(())
    }
}

/// `ALLOWED_UPSTREAMS`, parsed.
#[derive(Clone, Debug)]
pub struct AllowList(Vec<UpstreamUrl>);

impl AllowList {
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        entries
            .iter()
            .map(|entry| entry.trim())
            .filter(|entry| !entry.is_empty())
            .enumerate()
            .map(|(number, entry)| {
                UpstreamUrl::parse(entry).map_err(|why| {
                    format!("ALLOWED_UPSTREAMS entry {} is refused: {why}", number + 1)
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn allows(&self, url: &UpstreamUrl) -> bool {
        self.0.iter().any(|allowed| allowed.covers(url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(&entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn only_what_the_list_names_is_allowed() {
        let cloud = list(&[
            "https://api.bitwarden.com",
            "https://identity.bitwarden.com",
        ]);
        let self_hosted = list(&[
            "https://127.0.0.1:3538/identity",
            "https://vault.home.arpa/api/",
        ]);
        // (allow list, URL a request names, allowed)
        let cases: &[(&AllowList, &str, bool)] = &[
            (&cloud, "https://identity.bitwarden.com", true),
            (&cloud, "https://identity.bitwarden.com/", true),
            (&cloud, "HTTPS://IDENTITY.BITWARDEN.COM", true),
            (&cloud, "https://identity.bitwarden.com.", true),
            (&cloud, "https://identity.bitwarden.com:443", true),
            (
                &cloud,
                "https://identity.bitwarden.com@127.0.0.1:8080/identity",
                false,
            ),
            (&cloud, "https://user:pass@identity.bitwarden.com", false),
            (&cloud, "https://identity.bitwarden.com.evil.invalid", false),
            (&cloud, "https://identity.bitwarden.com:1", false),
            (&cloud, "http://identity.bitwarden.com", false),
            (&cloud, "https://identity.bitwarden.com/?x=1", false),
            (&cloud, "https://identity.bitwarden.com/#x", false),
            (&cloud, "https://\u{456}dentity.bitwarden.com", false),
            (&cloud, "ftp://identity.bitwarden.com", false),
            (&self_hosted, "https://127.0.0.1:3538/identity", true),
            (&self_hosted, "https://127.0.0.1:3538/identity/", true),
            (&self_hosted, "https://127.0.0.1:35383/identity", false),
            (&self_hosted, "https://127.0.0.1:3538/identityx", false),
            (&self_hosted, "https://127.0.0.1:3538/", false),
            (
                &self_hosted,
                "https://127.0.0.1:3538/identity/../api",
                false,
            ),
            (&self_hosted, "https://vault.home.arpa/api", true),
            (&self_hosted, "https://vault.home.arpa/api/v2", true),
            (&self_hosted, "https://vault.home.arpa/apiv2", false),
        ];
        for (allowed, url, expected) in cases {
            let verdict = UpstreamUrl::parse(url).is_ok_and(|url| allowed.allows(&url));
            assert_eq!(verdict, *expected, "{url}");
        }
    }

    #[test]
    fn requests_are_built_from_the_parsed_url() {
        let url = UpstreamUrl::parse("HTTPS://Vault.Home.Arpa.:443/identity/").unwrap();
        assert_eq!(url.to_string(), "https://vault.home.arpa/identity");
        let url = UpstreamUrl::parse("http://[::1]:8080/api").unwrap();
        assert_eq!(url.to_string(), "http://[::1]:8080/api");
    }

    #[test]
    fn bad_entries_are_refused_at_start_without_quoting_them() {
        let error = AllowList::parse(&["https://user:TopSecret@x".to_owned()]).unwrap_err();
        assert!(
            error.contains("entry 1") && error.contains("user name or password"),
            "{error}"
        );
        assert!(!error.contains("TopSecret"));
        assert!(AllowList::parse(&["not a url".to_owned()]).is_err());
    }
}
