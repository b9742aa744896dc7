//! The error boundary: a handler's `BoxError` becomes a wire [`Status`].

use crate::error::{Code, Status};
use crate::BoxError;

/// Maps a handler error to what the client will see. A [`Status`] anywhere in the `source()`
/// chain is used as it is; tower's well-known errors get their natural codes; anything else is
/// [`Code::Application`] with the error's display text.
pub(crate) fn status_from_error(err: BoxError) -> Status {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
    while let Some(e) = cur {
        if let Some(s) = e.downcast_ref::<Status>() {
            return s.clone();
        }
        if let Some(e) = e.downcast_ref::<crate::Error>() {
            if let Some(s) = e.status() {
                return s.clone();
            }
        }
        if e.is::<tower::timeout::error::Elapsed>() {
            return Status::new(Code::DeadlineExceeded, "handler timed out");
        }
        if e.is::<tower::load_shed::error::Overloaded>() {
            // Shed before the handler ran, so safe to retry elsewhere.
            return Status::new(Code::Refused, "server overloaded");
        }
        cur = e.source();
    }
    Status::new(Code::Application, err.to_string())
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
