//! Why a serving stream is ended before its time, and the one place that
//! becomes a status.

use tonic::Status;

/// Why a serving stream is ended before its time.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refused {
    /// No credential reached the handler (`ExchangeAuth` admits none without).
    #[error("no peer credential")]
    NoCredential,
    /// The first message was not a `Hello`.
    #[error("the first message of a stream must be Hello")]
    NoHello,
    /// A second `Hello`.
    #[error("Hello sent twice")]
    HelloTwice,
    /// The `Hello` names another peer than the credential does.
    #[error("Hello names another peer than the credential")]
    HelloMismatch,
    /// A message over the size limit.
    #[error("{}", .0.message())]
    TooLarge(Status),
    /// A message that does not decode.
    #[error("undecodable request: {}", .0.message())]
    Undecodable(Status),
}

impl Refused {
    /// Why a stream whose input could not be read is ended; `None` for a
    /// reset or cancel by the peer, which gets no answer.
    pub(super) fn reading(status: Status) -> Option<Self> {
        match status.code() {
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
                Some(Self::TooLarge(status))
            }
            tonic::Code::Internal => Some(Self::Undecodable(status)),
            _ => None,
        }
    }
}

/// The one place the exchange's refusals become statuses.
impl From<Refused> for Status {
    fn from(refused: Refused) -> Self {
        let message = refused.to_string();
        match refused {
            Refused::NoCredential | Refused::NoHello | Refused::HelloMismatch => {
                Status::unauthenticated(message)
            }
            Refused::HelloTwice | Refused::Undecodable(_) => Status::invalid_argument(message),
            Refused::TooLarge(_) => Status::resource_exhausted(message),
        }
    }
}
