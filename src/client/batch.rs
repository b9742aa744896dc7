//! [`Batch`]: many calls and one-way messages, sent as one unit.

use std::fmt;
use std::marker::PhantomData;

use serde::{de::DeserializeOwned, Serialize};

use super::future::ResponseFuture;
use super::pending::timeout_ms;
use super::{deadline_for, Client};
use crate::codec::Message;
use crate::error::{Error, Kind, Result};
use crate::{Method, Request, Response, Timeout};

impl Client {
    /// An empty [`Batch`]: calls and one-way messages to any methods, queued together so they
    /// leave in one write, with every reply back in order.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(client: towerpc::Client) -> towerpc::Result<()> {
    /// let mut batch = client.batch();
    /// let sum = batch.call::<_, i64>("Calc.Add", &(2, 3))?;
    /// let user = batch.call::<_, Option<String>>("UsersCache.Get", "alice")?;
    /// batch.send("Log.Write", "two calls in one write")?;
    ///
    /// let mut replies = batch.run().await?;
    /// assert_eq!(replies.take(sum)?, 5);
    /// match replies.take(user) {
    ///     Ok(name) => println!("{name:?}"),
    ///     Err(e) => println!("this call failed on its own: {e}"),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn batch(&self) -> Batch {
        Batch {
            client: self.clone(),
            entries: Vec::new(),
            timeout: Timeout::Default,
        }
    }
}

/// Calls and one-way messages sent as one unit; made by [`Client::batch`].
///
/// Adding an entry encodes it at once (so an encoding error is reported there);
/// [`run`](Batch::run) queues every entry under a single lock of the client's outbox, so the
/// whole batch goes out in one write, and waits for all the replies. Each call has its own
/// result and its own deadline, counted from `run`.
///
/// A batch may hold at most `max_pending` calls (see
/// [`Builder::max_pending`](super::Builder::max_pending)); under backpressure `run` first waits
/// until that many slots are free, all at once, and with
/// [`Overflow::FailOldest`](super::Overflow::FailOldest) it makes room as single calls do, by
/// failing the oldest pending calls. One-way messages take no slot.
///
/// Dropping the future of `run` before it completes cancels the calls still waiting, as
/// dropping single calls does.
pub struct Batch {
    client: Client,
    entries: Vec<Request>,
    timeout: Timeout,
}

impl Batch {
    /// Adds a call of `method` with `req` (msgpack, named fields); its reply will decode as
    /// `Resp`. Returns the slot to [`take`](Replies::take) the result from.
    pub fn call<Req, Resp>(&mut self, method: impl Into<Method>, req: &Req) -> Result<Slot<Resp>>
    where
        Req: Serialize + ?Sized,
    {
        let body = crate::payload::to_msgpack(req)?;
        Ok(self.push(Request::new(method, body)))
    }

    /// Adds a one-way message: the server runs the handler and replies nothing. Its entry in
    /// the [`Replies`] is an empty response once the batch is queued.
    pub fn send<Req>(&mut self, method: impl Into<Method>, req: &Req) -> Result<()>
    where
        Req: Serialize + ?Sized,
    {
        let body = crate::payload::to_msgpack(req)?;
        self.entries.push(Request::new(method, body).one_way());
        Ok(())
    }

    /// Adds a raw [`Request`], with its own metadata, timeout or one-way flag.
    pub fn request(&mut self, req: Request) -> Slot<Response> {
        self.push(req)
    }

    fn push<T>(&mut self, req: Request) -> Slot<T> {
        self.entries.push(req);
        Slot {
            index: self.entries.len() - 1,
            _t: PhantomData,
        }
    }

    /// Sets the timeout of the batch's calls that do not set their own, overriding the client's
    /// default. `None` waits without a bound.
    pub fn timeout(&mut self, timeout: impl Into<Timeout>) -> &mut Self {
        self.timeout = timeout.into();
        self
    }

