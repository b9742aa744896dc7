//! Plain async functions as named RPC methods: the [`Dispatcher`].
//!
//! A [`Dispatcher`] maps method names to [handlers](Handler): async functions or closures that
//! take a request of any serde type and return a serde value or a `Result`. It is itself a
//! tower [`Service`], so it goes straight into [`Server::serve`](crate::Server::serve) and
//! under any tower layer. The client needs nothing but the method's name and the types:
//! [`Client::invoke`](crate::Client::invoke), [`Client::method`](crate::Client::method) (a typed
//! `Service` for one method), [`Client::send`](crate::Client::send) (one-way) and
//! [`Client::batch`](crate::Client::batch). Unlike gorpc, the client does not register the
//! server's functions: a program in another repository only shares the request and response
//! types (or writes its own that encode the same way).
//!
//! # Examples
//!
//! ```
//! use std::sync::Arc;
//! use serde::{Deserialize, Serialize};
//! use towerpc::dispatch::Dispatcher;
//! use towerpc::{BoxError, Client, Server};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Add {
//!     a: i64,
//!     b: i64,
//! }
//!
//! #[derive(Default)]
//! struct Counter(std::sync::atomic::AtomicU64);
//!
//! impl Counter {
//!     async fn bump(self: Arc<Self>, by: u64) -> u64 {
//!         self.0.fetch_add(by, std::sync::atomic::Ordering::Relaxed) + by
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let dispatcher = Dispatcher::new()
//!     .route("Calc.Add", |req: Add| async move { req.a + req.b })
//!     .route_with("Hits.Bump", Arc::new(Counter::default()), Counter::bump);
//!
//! let incoming = towerpc::server::TcpIncoming::bind("127.0.0.1:0".parse()?).await?;
//! let addr = incoming.local_addr()?;
//! let server = tokio::spawn(Server::builder().serve_with_incoming(incoming, dispatcher));
//!
//! let client = Client::connect(addr).await?;
//! let sum: i64 = client.invoke("Calc.Add", &Add { a: 2, b: 3 }).await?;
//! assert_eq!(sum, 5);
//! assert_eq!(client.invoke::<u64, u64>("Hits.Bump", &2).await?, 2);
//! # server.abort();
//! # Ok(())
//! # }
//! ```
//!
//! # Payloads and rolling upgrades
//!
//! Requests and replies are msgpack made by `rmp-serde` with **field names** (structs are maps,
//! not arrays), so any serde type works: `()`, unit and empty structs, maps and sets,
//! enums, `Option`, byte strings (`serde_bytes`), timestamps (chrono's or `time`'s serde
//! support). One msgpack quirk: there is a single nil, and `Some(x)` is written as `x`, so an
//! `Option` around something that is itself nil (`Option<()>`, `Option<Option<T>>`) reads
//! `Some(nil)` back as `None`.
//!
//! Because fields are found by name, these changes are safe while old and new programs talk to
//! each other (a rolling upgrade), in either direction:
//!
//! - adding a field marked `#[serde(default)]` (an old peer leaves it out and the new one
//!   fills in the default; the old peer skips the field it does not know);
//! - removing a field the other side reads with `#[serde(default)]`, or an `Option` field;
//! - reordering fields, or renaming one with `#[serde(alias = "old")]` on the reader first;
//! - adding a method (old clients never call it) or an enum variant that old peers never
//!   receive.
//!
//! These are not: renaming a field or a method without an alias, changing a field's type,
//! adding a field without a default, and `#[serde(deny_unknown_fields)]` on a type that may
//! gain fields.
//!
//! # Errors
//!
//! Every failure is an error response on the call; none closes the connection.
//!
//! | what | [`Code`] | message |
//! |---|---|---|
//! | no such method | `NotFound` | `unknown method "Calc.Ad"` |
//! | the request does not decode | `InvalidArgument` | `method "Calc.Add": request does not decode as my_app::Add: ...` |
//! | the handler returned a [`Status`] (anywhere in the `source()` chain) | its code | its message, and its details |
//! | the handler returned another error | `Application` | the error's `Display` text |
//! | the handler panicked | `Internal` | `handler panicked` |
//!
//! For an error the client can act on, return a `Status` made with
//! [`Status::typed`](crate::Status::typed): it carries a serde value (your error type) as
//! msgpack details, which the client gets back with
//! [`Error::details`](crate::Error::details).
//!
//! # The method list
//!
//! Every dispatcher answers [`METHODS`] (`"towerpc.methods"`, request `()`) with a
//! `Vec<`[`MethodInfo`]`>`: each registered name with the Rust type names of its request and
//! response, sorted by name, for tools and health checks. Names starting with `towerpc.` are
//! reserved for such built-ins.

