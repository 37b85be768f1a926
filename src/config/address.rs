//! Names and addresses as the config, the CLI and the admin API accept them.

use std::net::IpAddr;

/// Whether a broker or API name is acceptable: it lands in client ids, metric labels and paths
/// (so not `.` or `..`, which a URL path or a file path would read as a directory).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.chars().all(|c| c == '.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Why an address cannot be used: one line saying what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AddressError(pub String);

/// Splits `host:port` (or `[v6]:port`, or a bare host) into its parts.
pub fn parse_address(text: &str, default_port: u16) -> Result<(String, u16), AddressError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(AddressError("empty address".into()));
    }
    if text.contains("://") {
        return Err(AddressError(format!(
            "{text:?}: give host:port without a scheme"
        )));
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| AddressError(format!("{text:?}: unclosed '[' in IPv6 address")))?;
        match after {
            "" => (host.to_string(), None),
            p if p.starts_with(':') => (host.to_string(), Some(&p[1..])),
            _ => {
                return Err(AddressError(format!(
                    "{text:?}: expected ':port' after ']'"
                )));
            }
        }
    } else if text.matches(':').count() > 1 {
        // A bare IPv6 address without port.
        (text.to_string(), None)
    } else {
        match text.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (text.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(AddressError(format!("{text:?}: missing host")));
    }
    let host_ok = host.parse::<IpAddr>().is_ok()
        || host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !host_ok {
        return Err(AddressError(format!("{text:?}: invalid host {host:?}")));
    }
    // A name whose last label is all digits is no DNS name (RFC 3696): a mistyped IPv4 address.
    if host.parse::<IpAddr>().is_err()
        && host
            .rsplit('.')
            .next()
            .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(AddressError(format!(
            "{text:?}: {host:?} is not a valid IPv4 address"
        )));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(AddressError(format!("{text:?}: invalid port {p:?}"))),
            Ok(port) => port,
        },
    };
    Ok((host, port))
}

/// Whether `host` (as written, not resolved) names the address `listen` binds.
pub(super) fn is_this_host(host: &str, listen: IpAddr) -> bool {
    match host.parse::<IpAddr>() {
        Ok(ip) => {
            ip == listen || (listen.is_unspecified() && (ip.is_loopback() || ip.is_unspecified()))
        }
        Err(_) => host == "localhost" && (listen.is_loopback() || listen.is_unspecified()),
    }
}

pub(super) fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}
