//! Connection URLs naming several hosts, read as libpq reads them.
//!
//! libpq accepts `postgres://h1:5432,h2:5433/db?target_session_attrs=read-write`
//! (and the same lists as `host=h1,h2&port=5432,5433` query parameters) and
//! tries the hosts in order until one gives a session of the wanted kind;
//! sqlx parses one host only. This module splits such a URL into one
//! single-host URL per host, which sqlx parses as usual, and the
//! `target_session_attrs` that decides which host fits.
//!
//! The rules, as libpq documents them: hosts are comma-separated in the URL's
//! host part, each with an optional port (`[v6]:port` for IPv6); a `host`
//! query parameter replaces that list and a `port` parameter its ports; a
//! port list holds one port per host, or a single port that applies to every
//! host; an empty entry means the default. A URL with one host and no
//! `target_session_attrs` (or `any`) is passed to sqlx unchanged.

use std::fmt;

/// libpq's `target_session_attrs`: which session a connection must give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionAttrs {
    /// Any session (the default).
    Any,
    /// One that accepts writes by default (`transaction_read_only` off).
    ReadWrite,
    /// One that refuses writes by default (`transaction_read_only` on).
    ReadOnly,
    /// A server not in recovery (`pg_is_in_recovery()` false).
    Primary,
    /// A server in recovery (a hot standby).
    Standby,
    /// A standby if one of the hosts is, else any.
    PreferStandby,
}

impl SessionAttrs {
    const NAMES: [(&'static str, SessionAttrs); 6] = [
        ("any", SessionAttrs::Any),
        ("read-write", SessionAttrs::ReadWrite),
        ("read-only", SessionAttrs::ReadOnly),
        ("primary", SessionAttrs::Primary),
        ("standby", SessionAttrs::Standby),
        ("prefer-standby", SessionAttrs::PreferStandby),
    ];

    fn parse(value: &str) -> Result<Self, String> {
        Self::NAMES
            .iter()
            .find(|(name, _)| *name == value)
            .map(|(_, attrs)| *attrs)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::NAMES.iter().map(|(name, _)| *name).collect();
                format!(
                    "target_session_attrs={value:?} is not one of {}",
                    names.join(", ")
                )
            })
    }

    /// The name libpq gives it.
    pub(crate) fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, attrs)| *attrs == self)
            .map_or("any", |(name, _)| name)
    }
}

impl fmt::Display for SessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One host of the list, as written (an IPv6 address keeps its brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Host {
    pub(crate) host: String,
    pub(crate) port: Option<u16>,
}

/// As a URL's host part writes it: a Unix socket directory (`host=/run/pg`)
/// percent-encoded, as libpq and sqlx read it there.
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match self.host.starts_with('/') {
            true => self.host.replace('/', "%2F"),
            false => self.host.clone(),
        };
        match self.port {
            Some(port) => write!(f, "{host}:{port}"),
            None => f.write_str(&host),
        }
    }
}

/// A connection URL split by host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostList {
    /// `postgres` or `postgresql`.
    scheme: String,
    /// The user info (`user` or `user:password`, percent-encoded), if any.
    userinfo: Option<String>,
    /// The path (the database), as written.
    path: String,
    /// The query parameters other than the ones this module reads.
    query: Vec<(String, String)>,
    pub(crate) hosts: Vec<Host>,
    pub(crate) attrs: SessionAttrs,
    /// The URL as given, used as it is when it names one host and no
    /// parameter this module reads.
    original: String,
    /// Whether the URL holds `host`, `port` or `target_session_attrs`
    /// parameters, which sqlx must not see.
    reads_parameters: bool,
}