mod context;
pub mod future;
mod handler;

pub use self::context::CallContext;
pub use self::handler::{Handler, WithState};

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tower::Service;

use self::future::ResponseFuture;
use self::handler::private::{Endpoint, Erase};
use crate::codec::MAX_METHOD_LEN;
use crate::error::{Code, Status};
use crate::{BoxError, Request, Response};

/// The built-in method that lists a dispatcher's methods: request `()`, reply
/// `Vec<`[`MethodInfo`]`>`.
///
/// # Examples
///
/// ```no_run
/// # async fn f(client: towerpc::Client) -> towerpc::Result<()> {
/// use towerpc::dispatch::{MethodInfo, METHODS};
///
/// let methods: Vec<MethodInfo> = client.invoke(METHODS, &()).await?;
/// for m in methods {
///     println!("{}({}) -> {}", m.name, m.request, m.response);
/// }
/// # Ok(()) }
/// ```
pub const METHODS: &str = "towerpc.methods";

/// Prefix of the names reserved for built-in methods.
const RESERVED_PREFIX: &str = "towerpc.";

/// One entry of the [`METHODS`] list.
///
/// Type names come from [`std::any::type_name`]: meant for people and tools, not for
/// comparing across builds (the exact text may change between compiler versions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MethodInfo {
    /// The method's name.
    pub name: String,
    /// The request's type name (`()` for handlers that take no request).
    pub request: String,
    /// The reply's type name (for `Result<T, E>` handlers, `T`).
    pub response: String,
}

/// Routes calls to handlers by method name; a tower `Service<Request>`.
///
/// Build it once with [`route`](Dispatcher::route) and
/// [`route_with`](Dispatcher::route_with), then serve it. Cloning is cheap (the route table is
/// shared), which is what the server does for every connection. See [`Handler`] for the
/// handler shapes and the [module docs](self) for payloads and errors.
///
/// # Examples
///
/// ```no_run
/// use towerpc::dispatch::Dispatcher;
/// use towerpc::Server;
///
/// # async fn f() -> towerpc::Result<()> {
/// let d = Dispatcher::new()
///     .route("Echo", |s: String| async move { s })
///     .route("Len", |v: Vec<u8>| async move { v.len() });
/// Server::builder().serve("127.0.0.1:7100".parse().unwrap(), d).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Dispatcher {
    routes: Arc<Routes>,
}

#[derive(Clone, Default)]
struct Routes {
    /// Keyed by the name's bytes: a request's method is looked up as it arrived, without
    /// checking its UTF-8 once more (the decoder did).
    map: HashMap<Box<[u8]>, Route>,
    /// The encoded [`METHODS`] reply, made on first use.
    list: OnceLock<Bytes>,
}

#[derive(Clone)]
struct Route {
    endpoint: Arc<dyn Endpoint>,
    request: &'static str,
    response: &'static str,
}

impl Dispatcher {
    /// A dispatcher with no methods (it still answers [`METHODS`]).
    pub fn new() -> Self {
        Dispatcher::default()
    }

