//! Bearer-token interceptors: the join token guards `ControlPlane`, the admin
//! token guards `Admin` on TCP. Without an admin token, `Admin` is off on TCP
//! (every call is refused) and answers only on the admin socket
//! (`--admin-socket`), which the file's mode (0600) restricts to the control
//! plane's own user: a source address proves nothing (any local user can
//! connect from 127.0.0.1), a socket's owner does. Tokens are compared in
//! constant time.

use std::sync::Arc;

use tonic::{Request, Status, service::Interceptor};

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing {which} token: send `authorization: Bearer <token>`")]
    Missing {
        /// `join` or `admin`.
        which: &'static str,
    },
    /// `authorization` is not `Bearer <token>`.
    #[error("malformed authorization metadata: expected `Bearer <token>`")]
    Malformed,
    /// The token does not match.
    #[error("invalid {which} token")]
    Wrong {
        /// `join` or `admin`.
        which: &'static str,
    },
    /// No admin token is configured: the admin API is off on TCP.
    #[error(
        "the admin API is off on TCP because the control plane has no admin token: \
         use `nebula admin --admin-socket PATH` with the control plane's --admin-socket, \
         or start it with --admin-token"
    )]
    NoAdminToken,
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::NoAdminToken => Status::permission_denied(err.to_string()),
            _ => Status::unauthenticated(err.to_string()),
        }
    }
}

fn check_bearer<T>(req: &Request<T>, expected: &str, which: &'static str) -> Result<(), AuthError> {
    let value = req
        .metadata()
        .get("authorization")
        .map(|v| v.to_str().map_err(|_| AuthError::Malformed))
        .transpose()?;
    check_bearer_value(value, expected, which)
}

/// Checks an `authorization` value (gRPC metadata or an HTTP header).
fn check_bearer_value(
    value: Option<&str>,
    expected: &str,
    which: &'static str,
) -> Result<(), AuthError> {
    let value = value.ok_or(AuthError::Missing { which })?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    if constant_time_eq::constant_time_eq(token.trim().as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(AuthError::Wrong { which })
    }
}

/// Guards `ControlPlane`: when a join token is set, every call must carry it.
#[derive(Clone)]
pub struct JoinAuth {
    token: Option<Arc<str>>,
}

impl JoinAuth {
    /// Requires `token` when it is `Some`.
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(Arc::from),
        }
    }

    /// Admits or refuses one call.
    pub fn check<T>(&self, req: &Request<T>) -> Result<(), AuthError> {
        match &self.token {
            Some(token) => check_bearer(req, token, "join"),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for JoinAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinAuth")
            .field("token_set", &self.token.is_some())
            .finish()
    }
}

impl Interceptor for JoinAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(&req).map_err(|err| {
            tracing::debug!(caller = ?req.remote_addr(), error = %err, "control-plane call refused");
            Status::from(err)
        })?;
        Ok(req)
    }
}

/// Guards `Admin` on TCP (and the live page's JSON): the admin token when
/// one is set; without one, every caller is refused, whatever its address.
/// The admin socket is served without this guard.
#[derive(Clone)]
pub struct AdminAuth {
    token: Option<Arc<str>>,
}

impl AdminAuth {
    /// Requires `token` when it is `Some`; refuses every call otherwise.
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(Arc::from),
        }
    }

    /// Admits or refuses one call.
    pub fn check<T>(&self, req: &Request<T>) -> Result<(), AuthError> {
        match &self.token {
            Some(token) => check_bearer(req, token, "admin"),
            None => Err(AuthError::NoAdminToken),
        }
    }

    /// Admits or refuses one HTTP request (the live page's data) by its
    /// `authorization` header, with the same rule as calls.
    pub fn check_http(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        match &self.token {
            Some(token) => check_bearer_value(authorization, token, "admin"),
            None => Err(AuthError::NoAdminToken),
        }
    }
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("token_set", &self.token.is_some())
            .finish()
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(&req).map_err(|err| {
            tracing::warn!(caller = ?req.remote_addr(), error = %err, "admin call refused");
            Status::from(err)
        })?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use tonic::{Code, transport::server::TcpConnectInfo};

    use super::*;

    fn req(auth: Option<&str>, from: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(a) = auth {
            req.metadata_mut()
                .insert("authorization", a.parse().unwrap());
        }
        if let Some(addr) = from {
            req.extensions_mut().insert(TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(addr.parse().unwrap()),
            });
        }
        req
    }

    #[test]
    fn join_token() {
        let open = JoinAuth::new(None);
        assert_eq!(open.check(&req(None, None)), Ok(()));
        let auth = JoinAuth::new(Some("s3cret"));
        assert_eq!(auth.check(&req(Some("Bearer s3cret"), None)), Ok(()));
        assert_eq!(auth.check(&req(Some("bearer  s3cret "), None)), Ok(()));
        assert_eq!(
            auth.check(&req(None, None)),
            Err(AuthError::Missing { which: "join" })
        );
        assert_eq!(
            auth.check(&req(Some("Basic s3cret"), None)),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.check(&req(Some("s3cret"), None)),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.check(&req(Some("Bearer s3cre"), None)),
            Err(AuthError::Wrong { which: "join" })
        );
        assert_eq!(
            auth.check(&req(Some("Bearer s3crett"), None)),
            Err(AuthError::Wrong { which: "join" })
        );
        let status = JoinAuth::new(Some("t")).call(req(None, None)).unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }

    #[test]
    fn admin_without_token_refuses_every_tcp_caller() {
        let auth = AdminAuth::new(None);
        for from in [
            Some("127.0.0.1:5000"),
            Some("127.0.0.2:5000"),
            Some("[::1]:5000"),
            Some("[::ffff:127.0.0.1]:5000"),
            Some("10.0.0.8:5000"),
            None,
        ] {
            assert_eq!(
                auth.check(&req(None, from)),
                Err(AuthError::NoAdminToken),
                "{from:?}"
            );
            assert_eq!(
                auth.check(&req(Some("Bearer anything"), from)),
                Err(AuthError::NoAdminToken)
            );
        }
        assert_eq!(auth.check_http(None), Err(AuthError::NoAdminToken));
        let status = AdminAuth::new(None)
            .call(req(None, Some("127.0.0.1:1")))
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(!status.message().contains('\n'), "one line");
        assert!(
            status.message().contains("--admin-socket"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("--admin-token"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn admin_token_applies_to_loopback_callers_too() {
        let auth = AdminAuth::new(Some("adm"));
        assert_eq!(
            auth.check(&req(Some("Bearer adm"), Some("10.0.0.8:1"))),
            Ok(())
        );
        assert_eq!(
            auth.check(&req(Some("Bearer nope"), Some("127.0.0.1:1"))),
            Err(AuthError::Wrong { which: "admin" })
        );
        assert_eq!(
            auth.check(&req(None, Some("127.0.0.1:1"))),
            Err(AuthError::Missing { which: "admin" })
        );
        assert_eq!(auth.check_http(Some("Bearer adm")), Ok(()));
        assert_eq!(
            auth.check_http(None),
            Err(AuthError::Missing { which: "admin" })
        );
    }
}
