//! The built-in health method, as `grpc.health.v1` does it: SERVING or NOT_SERVING per service
//! name, NOT_SERVING for everything the moment a graceful shutdown starts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::error::{Code, Status};

/// The method every towerpc server answers with the health of a service: the request is the
/// service name as a msgpack string (`""` for the server as a whole), the reply a
/// [`ServingStatus`]; a name never set answers `NOT_FOUND`.
///
/// The server answers it itself, before the service it runs (so neither limits nor layers
/// delay it), and keeps answering while it drains.
///
/// # Examples
///
/// ```no_run
/// use towerpc::server::health::{ServingStatus, HEALTH_METHOD};
///
/// # async fn f(client: towerpc::Client) -> towerpc::Result<()> {
/// let whole: ServingStatus = client.invoke(HEALTH_METHOD, "").await?;
/// let users: ServingStatus = client.invoke(HEALTH_METHOD, "Users").await?;
/// # Ok(()) }
/// ```
pub const HEALTH_METHOD: &str = "towerpc.health.Check";

/// What the health method says of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum ServingStatus {
    /// Take calls.
    Serving,
    /// Send calls elsewhere: the service is down, or the server is draining.
    NotServing,
}

/// Sets what the health method answers; from [`Server::health`](crate::Server::health).
///
/// The server as a whole (`""`) is SERVING while it serves; other names are unknown until set.
/// When a graceful shutdown starts, every name answers NOT_SERVING before the first request is
/// refused, so load balancers that poll the method stop sending calls first.
///
/// # Examples
///
/// ```
/// use towerpc::server::health::ServingStatus;
///
/// let server = towerpc::Server::builder();
/// let health = server.health();
/// health.set_serving("Users");
/// health.set_not_serving("Reports"); // its database is down
/// assert_eq!(health.status("Users"), Some(ServingStatus::Serving));
/// assert_eq!(health.status("Nope"), None);
/// ```
#[derive(Debug, Clone, Default)]
pub struct HealthReporter {
    inner: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    draining: AtomicBool,
    services: RwLock<HashMap<String, ServingStatus>>,
}

/// Characters of an unknown service's name an error quotes.
const MAX_NAME_SHOWN: usize = 128;

impl HealthReporter {
    /// Marks `service` SERVING (unless the server is draining).
    pub fn set_serving(&self, service: impl Into<String>) {
        self.set(service.into(), ServingStatus::Serving);
    }

    /// Marks `service` NOT_SERVING; `""` marks the whole server.
    pub fn set_not_serving(&self, service: impl Into<String>) {
        self.set(service.into(), ServingStatus::NotServing);
    }

    /// Forgets `service`: the health method answers `NOT_FOUND` for it again.
    pub fn clear(&self, service: &str) {
        self.write().remove(service);
    }

    /// What the health method answers for `service` now; `None` for an unknown name.
    pub fn status(&self, service: &str) -> Option<ServingStatus> {
        let set = self
            .inner
            .services
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .copied();
        let known = set.or((service.is_empty()).then_some(ServingStatus::Serving))?;
        if self.inner.draining.load(Ordering::Acquire) {
            return Some(ServingStatus::NotServing);
        }
        Some(known)
    }

    fn set(&self, service: String, status: ServingStatus) {
        self.write().insert(service, status);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, ServingStatus>> {
        // The map holds no invariant a panic could break.
        self.inner
            .services
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A graceful shutdown started (true) or a new serve began (false).
    pub(crate) fn draining(&self, draining: bool) {
        self.inner.draining.store(draining, Ordering::Release);
    }

    /// The health method's reply to a request body.
    pub(crate) fn answer(&self, body: &[u8]) -> Result<bytes::Bytes, Status> {
        let service: String = if body.is_empty() {
            String::new()
        } else {
            crate::payload::from_msgpack(body).map_err(|_| {
                Status::new(
                    Code::InvalidArgument,
                    "health check takes a service name (msgpack string)",
                )
            })?
        };
        let status = self.status(&service).ok_or_else(|| {
            // The name is the peer's, up to a frame long: the reply quotes its start only.
            let shown: String = service.chars().take(MAX_NAME_SHOWN).collect();
            let more = if shown.len() < service.len() {
                "..."
            } else {
                ""
            };
            Status::new(Code::NotFound, format!("unknown service {shown:?}{more}"))
        })?;
        crate::payload::to_msgpack(&status).map_err(|e| Status::new(Code::Internal, e.to_string()))
    }
}