    /// Registers `handler` under `name`: any async function or closure of a [`Handler`]
    /// shape.
    ///
    /// # Panics
    ///
    /// If `name` is already registered, is empty or longer than 255 bytes (it could never
    /// arrive), or starts with the reserved `towerpc.` prefix, or if the handler returns a
    /// `Result` whose error type is not an error (`E: Into<BoxError>`). These are mistakes in
    /// the program, found when the dispatcher is built.
    #[must_use]
    pub fn route<M, H>(mut self, name: impl Into<String>, handler: H) -> Self
    where
        H: Handler<M>,
    {
        let name = name.into();
        assert!(
            !name.is_empty() && name.len() <= MAX_METHOD_LEN,
            "method name {name:?} must be 1 to {MAX_METHOD_LEN} bytes long"
        );
        assert!(
            !name.starts_with(RESERVED_PREFIX),
            "method name {name:?} uses the reserved prefix {RESERVED_PREFIX:?}"
        );
        assert!(
            !self.routes.map.contains_key(name.as_bytes()),
            "method {name:?} registered twice"
        );
        let (request, response) = <H as Erase<M>>::types();
        // A `Result` whose error is not an error type (it serializes, so the handler still
        // compiles as one returning a plain value) would reach the client as a successful
        // reply holding `{"Err": ...}`.
        assert!(
            !response.starts_with("core::result::Result<"),
            "handler of {name:?} returns {response}, whose error type is not an error: return \
             `Result<T, Status>` (or any `E: Into<BoxError>`), or map the error into a `Status`"
        );
        let route = Route {
            endpoint: handler.erase(),
            request,
            response,
        };
        // Copies the table only if a clone of this dispatcher shares it.
        let routes = Arc::make_mut(&mut self.routes);
        routes.list = OnceLock::new();
        routes
            .map
            .insert(name.into_bytes().into_boxed_slice(), route);
        self
    }

    /// Registers `handler` under `name`, bound to `state`: the handler gets a clone of the
    /// `Arc` first, then what a [`route`](Dispatcher::route) handler would get. This is how
    /// several receivers of one type serve under distinct names.
    ///
    /// # Panics
    ///
    /// As [`route`](Dispatcher::route).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use std::sync::{Arc, Mutex};
    /// use towerpc::dispatch::Dispatcher;
    ///
    /// #[derive(Default)]
    /// struct Cache(Mutex<HashMap<String, String>>);
    ///
    /// impl Cache {
    ///     async fn get(self: Arc<Self>, key: String) -> Option<String> {
    ///         self.0.lock().unwrap().get(&key).cloned()
    ///     }
    ///     async fn set(self: Arc<Self>, (key, value): (String, String)) {
    ///         self.0.lock().unwrap().insert(key, value);
    ///     }
    /// }
    ///
    /// let users = Arc::new(Cache::default());
    /// let posts = Arc::new(Cache::default());
    /// let d = Dispatcher::new()
    ///     .route_with("UsersCache.Get", users.clone(), Cache::get)
    ///     .route_with("UsersCache.Set", users, Cache::set)
    ///     .route_with("PostsCache.Get", posts.clone(), Cache::get)
    ///     .route_with("PostsCache.Set", posts, Cache::set);
    /// ```
    #[must_use]
    pub fn route_with<S, F, M>(self, name: impl Into<String>, state: Arc<S>, handler: F) -> Self
    where
        WithState<S, F>: Handler<M>,
    {
        self.route(name, WithState::new(state, handler))
    }

    /// Registers the methods of one receiver (a value of shared state) under
    /// `"{prefix}.{name}"`: gorpc's named service, without a macro. `methods` lists them on a
    /// [`Receiver`]; being a plain function of the receiver's type, the list can be written
    /// once and reused for every instance.
    ///
    /// # Panics
    ///
    /// As [`route`](Dispatcher::route), for each method.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use towerpc::dispatch::{Dispatcher, Receiver};
    ///
    /// #[derive(Default)]
    /// struct Cache(std::sync::Mutex<std::collections::HashMap<String, String>>);
    ///
    /// impl Cache {
    ///     async fn get(self: Arc<Self>, key: String) -> Option<String> {
    ///         self.0.lock().unwrap().get(&key).cloned()
    ///     }
    ///     async fn len(self: Arc<Self>) -> usize {
    ///         self.0.lock().unwrap().len()
    ///     }
    ///
    ///     /// `Cache`'s remote methods, for any instance.
    ///     fn methods(r: Receiver<Self>) -> Receiver<Self> {
    ///         r.method("Get", Cache::get).method("Len", Cache::len)
    ///     }
    /// }
    ///
    /// let d = Dispatcher::new()
    ///     .receiver("UsersCache", Arc::new(Cache::default()), Cache::methods)
    ///     .receiver("PostsCache", Arc::new(Cache::default()), Cache::methods);
    /// let names: Vec<String> = d.methods().into_iter().map(|m| m.name).collect();
    /// assert_eq!(names[..4], ["PostsCache.Get", "PostsCache.Len", "UsersCache.Get", "UsersCache.Len"]);
    /// ```
    ///
    /// # Panics
    ///
    /// If `prefix` is empty (the names would start with a dot), or `methods` registers no
    /// method: both are mistakes in the program, found when the dispatcher is built.
    #[must_use]
    pub fn receiver<S>(
        self,
        prefix: &str,
        state: Arc<S>,
        methods: impl FnOnce(Receiver<S>) -> Receiver<S>,
    ) -> Self {
        assert!(
            !prefix.is_empty(),
            "receiver prefix is empty: its methods would be named \".Name\""
        );
        let before = self.routes.map.len();
        let receiver = Receiver {
            dispatcher: self,
            prefix: prefix.to_owned(),
            state,
        };
        let dispatcher = methods(receiver).dispatcher;
        assert!(
            dispatcher.routes.map.len() > before,
            "receiver {prefix:?} registered no methods"
        );
        dispatcher
    }

