//! The error boundary: a handler's `BoxError` becomes a wire [`Status`].

use crate::error::{Code, Known, Status};
use crate::BoxError;

/// Maps a handler error to what the client will see. A [`Status`] anywhere in the `source()`
/// chain is used as it is; tower's well-known errors get their natural codes; anything else is
/// [`Code::Application`] with the error's display text.
pub(crate) fn status_from_error(err: BoxError) -> Status {
    crate::error::known_errors(&*err)
        .find_map(|known| match known {
            Known::Status(s) => Some(s.clone()),
            // A towerpc error that carries no status (a call of the handler's own that failed
            // here) says nothing of this call: what is behind it may.
            Known::Ours(e) => e.status().cloned(),
            Known::Elapsed => Some(Status::new(Code::DeadlineExceeded, "handler timed out")),
            // Shed before the handler ran, so safe to retry elsewhere.
            Known::Overloaded => Some(Status::new(Code::Refused, "server overloaded")),
            Known::Closed => None,
        })
        .unwrap_or_else(|| Status::new(Code::Application, err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_known_errors() {
        let s = status_from_error(Box::new(Status::new(Code::NotFound, "x")));
        assert_eq!(s.code(), Code::NotFound);
        let s = status_from_error(Box::new(tower::timeout::error::Elapsed::new()));
        assert_eq!(s.code(), Code::DeadlineExceeded);
        let s = status_from_error(Box::new(tower::load_shed::error::Overloaded::new()));
        assert_eq!(s.code(), Code::Refused);
        let s = status_from_error("boom".into());
        assert_eq!((s.code(), s.message()), (Code::Application, "boom"));
    }
}
