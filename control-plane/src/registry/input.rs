//! Checks and parsing of what requests carry, so bad input never reaches the
//! store.

use nebula_common::{BlobId, BlobRef};

use super::MAX_ADDRESS_LEN;
use crate::{error::RegistryError, store::PeerId};

/// Parses a peer id from a request field.
pub fn parse_peer_id(field: &'static str, s: &str) -> Result<PeerId, RegistryError> {
    s.parse()
        .map_err(|source| RegistryError::PeerId { field, source })
}

/// Parses `<hex>`, `blake3:<hex>` or `sha256:<hex>` from a request field.
pub fn parse_blob_ref(field: &'static str, s: &str) -> Result<BlobRef, RegistryError> {
    s.parse()
        .map_err(|source| RegistryError::BlobId { field, source })
}

/// Parses a BLAKE3 id from a request field.
pub fn parse_blob_id(field: &'static str, s: &str) -> Result<BlobId, RegistryError> {
    s.parse()
        .map_err(|source| RegistryError::BlobId { field, source })
}

pub(super) fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Checks that an advertised address is a dialable `host:port`.
pub fn check_address(address: &str) -> Result<(), RegistryError> {
    let bad = |reason| {
        Err(RegistryError::Address {
            address: shorten(address, 80),
            reason,
        })
    };
    if address.is_empty() {
        return bad("empty; advertise the host:port other peers can dial");
    }
    if address.len() > MAX_ADDRESS_LEN {
        return bad("longer than 255 bytes");
    }
    if address.contains("://") {
        return bad("give host:port without a scheme");
    }
    if address
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return bad("holds whitespace, control characters or '/'");
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return bad("no port; expected host:port");
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return bad("port must be a number from 1 to 65535"),
        Ok(_) => {}
    }
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if bracketed.is_none() && host.contains(':') {
        return bad("IPv6 addresses need brackets, e.g. [::1]:7701");
    }
    let host = bracketed.unwrap_or(host);
    if host.is_empty() {
        return bad("no host; expected host:port");
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => {
            bad("unspecified IP; advertise an address other peers can reach")
        }
        Ok(_) => Ok(()),
        Err(_) if bracketed.is_some() => bad("not an IPv6 address between the brackets"),
        Err(_) => Ok(()),
    }
}