impl HostList {
    /// Splits `url`. `Err` says what is wrong with it (never echoing the
    /// password).
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        let scheme_end = url
            .find("://")
            .ok_or("a connection URL starts with postgres:// or postgresql://")?;
        let scheme = &url[..scheme_end];
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(format!(
                "a connection URL starts with postgres:// or postgresql://, not {scheme}://"
            ));
        }
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, after) = rest.split_at(authority_end);
        let (userinfo, host_part) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (before_fragment, _fragment) = after.split_once('#').unwrap_or((after, ""));
        let (path, query_text) = before_fragment
            .split_once('?')
            .unwrap_or((before_fragment, ""));

        let mut hosts = split_host_part(host_part)?;
        let mut query = Vec::new();
        let mut host_param = None;
        let mut port_param = None;
        let mut attrs = SessionAttrs::Any;
        let mut reads_parameters = false;
        for (key, value) in url::form_urlencoded::parse(query_text.as_bytes()) {
            reads_parameters |= matches!(key.as_ref(), "host" | "port" | "target_session_attrs");
            match key.as_ref() {
                "host" => host_param = Some(value.into_owned()),
                "port" => port_param = Some(value.into_owned()),
                "target_session_attrs" => attrs = SessionAttrs::parse(&value)?,
                "hostaddr" if value.contains(',') => {
                    return Err(
                        "hostaddr lists are not supported; list the hosts in the URL or in host="
                            .to_owned(),
                    );
                }
                _ => query.push((key.into_owned(), value.into_owned())),
            }
        }
        if let Some(list) = host_param {
            hosts = list
                .split(',')
                .map(|host| Host {
                    host: host.trim().to_owned(),
                    port: None,
                })
                .collect();
        }
        if let Some(list) = port_param {
            let ports: Vec<Option<u16>> = list
                .split(',')
                .map(|port| parse_port(port.trim()))
                .collect::<Result<_, _>>()?;
            match ports.len() {
                1 => hosts.iter_mut().for_each(|host| host.port = ports[0]),
                n if n == hosts.len() => {
                    for (host, port) in hosts.iter_mut().zip(ports) {
                        host.port = port;
                    }
                }
                n => {
                    return Err(format!(
                        "port= lists {n} ports for {} hosts; give one port per host, or one for all",
                        hosts.len()
                    ));
                }
            }
        }
        Ok(HostList {
            scheme: scheme.to_owned(),
            userinfo: userinfo.map(str::to_owned),
            path: path.to_owned(),
            query,
            hosts,
            attrs,
            original: url.to_owned(),
            reads_parameters,
        })
    }

    /// Whether the URL needs choosing a host: more than one, or a session
    /// requirement to check. Otherwise connecting is exactly as before.
    pub(crate) fn needs_choosing(&self) -> bool {
        self.hosts.len() > 1 || self.attrs != SessionAttrs::Any
    }

    /// The URL of host `index` alone, for sqlx's parser: the URL as given
    /// when it names one host and no parameter read here.
    pub(crate) fn url_for(&self, index: usize) -> String {
        if self.hosts.len() == 1 && !self.reads_parameters {
            return self.original.clone();
        }
        self.render(
            self.userinfo.as_deref(),
            &self.hosts[index].to_string(),
            self.query.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// The whole URL, every host listed, with each password replaced by
    /// `***`: for messages.
    pub(crate) fn redacted(&self) -> String {
        let userinfo = self
            .userinfo
            .as_deref()
            .map(|info| match info.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => info.to_owned(),
            });
        let attrs = self.attrs.name();
        let query = self
            .query
            .iter()
            .map(|(k, v)| match k.eq_ignore_ascii_case("password") {
                true => (k.as_str(), "***"),
                false => (k.as_str(), v.as_str()),
            })
            .chain((self.attrs != SessionAttrs::Any).then_some(("target_session_attrs", attrs)));
        self.render(userinfo.as_deref(), &self.describe_hosts(), query)
    }

    /// Every form of every password the URL holds (raw and percent-decoded),
    /// to scrub from driver messages.
    pub(crate) fn passwords(&self) -> Vec<String> {
        let mut found: Vec<String> = self
            .query
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("password"))
            .map(|(_, v)| v.clone())
            .collect();
        if let Some((_, password)) = self.userinfo.as_deref().and_then(|i| i.split_once(':')) {
            found.push(password.to_owned());
            found.push(
                percent_encoding::percent_decode_str(password)
                    .decode_utf8_lossy()
                    .into_owned(),
            );
        }
        found.retain(|p| !p.is_empty());
        found
    }

    fn render<'a>(
        &self,
        userinfo: Option<&str>,
        hosts: &str,
        query: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> String {
        let mut url = format!("{}://", self.scheme);
        if let Some(info) = userinfo {
            url.push_str(info);
            url.push('@');
        }
        url.push_str(hosts);
        url.push_str(&self.path);
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(query)
            .finish();
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query);
        }
        url
    }

    /// Every host, comma-separated, for messages (`h1:5432,h2:5433`).
    pub(crate) fn describe_hosts(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(Host::to_string).collect();
        hosts.join(",")
    }
}