    /// The registered methods (the built-in [`METHODS`] included), sorted by name.
    pub fn methods(&self) -> Vec<MethodInfo> {
        let mut list: Vec<MethodInfo> = self
            .routes
            .map
            .iter()
            .map(|(name, r)| MethodInfo {
                name: String::from_utf8_lossy(name).into_owned(),
                request: r.request.to_owned(),
                response: r.response.to_owned(),
            })
            .collect();
        list.push(MethodInfo {
            name: METHODS.to_owned(),
            request: "()".to_owned(),
            response: std::any::type_name::<Vec<MethodInfo>>().to_owned(),
        });
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    fn list_reply(&self) -> Result<Bytes, BoxError> {
        let list = self.routes.list.get_or_init(|| {
            // Strings in a Vec: encoding cannot fail.
            crate::payload::to_msgpack(&self.methods()).unwrap_or_default()
        });
        Ok(list.clone())
    }
}

/// The methods of one receiver being registered; see [`Dispatcher::receiver`].
pub struct Receiver<S> {
    dispatcher: Dispatcher,
    prefix: String,
    state: Arc<S>,
}

impl<S> Receiver<S> {
    /// Registers `handler` as `"{prefix}.{name}"`, bound to this receiver's state (as
    /// [`Dispatcher::route_with`]).
    #[must_use]
    pub fn method<F, M>(mut self, name: &str, handler: F) -> Self
    where
        WithState<S, F>: Handler<M>,
    {
        let full = format!("{}.{name}", self.prefix);
        self.dispatcher = self
            .dispatcher
            .route_with(full, self.state.clone(), handler);
        self
    }

    /// The receiver's state.
    pub fn state(&self) -> &Arc<S> {
        &self.state
    }
}

impl<S> fmt::Debug for Receiver<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("prefix", &self.prefix)
            .field("state", &std::any::type_name::<S>())
            .finish()
    }
}

impl Service<Request> for Dispatcher {
    type Response = Response;
    type Error = BoxError;
    type Future = ResponseFuture;

    /// Always ready: handlers hold no per-call capacity. Put a concurrency limit or load
    /// shedding layer above the dispatcher (or use the server's limits) to bound work.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> ResponseFuture {
        if let Some(route) = self.routes.map.get(&req.method[..]) {
            return route.endpoint.call(req);
        }
        if req.method() == METHODS {
            return ResponseFuture::ready(self.list_reply());
        }
        let msg = format!("unknown method {:?}", req.method());
        ResponseFuture::error(Box::new(Status::new(Code::NotFound, msg)))
    }
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<String> = self
            .routes
            .map
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        names.sort_unstable();
        f.debug_struct("Dispatcher")
            .field("methods", &names)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_and_duplicate_names_panic() {
        let dup = std::panic::catch_unwind(|| {
            Dispatcher::new()
                .route("A", || async {})
                .route("A", || async {})
        });
        assert!(dup.is_err());
        let reserved =
            std::panic::catch_unwind(|| Dispatcher::new().route("towerpc.x", || async {}));
        assert!(reserved.is_err());
        let long =
            std::panic::catch_unwind(|| Dispatcher::new().route("x".repeat(256), || async {}));
        assert!(long.is_err());
    }

    #[test]
    fn clones_share_routes_until_changed() {
        let a = Dispatcher::new().route("A", || async {});
        let b = a.clone().route("B", || async {});
        assert_eq!(a.methods().len(), 2);
        assert_eq!(b.methods().len(), 3);
    }
}
