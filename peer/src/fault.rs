//! Test-only fault switches, compiled in only with the `fault-injection`
//! feature and read from the environment at first use.
//!
//! - `NEBULA_FAULT_CORRUPT=1`: flip one bit in every chunk this daemon serves
//!   (a lying provider).
//! - `NEBULA_FAULT_PEER_LISTENER=fail`: the peer server accepts nothing and
//!   stops at once (a failed listener).

use bytes::Bytes;

/// Returns the chunk as it should go on the wire: unchanged, unless this
/// daemon was built for fault tests and told to lie.
#[cfg(feature = "fault-injection")]
pub(crate) fn corrupt_served_chunk(data: Bytes) -> Bytes {
    use std::sync::OnceLock;
    static CORRUPT: OnceLock<bool> = OnceLock::new();
    let on = *CORRUPT.get_or_init(|| std::env::var("NEBULA_FAULT_CORRUPT").is_ok_and(|v| v == "1"));
    if !on || data.is_empty() {
        return data;
    }
    let mut bad = bytes::BytesMut::from(&data[..]);
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    bad.freeze()
}

/// Returns the chunk unchanged (fault injection is compiled out).
#[cfg(not(feature = "fault-injection"))]
#[inline]
pub(crate) fn corrupt_served_chunk(data: Bytes) -> Bytes {
    data
}

/// The connections the peer server accepts: those of `incoming`, unless
/// this daemon was built for fault tests and told its listener fails
/// (`NEBULA_FAULT_PEER_LISTENER=fail`), in which case there are none and
/// the server stops at once.
#[cfg(feature = "fault-injection")]
pub(crate) fn peer_incoming<S>(incoming: S) -> impl futures::Stream<Item = S::Item> + Send
where
    S: futures::Stream + Send,
    S::Item: Send,
{
    use futures::future::Either;
    if std::env::var("NEBULA_FAULT_PEER_LISTENER").is_ok_and(|v| v == "fail") {
        Either::Left(futures::stream::empty())
    } else {
        Either::Right(incoming)
    }
}

/// The connections the peer server accepts (fault injection is compiled out).
#[cfg(not(feature = "fault-injection"))]
#[inline]
pub(crate) fn peer_incoming<S>(incoming: S) -> S {
    incoming
}