    /// The number of entries (calls and one-way messages).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the batch has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sends the batch as one unit and waits for every reply.
    ///
    /// Fails as a whole, with nothing sent, when the client cannot send now (closed, no
    /// connection, draining) or the batch holds more calls than `max_pending`. Otherwise every
    /// entry has its own result in the [`Replies`], in the order the entries were added.
    pub async fn run(self) -> Result<Replies> {
        let Batch {
            client,
            entries,
            timeout,
        } = self;
        // One connection for the whole batch, so that it leaves in one write.
        let shared = client.handle.pick();
        let max = shared.config.max_pending;
        let calls = entries.iter().filter(|r| !r.one_way).count();
        if calls > max {
            return Err(Error::new(Kind::Overloaded)
                .target(shared.config.target.as_ref())
                .with(format!(
                    "a batch of {calls} calls is larger than max_pending ({max})"
                )));
        }
        // The calls' deadlines count from here: a wait for slots spends them.
        let now = tokio::time::Instant::now();
        let deadlines: Vec<Option<tokio::time::Instant>> = entries
            .iter()
            .map(|req| {
                let own = match req.timeout {
                    Timeout::Default => timeout.or(shared.config.timeout),
                    t => t.or(None),
                };
                deadline_for(own, now)
            })
            .collect();
        // All the slots at once: taking them one by one could leave two large batches each
        // holding part of what it needs, waiting for the other forever.
        let mut permits = match &client.handle.permits {
            Some(sem) if calls > 0 => {
                let n = u32::try_from(calls).map_err(|_| Error::new(Kind::Overloaded))?;
                Some(match sem.clone().try_acquire_many_owned(n) {
                    Ok(p) => p,
                    Err(_) => {
                        // The wait ends when the last call's deadline passes, if all have one.
                        let mut latest = Some(now);
                        for (req, &deadline) in entries.iter().zip(&deadlines) {
                            if !req.one_way {
                                latest = latest.zip(deadline).map(|(a, d)| a.max(d));
                            }
                        }
                        let acquire = sem.clone().acquire_many_owned(n);
                        let acquired = match latest {
                            Some(at) => {
                                tokio::time::timeout_at(at, acquire).await.map_err(|_| {
                                    super::timed_out(shared).with(
                                        "every call slot stayed taken until the batch's deadlines \
                                     (max_pending)"
                                            .to_string(),
                                    )
                                })?
                            }
                            None => acquire.await,
                        };
                        acquired.map_err(|_| Error::new(Kind::Closed))?
                    }
                })
            }
            _ => None,
        };

        let msgs: Vec<(Message, bool)> = entries
            .into_iter()
            .zip(&deadlines)
            .map(|(req, deadline)| {
                let own_deadline = !matches!(req.timeout, Timeout::Default)
                    || !matches!(timeout, Timeout::Default)
                    || crate::deadline::current().is_some();
                let t = deadline.map(|d| d.saturating_duration_since(now));
                let msg = if req.one_way {
                    Message::OneWay {
                        timeout_ms: timeout_ms(t),
                        method: req.method,
                        metadata: req.metadata,
                        body: req.body,
                    }
                } else {
                    Message::Request {
                        // Assigned under the client's lock by `start_batch`.
                        id: 0,
                        timeout_ms: timeout_ms(t),
                        method: req.method,
                        metadata: req.metadata,
                        body: req.body,
                    }
                };
                (msg, own_deadline)
            })
            .collect();
        let (started, gen) = shared.start_batch(msgs)?;

        // Every call is registered (and its deadline running) before any reply is awaited, so
        // awaiting them in order costs nothing: a reply that arrives early waits in its
        // channel.
        let futures: Vec<ResponseFuture> = started
            .into_iter()
            .zip(deadlines)
            .map(|(s, t)| match s {
                Ok(Some((id, rx))) => {
                    // The call's slot is the table's now (see `Shared::permits`).
                    if let Some(slot) = permits.as_mut().and_then(|p| p.split(1)) {
                        super::Permit::Owned(slot).give_to_table();
                    }
                    ResponseFuture::waiting((shared.clone(), id, gen, rx), t, None, None)
                }
                Ok(None) => ResponseFuture::ready(Ok(Response::default())),
                Err(e) => ResponseFuture::ready(Err(e)),
            })
            .collect();
        // Slots of calls the client refused go back now.
        drop(permits);
        let mut replies = Vec::with_capacity(futures.len());
        for fut in futures {
            replies.push(Some(fut.await));
        }
        Ok(Replies { replies })
    }
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("entries", &self.entries.len())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Where one call's result will be in the [`Replies`] of its [`Batch`]; `T` is the type the
/// reply decodes as.
#[must_use = "a slot is the only way to get its call's result"]
pub struct Slot<T> {
    index: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T> Slot<T> {
    /// The entry's position in its batch (0 for the first entry added).
    pub fn index(&self) -> usize {
        self.index
    }
}

impl<T> fmt::Debug for Slot<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("index", &self.index)
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

/// The results of a [`Batch`], one per entry, in the order the entries were added.
///
/// Take typed results with [`take`](Replies::take), or iterate over the raw responses.
pub struct Replies {
    replies: Vec<Option<Result<Response>>>,
}

impl Replies {
    /// The result of `slot`'s call, decoded as its type.
    ///
    /// A slot of another batch, or one already taken, gives an error (`is_closed()`).
    pub fn take<T: FromReply>(&mut self, slot: Slot<T>) -> Result<T> {
        let reply = self
            .replies
            .get_mut(slot.index)
            .and_then(Option::take)
            .ok_or_else(|| {
                Error::new(Kind::Closed).with("batch slot already taken or from another batch")
            })?;
        T::from_reply(reply?)
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.replies.len()
    }

    /// Whether the batch was empty.
    pub fn is_empty(&self) -> bool {
        self.replies.is_empty()
    }
}

impl IntoIterator for Replies {
    type Item = Result<Response>;
    type IntoIter = std::iter::Map<
        std::vec::IntoIter<Option<Result<Response>>>,
        fn(Option<Result<Response>>) -> Result<Response>,
    >;

    /// The raw responses, in order; entries already taken give an error (`is_closed()`).
    fn into_iter(self) -> Self::IntoIter {
        fn untaken(r: Option<Result<Response>>) -> Result<Response> {
            r.unwrap_or_else(|| Err(Error::new(Kind::Closed).with("batch slot already taken")))
        }
        self.replies.into_iter().map(untaken)
    }
}

impl fmt::Debug for Replies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replies")
            .field("len", &self.replies.len())
            .finish()
    }
}

/// What a batch reply can be taken as: any serde type (decoded from msgpack), or the raw
/// [`Response`] of an entry added with [`Batch::request`].
pub trait FromReply: Sized + sealed::Sealed {
    #[doc(hidden)]
    fn from_reply(resp: Response) -> Result<Self>;
}

mod sealed {
    // Sealed: public only so that `FromReply` can name it as a supertrait.
    #[allow(unreachable_pub)]
    pub trait Sealed {}
}

impl<T: DeserializeOwned> sealed::Sealed for T {}

impl<T: DeserializeOwned> FromReply for T {
    fn from_reply(resp: Response) -> Result<T> {
        crate::payload::from_msgpack(resp.body())
    }
}

impl sealed::Sealed for Response {}

impl FromReply for Response {
    fn from_reply(resp: Response) -> Result<Response> {
        Ok(resp)
    }
}