/// The hosts of the URL's host part (`h1:1,[::1]:2,h3`); one empty host when
/// the part is empty (sqlx's default then applies).
fn split_host_part(part: &str) -> Result<Vec<Host>, String> {
    part.split(',').map(split_host).collect()
}

fn split_host(entry: &str) -> Result<Host, String> {
    let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
        let close = v6
            .find(']')
            .ok_or_else(|| format!("unclosed [ in host {entry:?}"))?;
        let after = &v6[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(port) => port,
            None if after.is_empty() => "",
            None => return Err(format!("unexpected text after ] in host {entry:?}")),
        };
        (&entry[..close + 2], port)
    } else {
        entry.split_once(':').unwrap_or((entry, ""))
    };
    Ok(Host {
        host: host.to_owned(),
        port: parse_port(port)?,
    })
}

fn parse_port(port: &str) -> Result<Option<u16>, String> {
    if port.is_empty() {
        return Ok(None);
    }
    port.parse::<u16>()
        .ok()
        .filter(|port| *port != 0)
        .map(Some)
        .ok_or_else(|| format!("port {port:?} is not a number from 1 to 65535"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(host: &str, port: Option<u16>) -> Host {
        Host {
            host: host.to_owned(),
            port,
        }
    }

    fn hosts(url: &str) -> Vec<Host> {
        HostList::parse(url).unwrap().hosts
    }

    // The examples of libpq's documentation ("Connection URIs", "Specifying
    // Multiple Hosts").

    #[test]
    fn libpq_single_host_examples_are_passed_on_unchanged() {
        for url in [
            "postgresql://",
            "postgresql://localhost",
            "postgresql://localhost:5433",
            "postgresql://localhost/mydb",
            "postgresql://user@localhost",
            "postgresql://user:secret@localhost",
            "postgresql://other@localhost/otherdb?connect_timeout=10&application_name=myapp",
            "postgresql://[2001:db8::1234]/database",
            "postgresql://%2Fvar%2Flib%2Fpostgresql/dbname",
        ] {
            let list = HostList::parse(url).unwrap();
            assert!(!list.needs_choosing(), "{url}");
            assert_eq!(list.url_for(0), url);
        }
        assert_eq!(
            hosts("postgresql://localhost:5433"),
            [host("localhost", Some(5433))]
        );
        assert_eq!(
            hosts("postgresql://[2001:db8::1234]/database"),
            [host("[2001:db8::1234]", None)]
        );
        assert_eq!(hosts("postgresql://"), [host("", None)]);
    }

    #[test]
    fn libpq_host_and_port_parameters_replace_the_host_part() {
        assert_eq!(
            hosts("postgresql:///mydb?host=localhost&port=5433"),
            [host("localhost", Some(5433))]
        );
        assert_eq!(
            hosts("postgresql:///dbname?host=/var/lib/postgresql"),
            [host("/var/lib/postgresql", None)]
        );
        assert_eq!(
            HostList::parse("postgresql:///dbname?host=/var/lib/postgresql")
                .unwrap()
                .url_for(0),
            "postgresql://%2Fvar%2Flib%2Fpostgresql/dbname"
        );
        assert_eq!(
            HostList::parse("postgresql:///mydb?host=localhost&port=5433")
                .unwrap()
                .url_for(0),
            "postgresql://localhost:5433/mydb"
        );
        assert_eq!(
            hosts("postgresql://ignored:1/db?host=a,b&port=2,3"),
            [host("a", Some(2)), host("b", Some(3))]
        );
    }

    #[test]
    fn libpq_multi_host_example_splits_into_one_url_per_host() {
        let list = HostList::parse(
            "postgresql://host1:123,host2:456/somedb?target_session_attrs=any&application_name=myapp",
        )
        .unwrap();
        assert_eq!(
            list.hosts,
            [host("host1", Some(123)), host("host2", Some(456))]
        );
        assert_eq!(list.attrs, SessionAttrs::Any);
        assert!(list.needs_choosing());
        assert_eq!(
            list.url_for(0),
            "postgresql://host1:123/somedb?application_name=myapp"
        );
        assert_eq!(
            list.url_for(1),
            "postgresql://host2:456/somedb?application_name=myapp"
        );
        assert_eq!(list.describe_hosts(), "host1:123,host2:456");
    }

    #[test]
    fn ports_are_optional_per_host_and_one_port_applies_to_all() {
        assert_eq!(
            hosts("postgres://node1,node2:5433,[::1]:4432,node4/mydb"),
            [
                host("node1", None),
                host("node2", Some(5433)),
                host("[::1]", Some(4432)),
                host("node4", None)
            ]
        );
        assert_eq!(
            hosts("postgres:///db?host=h1,h2,h3&port=6432"),
            [
                host("h1", Some(6432)),
                host("h2", Some(6432)),
                host("h3", Some(6432))
            ]
        );
    }

    #[test]
    fn user_info_and_other_parameters_go_to_every_host() {
        let list = HostList::parse(
            "postgres://app:p%40ss@h1,h2:5433/app?sslmode=require&target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(list.attrs, SessionAttrs::ReadWrite);
        assert_eq!(
            list.url_for(0),
            "postgres://app:p%40ss@h1/app?sslmode=require"
        );
        assert_eq!(
            list.url_for(1),
            "postgres://app:p%40ss@h2:5433/app?sslmode=require"
        );
    }

    #[test]
    fn every_session_attribute_of_libpq_is_read() {
        for (name, attrs) in SessionAttrs::NAMES {
            let list =
                HostList::parse(&format!("postgres://h/db?target_session_attrs={name}")).unwrap();
            assert_eq!(list.attrs, attrs);
            assert_eq!(attrs.name(), name);
            assert_eq!(list.needs_choosing(), attrs != SessionAttrs::Any);
            assert_eq!(list.url_for(0), "postgres://h/db");
        }
    }

    #[test]
    fn redaction_lists_every_host_and_hides_every_password() {
        let list = HostList::parse(
            "postgres://app:p%40ss@h1:1,h2:2/app?password=other&target_session_attrs=primary",
        )
        .unwrap();
        assert_eq!(
            list.redacted(),
            "postgres://app:***@h1:1,h2:2/app?password=***&target_session_attrs=primary"
        );
        assert_eq!(list.passwords(), ["other", "p%40ss", "p@ss"]);
        let list = HostList::parse("postgres://app@h1,h2/app").unwrap();
        assert_eq!(list.redacted(), "postgres://app@h1,h2/app");
        assert!(list.passwords().is_empty());
    }

    #[test]
    fn malformed_lists_are_refused_with_the_reason() {
        let refused = |url: &str| HostList::parse(url).unwrap_err();
        assert!(refused("postgres://h1,h2/db?port=1,2,3").contains("3 ports for 2 hosts"));
        assert!(refused("postgres://h1:99999/db").contains("\"99999\""));
        assert!(refused("postgres://h1:0/db").contains("1 to 65535"));
        assert!(refused("postgres://[::1/db").contains("unclosed"));
        assert!(refused("postgres://h/db?target_session_attrs=master").contains("read-write"));
        assert!(refused("mysql://h/db").contains("postgres://"));
        assert!(refused("h1,h2").contains("postgres://"));
        assert!(refused("postgres:///db?hostaddr=1.2.3.4,5.6.7.8").contains("hostaddr"));
    }
}
