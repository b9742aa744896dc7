//! The client's shared state: the phase of its connection, the outbox, and the in-flight table
//! from request id to the caller waiting for it. One mutex guards all of it, so starting a call
//! (allocate id, encode into the outbox, register the waiter) is a single short critical section.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Duration;

use tokio::sync::{oneshot, watch, Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::{Batch, Message, Outbox};
use crate::conn::{Padded, Source, MAX_BATCH_YIELDS};
use crate::error::{Error, Kind, Result};
use crate::protocol::{self, PerSecond};
use crate::stats::Counters;
use crate::{Request, Response, Timeout};

use super::builder::Config;

pub(crate) type Reply = Result<Response>;

/// What [`Shared::start_batch`] did with one message: a call's id and reply receiver, `None`
/// for a queued one-way message, or why the message was refused.
pub(crate) type Started = Result<Option<(u32, oneshot::Receiver<Reply>)>>;

/// A connection's generation: it changes with every reconnect, and a call remembers the one
/// it was sent on. Only compared for equality (a call and its connection's current one), so
/// it wraps: 2^32 reconnects do not happen while one call waits.
pub(crate) type Gen = u32;

#[derive(Debug)]
pub(crate) enum Slot {
    /// A caller is waiting for this id. The number is the writer's take count when the request
    /// was queued: while no take has happened since, the request has not left the process.
    /// The flag says the call has a deadline of its own (its own timeout, or one inherited from
    /// the handler it is made in), which the stall rule honours (see `Inner::fail_stuck`). The
    /// last number is the call's entry in the deadline queue ([`Expiry::seq`]), 0 for none.
    Waiting(oneshot::Sender<Reply>, u64, bool, u32),
    /// The caller gave up (timeout, drop); the id stays reserved until the reply arrives, so it
    /// is never reused while a reply for it may still be on its way.
    Abandoned,
}

/// The in-flight table: call id → [`Slot`], in a ring of slots indexed by the id's low bits.
/// Ids are this client's own (sequential, see [`Inner::next_free_id`]), so the live ones sit
/// in neighbouring slots: starting a call and delivering its reply each touch one slot, with
/// no hashing and no probing, and the table is never more than three-quarters full, so a free
/// slot for the next id is near. A reply's id from the server is only looked up (and must
/// match the slot's id exactly); the table grows only with calls this client makes.
///
/// How many calls it holds is not kept here: it is [`Inner::live`] plus [`Inner::abandoned`].
#[derive(Debug, Default)]
pub(crate) struct Calls {
    /// A power of two long (or empty before the first call).
    slots: Vec<Entry>,
}

#[derive(Debug)]
enum Entry {
    Free,
    Used(u32, Slot),
}

/// The table's first size.
const FIRST_SLOTS: usize = 16;

impl Calls {
    fn index(&self, id: u32) -> usize {
        id as usize & (self.slots.len().wrapping_sub(1))
    }

    /// The entry of call `id`, if it is in the table (its slot holds that very id).
    fn entry_mut(&mut self, id: u32) -> Option<&mut Entry> {
        let at = self.index(id);
        self.slots
            .get_mut(at)
            .filter(|e| matches!(e, Entry::Used(i, _) if *i == id))
    }

    /// The slot of call `id`, if it is in the table.
    pub(crate) fn get(&self, id: u32) -> Option<&Slot> {
        match self.slots.get(self.index(id))? {
            Entry::Used(i, slot) if *i == id => Some(slot),
            _ => None,
        }
    }

    fn get_mut(&mut self, id: u32) -> Option<&mut Slot> {
        match self.entry_mut(id)? {
            Entry::Used(_, slot) => Some(slot),
            Entry::Free => None,
        }
    }

    fn remove(&mut self, id: u32) -> Option<Slot> {
        match std::mem::replace(self.entry_mut(id)?, Entry::Free) {
            Entry::Used(_, slot) => Some(slot),
            Entry::Free => None,
        }
    }

    /// Whether `id` may be inserted: its slot is free.
    fn vacant(&self, id: u32) -> bool {
        matches!(self.slots[self.index(id)], Entry::Free)
    }

    /// Makes room for one more call beside the `len` it holds, so that the table stays at most
    /// three-quarters full: doubled, every entry moves to the slot of its id's one more low
    /// bit. Two ids in different slots differ in their low bits, so they still do with one
    /// bit more.
    fn reserve_one(&mut self, len: usize) {
        if (len + 1) * 4 <= self.slots.len() * 3 {
            return;
        }
        let size = (self.slots.len() * 2).max(FIRST_SLOTS);
        let old = std::mem::replace(&mut self.slots, Vec::with_capacity(size));
        self.slots.resize_with(size, || Entry::Free);
        for entry in old {
            if let Entry::Used(id, _) = entry {
                let at = self.index(id);
                self.slots[at] = entry;
            }
        }
    }

    /// Puts `slot` at `id`, whose slot must be [`vacant`](Self::vacant).
    fn insert(&mut self, id: u32, slot: Slot) {
        let at = self.index(id);
        debug_assert!(matches!(self.slots[at], Entry::Free));
        self.slots[at] = Entry::Used(id, slot);
    }

    /// Every call's id and slot, in no particular order.
    fn iter(&self) -> impl Iterator<Item = (u32, &Slot)> {
        self.slots.iter().filter_map(|e| match e {
            Entry::Used(id, slot) => Some((*id, slot)),
            Entry::Free => None,
        })
    }

    /// Every call's id and slot, emptying the table.
    fn into_slots(self) -> impl Iterator<Item = (u32, Slot)> {
        self.slots.into_iter().filter_map(|e| match e {
            Entry::Used(id, slot) => Some((id, slot)),
            Entry::Free => None,
        })
    }
}

/// A call's place in the deadline queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expiry {
    /// The deadline, in nanoseconds after [`Inner::epoch`]: 8 bytes where an `Instant` takes
    /// 16, so that an entry is 16 bytes.
    at: u64,
    id: u32,
    /// Told apart from an earlier call with the same id: the slot holds the same number. It
    /// wraps after 2^32 entries, far more than are queued while one entry waits for its
    /// deadline.
    seq: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Dialing: calls queue in the outbox and wait for the outcome.
    Connecting,
    /// Calls go out.
    Connected,
    /// The server sent GOAWAY(draining): no new calls on this connection.
    Draining,
    /// Flushing a final GOAWAY before the connection closes.
    Closing,
    /// Between dials: calls fail at once with this cause.
    Backoff(Arc<str>),
    /// The client was dropped.
    Closed,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) phase: Phase,
    /// Bumped for every connection; a writer or a call from an older connection sees it changed.
    pub(crate) gen: Gen,
    pub(crate) outbox: Outbox,
    pub(crate) pending: Calls,
    next_id: u32,
    pub(crate) live: usize,
    /// The most calls live lately: raised with `live`, decayed by an eighth per write. Tells
    /// the writer how many callers the connection has, which `live` alone, dipping as a batch
    /// of replies is delivered, does not.
    live_high: usize,
    pub(crate) abandoned: usize,
    /// Ids in the order they were issued; kept only when overflow fails the oldest call.
    order: VecDeque<u32>,
    /// The deadlines of calls that have the client's default timeout, in the order the calls
    /// started (so, but for the microseconds between a caller's clock read and its turn on
    /// the lock, in deadline order). The connection task times them out (`Shared::expire`):
    /// one timer for the connection instead of one per call. Entries of calls that ended are
    /// dropped from the front as calls start, and all at once when they outnumber the calls.
    deadlines: VecDeque<Expiry>,
    /// The last [`Expiry::seq`] given out.
    expiry_seq: u32,
    /// What [`Expiry::at`] counts from: when the client was made.
    epoch: Instant,
    /// When the in-flight table last went from empty to non-empty: a stall is measured from the
    /// later of this and the last byte received.
    pub(crate) busy_since: Option<Instant>,
    /// Non-empty takes by the writer of this generation (see [`Slot::Waiting`]).
    takes: u64,
    /// Whether this connection is counted as up in [`Shared::health`].
    counted_up: bool,
    /// `Client::close` was called: no new calls; the connection closes once the live ones end.
    pub(crate) closing: bool,
    /// Calls that stopped waiting under this lock: their slots of [`Shared::permits`] go back
    /// when it is released ([`Locked`]), once for all of them.
    freed: usize,
    /// CANCELs sent in the current second, against [`protocol::MAX_CANCELS_PER_SEC`].
    cancels: PerSecond,
}

/// Why [`Shared::start`] did not queue a call.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Wait-for-ready: no connection now; wait for one and try again.
    Park,
    Fail(Error),
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        Refusal::Fail(e)
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) inner: Padded<Mutex<Inner>>,
    pub(crate) notify_writer: Padded<Notify>,
    pub(crate) closed: CancellationToken,
    pub(crate) counters: Arc<Counters>,
    pub(crate) config: Config,
    /// How many of the client's connections are up; shared by all of them, watched by
    /// wait-for-ready callers and `poll_ready`.
    pub(crate) health: Arc<watch::Sender<usize>>,
    /// Cancelled when the connection task has finished for good.
    pub(crate) finished: CancellationToken,
    /// The client's call slots under backpressure (`None` when overflow fails the oldest
    /// call), shared by its connections. A call takes one before it starts; once it is in the
    /// table the slot is the table's, given back when the call stops waiting (its reply, its
    /// deadline, its drop, the connection's loss): under the lock that is taken anyway, and
    /// given back once per release of it rather than once per call.
    pub(crate) permits: Option<Arc<Semaphore>>,
}

/// The lock on a connection's [`Inner`]: on release it gives back the call slots of calls
/// that stopped waiting while it was held (see [`Shared::permits`]).
pub(crate) struct Locked<'a> {
    guard: Option<MutexGuard<'a, Inner>>,
    permits: Option<&'a Semaphore>,
}

impl Deref for Locked<'_> {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        let freed = std::mem::take(&mut guard.freed);
        drop(guard);
        if let (Some(permits), true) = (self.permits, freed > 0) {
            permits.add_permits(freed);
        }
    }
}

impl Shared {
    pub(crate) fn new(
        config: Config,
        health: Arc<watch::Sender<usize>>,
        counters: Arc<Counters>,
        permits: Option<Arc<Semaphore>>,
    ) -> Shared {
        Shared {
            inner: Padded(Mutex::new(Inner {
                phase: Phase::Connecting,
                gen: 0,
                outbox: Outbox::provisional(config.max_frame_len),
                pending: Calls::default(),
                next_id: 0,
                live: 0,
                live_high: 0,
                abandoned: 0,
                order: VecDeque::new(),
                deadlines: VecDeque::new(),
                expiry_seq: 0,
                epoch: Instant::now(),
                cancels: PerSecond::new(Instant::now()),
                busy_since: None,
                takes: 0,
                counted_up: false,
                closing: false,
                freed: 0,
            })),
            notify_writer: Padded(Notify::new()),
            closed: CancellationToken::new(),
            counters,
            config,
            health,
            finished: CancellationToken::new(),
            permits,
        }
    }

    pub(crate) fn lock(&self) -> Locked<'_> {
        // A panic while holding this lock cannot leave the map half-updated in a way that
        // matters more than losing the client, so poisoning is ignored.
        Locked {
            guard: Some(self.inner.lock().unwrap_or_else(|e| e.into_inner())),
            permits: self.permits.as_deref(),
        }
    }

    fn unavailable(&self, cause: Option<&str>) -> Error {
        let e = Error::new(Kind::Unavailable).target(self.config.target.as_ref());
        match cause {
            Some(c) => e.with(c.to_string()),
            None => e,
        }
    }

    /// Whether a new call may be queued now; the error says why not.
    fn admit(&self, inner: &Inner) -> Result<()> {
        if inner.closing {
            return Err(Error::new(Kind::Closing).target(self.config.target.as_ref()));
        }
        match &inner.phase {
            Phase::Connecting | Phase::Connected => Ok(()),
            Phase::Draining | Phase::Closing => {
                Err(self.unavailable(Some("server is draining the connection")))
            }
            Phase::Backoff(cause) => Err(self.unavailable(Some(cause))),
            Phase::Closed => Err(Error::new(Kind::Closed)),
        }
    }

    /// Registers a call and queues its request, taking its parts out of `req` (which is left
    /// intact when the call is refused with [`Refusal::Park`]). `timeout` is what the server is
    /// told. Returns the id, the connection generation and the reply's receiver, and whether
    /// the call's deadline is in the connection's deadline queue: `queue` is the deadline when
    /// the caller wants it there, which is done when it is the client's default one (no
    /// timeout of its own, none inherited); the caller then arms no timer of its own.
    ///
    /// With `park` (wait-for-ready) a call is queued only on an established connection.
    pub(crate) fn start(
        &self,
        req: &mut Request,
        timeout: Option<Duration>,
        queue: Option<Instant>,
        park: bool,
    ) -> std::result::Result<(u32, Gen, oneshot::Receiver<Reply>, bool), Refusal> {
        // Allocated before the lock, which every caller and the reader contend for.
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        if park && inner.phase != Phase::Connected && !inner.closing {
            return match inner.phase {
                Phase::Closed => Err(Refusal::Fail(Error::new(Kind::Closed))),
                _ => Err(Refusal::Park),
            };
        }
        self.admit(&inner)?;
        // Replies that never come for abandoned calls must not grow the map without bound: at
        // the cap new calls are refused at once (the stall detector will close a server that
        // has stopped answering altogether).
        let was_empty = inner.outbox.is_empty();
        if inner.abandoned >= self.config.max_pending {
            return Err(Error::new(Kind::Overloaded)
                .target(self.config.target.as_ref())
                .into());
        }
        if inner.live >= self.config.max_pending {
            // Only reachable when overflow fails the oldest call (backpressure keeps `live`
            // under the cap through the semaphore).
            if !inner.fail_oldest(self) {
                return Err(Error::new(Kind::Overloaded)
                    .target(self.config.target.as_ref())
                    .into());
            }
        }
        let id = inner.next_free_id();
        let msg = Message::Request {
            id,
            timeout_ms: timeout_ms(timeout),
            method: std::mem::take(&mut req.method),
            metadata: std::mem::take(&mut req.metadata),
            body: std::mem::take(&mut req.body),
        };
        if let Err(e) = inner.outbox.push(&msg) {
            return Err(Error::new(Kind::Encode).with(e).into());
        }
        let takes = inner.takes;
        let own_deadline =
            !matches!(req.timeout, Timeout::Default) || crate::deadline::current().is_some();
        let queued = match queue {
            Some(deadline) if !own_deadline => inner.queue_deadline(id, deadline),
            _ => 0,
        };
        inner
            .pending
            .insert(id, Slot::Waiting(tx, takes, own_deadline, queued));
        if inner.live == 0 && inner.abandoned == 0 {
            inner.busy_since = Some(Instant::now());
        }
        inner.live += 1;
        inner.live_high = inner.live_high.max(inner.live);
        if self.config.fail_oldest {
            inner.order.push_back(id);
        }
        let gen = inner.gen;
        let can_write = inner.phase == Phase::Connected;
        drop(inner);
        if was_empty && can_write {
            self.notify_writer.notify_one();
        }
        Ok((id, gen, rx, queued != 0))
    }

    /// Times out the calls in the deadline queue whose deadline is `now` or past (as their own
    /// timer did: the id stays reserved, the server is told nothing, since it knows the same
    /// deadline). Returns the next deadline in the queue.
    pub(crate) fn expire(&self, now: Instant) -> Option<Instant> {
        let mut due = Vec::new();
        let mut inner = self.lock();
        // Up to the first call still waiting whose deadline is ahead: entries of calls that
        // have ended go too, so that the timer does not wake for them.
        while let Some(&e) = inner.deadlines.front() {
            if inner.expiry_is_live(&e) {
                if inner.instant(e.at) > now {
                    break;
                }
                if let Some(tx) = inner.give_up(e.id) {
                    inner.withdraw(e.id);
                    due.push(tx);
                }
            }
            inner.deadlines.pop_front();
        }
        if inner.closing && inner.live == 0 {
            self.closed.cancel();
        }
        let next = inner.deadlines.front().map(|e| inner.instant(e.at));
        drop(inner);
        for tx in due {
            let _ = tx.send(Err(super::timed_out(self)));
        }
        next
    }

    /// Registers the calls of a batch and queues all of its messages under one lock
    /// acquisition, so they leave together in one write (a batch larger than a frame becomes
    /// several frames, still in that write). `Message::Request`s are calls, their ids filled in
    /// here; other messages (one-way) are queued as they are. The same checks as [`start`]
    /// apply; the caller has made sure the batch holds at most `max_pending` calls.
    ///
    /// Returns, per message in order, the call's id and reply receiver (`None` for a one-way
    /// message) or why that message was refused, and the connection generation.
    ///
    /// [`start`]: Shared::start
    pub(crate) fn start_batch(&self, msgs: Vec<(Message, bool)>) -> Result<(Vec<Started>, Gen)> {
        let mut inner = self.lock();
        self.admit(&inner)?;
        let calls = msgs
            .iter()
            .filter(|(m, _)| matches!(m, Message::Request { .. }))
            .count();
        if calls > 0 && inner.abandoned >= self.config.max_pending {
            return Err(Error::new(Kind::Overloaded).target(self.config.target.as_ref()));
        }
        let was_empty = inner.outbox.is_empty();
        let mut started = Vec::with_capacity(msgs.len());
        let mut one_way = 0;
        for (mut msg, own_deadline) in msgs {
            let Message::Request { id, .. } = &mut msg else {
                match inner.outbox.push(&msg) {
                    Ok(()) => {
                        one_way += 1;
                        started.push(Ok(None));
                    }
                    Err(e) => started.push(Err(Error::new(Kind::Encode).with(e))),
                }
                continue;
            };
            if inner.live >= self.config.max_pending && !inner.fail_oldest(self) {
                let e = Error::new(Kind::Overloaded).target(self.config.target.as_ref());
                started.push(Err(e));
                continue;
            }
            let new_id = inner.next_free_id();
            *id = new_id;
            if let Err(e) = inner.outbox.push(&msg) {
                started.push(Err(Error::new(Kind::Encode).with(e)));
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let takes = inner.takes;
            inner
                .pending
                .insert(new_id, Slot::Waiting(tx, takes, own_deadline, 0));
            if inner.live == 0 && inner.abandoned == 0 {
                inner.busy_since = Some(Instant::now());
            }
            inner.live += 1;
            inner.live_high = inner.live_high.max(inner.live);
            if self.config.fail_oldest {
                inner.order.push_back(new_id);
            }
            started.push(Ok(Some((new_id, rx))));
        }
        let gen = inner.gen;
        let can_write = inner.phase == Phase::Connected;
        let queued = !inner.outbox.is_empty();
        drop(inner);
        if one_way > 0 {
            self.counters
                .one_way
                .fetch_add(one_way, std::sync::atomic::Ordering::Relaxed);
        }
        if was_empty && queued && can_write {
            self.notify_writer.notify_one();
        }
        Ok((started, gen))
    }

    /// Queues a one-way message (no id, no reply).
    pub(crate) fn send_one_way(&self, msg: Message) -> Result<()> {
        let mut inner = self.lock();
        self.admit(&inner)?;
        let was_empty = inner.outbox.is_empty();
        inner
            .outbox
            .push(&msg)
            .map_err(|e| Error::new(Kind::Encode).with(e))?;
        let can_write = inner.phase == Phase::Connected;
        drop(inner);
        Counters::inc(&self.counters.one_way);
        if was_empty && can_write {
            self.notify_writer.notify_one();
        }
        Ok(())
    }

    /// The caller of `id` gave up. Its id stays reserved until the server answers; with
    /// `cancel`, the server is told (best effort) so it can stop the handler.
    pub(crate) fn abandon(&self, id: u32, gen: Gen, cancel: bool) {
        let mut inner = self.lock();
        if inner.gen != gen {
            return;
        }
        if inner.give_up(id).is_none() {
            return;
        }
        if inner.closing && inner.live == 0 {
            self.closed.cancel();
        }
        if inner.withdraw(id) {
            return;
        }
        if cancel && matches!(inner.phase, Phase::Connected | Phase::Draining) {
            let was_empty = inner.outbox.is_empty();
            if inner.cancel(id) && was_empty {
                drop(inner);
                self.notify_writer.notify_one();
            }
        }
    }

    /// Fails every call of the current connection with `err()` and starts a new generation
    /// in `phase`. A call whose request never left the process (no take since it was queued,
    /// or a large one still waiting whole behind another's fragments) fails as unavailable
    /// instead, which says it is safe to send again.
    pub(crate) fn reset(&self, phase: Phase, err: impl Fn() -> Error) {
        let mut inner = self.lock();
        let pending = std::mem::take(&mut inner.pending);
        let takes = inner.takes;
        // Only a connection that was up can have lost a request before writing it; a failed
        // dial reports its own cause.
        let was_up = matches!(
            inner.phase,
            Phase::Connected | Phase::Draining | Phase::Closing
        );
        inner.freed += inner.live;
        inner.live = 0;
        inner.abandoned = 0;
        inner.order.clear();
        inner.deadlines.clear();
        inner.busy_since = None;
        inner.gen = inner.gen.wrapping_add(1);
        inner.takes = 0;
        let outbox = std::mem::replace(
            &mut inner.outbox,
            Outbox::provisional(self.config.max_frame_len),
        );
        self.enter(&mut inner, phase);
        if inner.closing {
            self.closed.cancel();
        }
        drop(inner);
        let unsent = outbox.unsent_calls();
        drop(outbox);
        for (id, slot) in pending.into_slots() {
            if let Slot::Waiting(tx, queued_at, ..) = slot {
                let e = err();
                let never_left = queued_at == takes || unsent.binary_search(&id).is_ok();
                let e = if was_up && never_left && !e.is_retry_safe() {
                    Error::new(Kind::Unavailable)
                        .target(self.config.target.as_ref())
                        .with(format!(
                            "connection lost before the request was written: {e}"
                        ))
                } else {
                    e
                };
                let _ = tx.send(Err(e));
            }
        }
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        let mut inner = self.lock();
        self.enter(&mut inner, phase);
    }

    /// Moves to `phase` (a closed client stays closed) and keeps [`Shared::health`] true.
    pub(crate) fn enter(&self, inner: &mut Inner, phase: Phase) {
        if inner.phase != Phase::Closed {
            inner.phase = phase;
        }
        let up = inner.phase == Phase::Connected;
        if up != inner.counted_up {
            inner.counted_up = up;
            self.health.send_modify(|n| {
                if up {
                    *n += 1;
                } else {
                    *n -= 1;
                }
            });
        }
    }

    /// Stops new calls; the connection closes (flushing what is queued) once the live calls
    /// have ended.
    pub(crate) fn close(&self) {
        let mut inner = self.lock();
        inner.closing = true;
        let idle = inner.live == 0 || inner.phase != Phase::Connected;
        drop(inner);
        if idle {
            self.closed.cancel();
        }
        // Wake whoever waits for a connection: they fail now.
        self.health.send_modify(|_| {});
    }

    /// Live calls: the load a balancer weighs.
    pub(crate) fn live(&self) -> usize {
        self.lock().live
    }

    /// Live and abandoned calls awaiting replies.
    pub(crate) fn in_flight(&self) -> usize {
        let inner = self.lock();
        inner.live + inner.abandoned
    }
}

/// A call's timeout as the wire carries it: whole milliseconds, 0 for none.
pub(crate) fn timeout_ms(timeout: Option<Duration>) -> u32 {
    match timeout {
        // Round up so a short deadline never reaches the server as "none" (0).
        Some(t) => t.as_micros().div_ceil(1000).clamp(1, u32::MAX as u128) as u32,
        None => 0,
    }
}

impl Inner {
    fn next_free_id(&mut self) -> u32 {
        // Ids wrap after 2^32 calls; one whose slot is taken (by a call still awaiting a reply,
        // or one with the same low bits) is skipped, so an id is never reused while a reply for
        // it may arrive. The table is at most three-quarters full and live ids are mostly
        // consecutive, so the loop ends quickly.
        self.pending.reserve_one(self.live + self.abandoned);
        loop {
            self.next_id = self.next_id.wrapping_add(1);
            if self.next_id != 0 && self.pending.vacant(self.next_id) {
                return self.next_id;
            }
        }
    }

    /// Fails the oldest live call with `Overloaded` to make room. False if there is none.
    fn fail_oldest(&mut self, shared: &Shared) -> bool {
        while let Some(id) = self.order.pop_front() {
            if let Some(tx) = self.give_up(id) {
                let _ = tx.send(Err(
                    Error::new(Kind::Overloaded).target(shared.config.target.as_ref())
                ));
                if !self.withdraw(id) && self.phase == Phase::Connected {
                    self.cancel(id);
                }
                return true;
            }
        }
        false
    }

    /// The server has answered no call for the stall bound although it is alive (it answers
    /// PINGs): its handlers are stuck. Every waiting call that has no deadline of its own fails
    /// at once with `is_stalled()`, rather than waiting out the client's default timeout, and
    /// the server is told to stop it (CANCEL, within the budget). Calls with their own deadline
    /// keep waiting for it. Returns how many failed, and whether the writer needs a wake-up.
    pub(crate) fn fail_stuck(
        &mut self,
        shared: &Shared,
        out: &mut Vec<(oneshot::Sender<Reply>, Reply)>,
    ) -> bool {
        let was_empty = self.outbox.is_empty();
        let mut cancelled = false;
        let ids: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Waiting(_, _, false, _)))
            .map(|(id, _)| id)
            .collect();
        for id in ids {
            let Some(tx) = self.give_up(id) else {
                continue;
            };
            Counters::inc(&shared.counters.timeouts);
            let e = Error::new(Kind::Stalled)
                .target(shared.config.target.as_ref())
                .with("the server answers pings but no calls".to_string());
            out.push((tx, Err(e)));
            cancelled |= self.cancel(id);
        }
        cancelled && was_empty
    }

    /// Queues a CANCEL for `id`, a call given up whose request has left, if this second's
    /// budget has room ([`protocol::MAX_CANCELS_PER_SEC`]); returns whether it did. Past the
    /// budget the server is not told: its handler runs on, and the reply is dropped when it
    /// comes (the id stays reserved until then), as for any CANCEL that crosses its reply.
    fn cancel(&mut self, id: u32) -> bool {
        self.cancels
            .admit(Instant::now(), protocol::MAX_CANCELS_PER_SEC)
            && self.outbox.push(&Message::Cancel { id }).is_ok()
    }

    /// Takes the request of `id`, a call just given up, back out of the outbox if none of it
    /// has left yet (a large one waiting for its fragments' turn, see `Outbox::withdraw`):
    /// the server never sees it, no reply will come, and the id is free at once. Returns
    /// whether it did; if not, the request is (or will be) on the wire, and the id stays
    /// reserved until its reply.
    fn withdraw(&mut self, id: u32) -> bool {
        if !self.outbox.withdraw(id) {
            return false;
        }
        let slot = self.pending.remove(id);
        debug_assert!(
            matches!(slot, Some(Slot::Abandoned)),
            "withdrawn before given up"
        );
        if let Some(Slot::Abandoned) = slot {
            self.abandoned -= 1;
        }
        self.left_the_table();
        true
    }

    /// A call's slot left the table: with none left, nothing is in flight, and a stall is no
    /// longer timed ([`Inner::busy_since`]).
    fn left_the_table(&mut self) {
        if self.live == 0 && self.abandoned == 0 {
            self.busy_since = None;
        }
    }

    /// The caller of `id` is no longer waiting: its slot stays, abandoned, until the server's
    /// reply (so the id is not reused while one may come). Returns the caller's sender if it
    /// was still waiting.
    fn give_up(&mut self, id: u32) -> Option<oneshot::Sender<Reply>> {
        let slot = self.pending.get_mut(id)?;
        if matches!(slot, Slot::Abandoned) {
            return None;
        }
        let Slot::Waiting(tx, ..) = std::mem::replace(slot, Slot::Abandoned) else {
            unreachable!("matched just above")
        };
        self.live -= 1;
        self.abandoned += 1;
        self.freed += 1;
        Some(tx)
    }

    /// Puts call `id`'s `deadline` in the deadline queue; returns its [`Expiry::seq`]. First
    /// drops entries of calls that have ended: a few from the front (calls mostly end in the
    /// order they started), and all of them once they outnumber the live calls by half, so
    /// that a call stuck at the front does not make the queue grow with every call after it.
    fn queue_deadline(&mut self, id: u32, deadline: Instant) -> u32 {
        for _ in 0..2 {
            match self.deadlines.front() {
                Some(e) if !self.expiry_is_live(e) => self.deadlines.pop_front(),
                _ => break,
            };
        }
        // At 1.5 × live the queue of 10,000 calls stays under 16,384 entries (384 KiB), where
        // 2 × live made it double to 32,768 behind a call that ended late.
        if self.deadlines.len() > self.live + self.live / 2 + 64 {
            let mut deadlines = std::mem::take(&mut self.deadlines);
            deadlines.retain(|e| self.expiry_is_live(e));
            self.deadlines = deadlines;
        }
        // 0 means "no entry" in a slot.
        self.expiry_seq = self.expiry_seq.checked_add(1).unwrap_or(1);
        let at = deadline.saturating_duration_since(self.epoch).as_nanos();
        self.deadlines.push_back(Expiry {
            at: u64::try_from(at).unwrap_or(u64::MAX),
            id,
            seq: self.expiry_seq,
        });
        self.expiry_seq
    }

    /// The instant `at` nanoseconds after the epoch (see [`Expiry::at`]).
    fn instant(&self, at: u64) -> Instant {
        self.epoch + Duration::from_nanos(at)
    }

    /// Whether `e` is the entry of a call still waiting.
    fn expiry_is_live(&self, e: &Expiry) -> bool {
        matches!(self.pending.get(e.id), Some(Slot::Waiting(.., seq)) if *seq == e.seq)
    }

    /// Delivers a reply from the server to its call, as [`complete`](Self::complete) does,
    /// unless not one byte of the call's request has left (nothing taken since it was queued,
    /// or a large one still waiting whole): no server can be answering it (PROTOCOL.md §6,
    /// §12), and the reply is a protocol error. The call stays, for the connection's end to
    /// fail.
    ///
    /// A request taken by the writer and not yet written counts as sent: its write can hand
    /// the bytes to the kernel, and the server answer, before the writer is back to note it,
    /// so no check there could tell an honest reply from a guessed one.
    pub(crate) fn answer(
        &mut self,
        id: u32,
        reply: Reply,
        out: &mut Vec<(oneshot::Sender<Reply>, Reply)>,
    ) -> std::result::Result<(), &'static str> {
        if let Some(Slot::Waiting(_, queued_at, ..)) = self.pending.get(id) {
            if *queued_at == self.takes || self.outbox.unsent(id) {
                return Err("reply to a request that was not sent");
            }
        }
        self.complete(id, reply, out)
    }

    /// Delivers replies; `Err` names a protocol violation (a reply to an id not awaiting one).
    pub(crate) fn complete(
        &mut self,
        id: u32,
        reply: Reply,
        out: &mut Vec<(oneshot::Sender<Reply>, Reply)>,
    ) -> std::result::Result<(), &'static str> {
        match self.pending.remove(id) {
            Some(Slot::Waiting(tx, ..)) => {
                self.live -= 1;
                self.freed += 1;
                out.push((tx, reply));
            }
            Some(Slot::Abandoned) => self.abandoned -= 1,
            None => return Err("reply to a request id that is not awaiting one"),
        }
        self.left_the_table();
        Ok(())
    }

    /// Queues a message from the connection itself (pong, goaway). Returns whether the writer
    /// needs a wake-up.
    pub(crate) fn push_control(&mut self, msg: &Message) -> bool {
        let was_empty = self.outbox.is_empty();
        self.outbox.push(msg).is_ok() && was_empty
    }
}

/// The writer's view of the shared state: one connection generation's outbox.
#[derive(Debug)]
pub(crate) struct ConnSource {
    pub(crate) shared: Arc<Shared>,
    pub(crate) gen: Gen,
}

impl Source for ConnSource {
    fn take(&self, spare: Batch) -> Option<Batch> {
        let mut inner = self.shared.lock();
        if inner.gen != self.gen {
            return None;
        }
        let taken = match inner.phase {
            Phase::Connected | Phase::Draining => inner.outbox.take(spare),
            Phase::Closing if !inner.outbox.is_drained() => inner.outbox.take(spare),
            _ => return None,
        };
        if !taken.is_empty() {
            inner.takes += 1;
            inner.live_high -= inner.live_high / 8;
        }
        Some(taken)
    }

    fn pending_len(&self) -> usize {
        self.shared.lock().outbox.len()
    }

    fn batch_yields(&self) -> usize {
        // Calls whose requests are not in the outbox are on the wire, and their callers
        // (closed-loop ones at least) will send again once the replies arrive.
        let inner = self.shared.lock();
        if inner.live <= inner.outbox.queued() {
            0
        } else if inner.live_high < FEW_IN_FLIGHT {
            // Waiting for the batch to stop growing would gather nearly every call into it,
            // and the two ends would take turns, each idle while the other works on the one
            // batch in flight. Sent sooner, the rest follow in the next batch and both ends
            // stay busy. With many calls, batches are large either way and waiting saves
            // writes.
            1
        } else {
            MAX_BATCH_YIELDS
        }
    }
}

/// With fewer calls than this in flight, the client's writer yields once at most for its
/// batch to grow (see `batch_yields`).
const FEW_IN_FLIGHT: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Source;

    fn shared() -> Arc<Shared> {
        shared_with(None)
    }

    fn shared_with(permits: Option<Arc<Semaphore>>) -> Arc<Shared> {
        let config = crate::client::Builder::new().into_config();
        let shared = Shared::new(
            config,
            Arc::new(watch::Sender::new(0)),
            Arc::new(Counters::default()),
            permits,
        );
        shared.set_phase(Phase::Connected);
        Arc::new(shared)
    }

    fn lost() -> Error {
        Error::new(Kind::ConnectionLost)
    }

    #[tokio::test]
    async fn ids_wrap_past_zero_and_skip_those_still_awaiting_a_reply() {
        let shared = shared();
        let start = |body: &'static str| {
            let mut req = Request::new("M", body);
            let (id, _, rx, _) = shared.start(&mut req, None, None, false).unwrap();
            (id, rx)
        };
        let (one, _a) = start("a");
        let (two, _b) = start("b");
        assert_eq!((one, two), (1, 2));
        shared.lock().next_id = u32::MAX - 1;
        let ids: Vec<u32> = (0..3).map(|_| start("c").0).collect();
        // u32::MAX, then neither 0 (never an id) nor 1 and 2 (their replies may come).
        assert_eq!(ids, [u32::MAX, 3, 4]);
    }

    #[test]
    fn the_call_table_grows_keeps_its_calls_and_matches_whole_ids() {
        let slot = |n: u64| Slot::Waiting(oneshot::channel().0, n, false, 0);
        let mut calls = Calls::default();
        assert!(calls.get(1).is_none());
        // Ids 1..=200 (growing the table past its first size several times), then every
        // other one answered.
        for id in 1..=200 {
            calls.reserve_one(id as usize - 1);
            assert!(calls.vacant(id));
            calls.insert(id, slot(u64::from(id)));
        }
        assert!(calls.slots.len() >= 256 && calls.iter().count() == 200);
        for id in (1..=200).step_by(2) {
            assert!(
                matches!(calls.remove(id), Some(Slot::Waiting(_, n, ..)) if n == u64::from(id))
            );
        }
        assert!(calls.remove(1).is_none());
        for id in 1..=200u32 {
            let want = id % 2 == 0;
            assert_eq!(calls.get(id).is_some(), want, "{id}");
        }
        // A reply whose id shares a live call's low bits is not that call's.
        let size = calls.slots.len() as u32;
        assert!(calls.get(2 + size).is_none() && calls.remove(2 + size).is_none());
        assert!(!calls.vacant(2 + size) && calls.vacant(1 + size));
        assert_eq!(calls.iter().count(), 100);
        assert_eq!(calls.into_slots().count(), 100);
        // An entry is no bigger than a slot and its id, padded.
        assert!(std::mem::size_of::<Entry>() <= 32);
    }

    #[tokio::test]
    async fn ids_skip_slots_taken_by_calls_still_awaiting_a_reply() {
        let shared = shared();
        let start = || {
            let (id, _, rx, _) = shared
                .start(&mut Request::new("M", "x"), None, None, false)
                .unwrap();
            (id, rx)
        };
        // Call 1 never gets its reply; thousands after it do.
        let (stuck, _rx) = start();
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5_000 {
            let (id, _rx) = start();
            assert_ne!(id, stuck);
            assert!(seen.insert(id), "id {id} given out twice");
            shared
                .lock()
                .complete(id, Ok(Response::new(bytes::Bytes::new())), &mut out)
                .unwrap();
        }
        let inner = shared.lock();
        assert!(inner.pending.get(stuck).is_some());
        assert_eq!(inner.pending.slots.len(), FIRST_SLOTS);
    }

    #[tokio::test]
    async fn call_slots_go_back_when_calls_stop_waiting_once_per_release_of_the_lock() {
        let slots = Arc::new(Semaphore::new(4));
        let shared = shared_with(Some(slots.clone()));
        // As the client does: a slot taken, then the table's once the call is in it.
        let start = |deadline: Option<Instant>| {
            slots.try_acquire().unwrap().forget();
            let (id, gen, rx, _) = shared
                .start(&mut Request::new("M", "x"), None, deadline, false)
                .unwrap();
            (id, gen, rx)
        };
        let reply = || Ok(Response::new(bytes::Bytes::new()));
        let mut out = Vec::new();
        let calls: Vec<_> = (0..4).map(|_| start(None)).collect();
        assert_eq!(slots.available_permits(), 0);

        // A reply.
        shared
            .lock()
            .complete(calls[0].0, reply(), &mut out)
            .unwrap();
        assert_eq!(slots.available_permits(), 1);
        // Two replies under one lock: both slots come back when it is released.
        {
            let mut inner = shared.lock();
            inner.complete(calls[1].0, reply(), &mut out).unwrap();
            inner.complete(calls[2].0, reply(), &mut out).unwrap();
            assert_eq!(slots.available_permits(), 1);
        }
        assert_eq!(slots.available_permits(), 3);
        // A caller that gives up (its future dropped); its late reply frees nothing more.
        let (id, gen, _) = calls[3];
        shared.abandon(id, gen, true);
        assert_eq!(slots.available_permits(), 4);
        shared.lock().complete(id, reply(), &mut out).unwrap();
        assert_eq!(slots.available_permits(), 4);

        // The connection's deadline queue.
        let now = Instant::now();
        let _due = start(Some(now));
        assert_eq!(slots.available_permits(), 3);
        shared.expire(now);
        assert_eq!(slots.available_permits(), 4);

        // The connection lost with calls waiting (and one abandoned, whose slot is back).
        let (gone, gen, _) = start(None);
        let _rest: Vec<_> = (0..3).map(|_| start(None)).collect();
        shared.abandon(gone, gen, false);
        assert_eq!(slots.available_permits(), 1);
        shared.reset(Phase::Connecting, lost);
        assert_eq!(slots.available_permits(), 4);
    }

    #[tokio::test]
    async fn a_call_lost_before_its_write_is_retry_safe() {
        let shared = shared();
        let mut req = Request::new("M", "x");
        let (_, gen, mut unsent, _) = shared.start(&mut req, None, None, false).unwrap();
        // The writer never took it: the connection dies with the request still queued.
        shared.set_phase(Phase::Closing);
        shared.reset(Phase::Connecting, lost);
        let err = unsent.try_recv().unwrap().unwrap_err();
        assert!(err.is_unavailable() && err.is_retry_safe(), "{err:?}");
        assert_eq!(*shared.health.borrow(), 0);

        // Taken by the writer: it may have been sent, so the connection's error stands.
        shared.set_phase(Phase::Connected);
        assert_eq!(*shared.health.borrow(), 1);
        let mut req = Request::new("M", "y");
        let (_, gen2, mut sent, _) = shared.start(&mut req, None, None, false).unwrap();
        assert_ne!(gen, gen2);
        let source = ConnSource {
            shared: shared.clone(),
            gen: gen2,
        };
        assert!(!source.take(Batch::default()).unwrap().is_empty());
        shared.reset(Phase::Connecting, lost);
        let err = sent.try_recv().unwrap().unwrap_err();
        assert!(err.is_closed() && !err.is_retry_safe(), "{err:?}");
    }

    #[tokio::test]
    async fn wait_for_ready_parks_until_connected() {
        let shared = shared();
        shared.set_phase(Phase::Backoff("down".into()));
        let mut req = Request::new("M", "x");
        assert!(matches!(
            shared.start(&mut req, None, None, true),
            Err(Refusal::Park)
        ));
        // Parked calls keep their request intact for the next try.
        assert_eq!(&req.body()[..], b"x");
        assert!(matches!(
            shared.start(&mut req, None, None, false),
            Err(Refusal::Fail(e)) if e.is_unavailable()
        ));
        shared.set_phase(Phase::Connected);
        assert!(shared.start(&mut req, None, None, true).is_ok());
        shared.close();
        assert!(matches!(
            shared.start(&mut Request::new("M", "z"), None, None, true),
            Err(Refusal::Fail(e)) if e.is_closed() && e.is_retry_safe()
        ));
    }

    #[tokio::test]
    async fn the_writer_waits_longer_for_batches_only_with_many_callers() {
        let shared = shared();
        let source = ConnSource {
            shared: shared.clone(),
            gen: shared.lock().gen,
        };
        let start = |n: usize| -> Vec<(u32, Gen, oneshot::Receiver<Reply>, bool)> {
            (0..n)
                .map(|_| {
                    shared
                        .start(&mut Request::new("M", "x"), None, None, false)
                        .unwrap()
                })
                .collect()
        };
        // One caller, its request queued: nothing more can come, write at once.
        let first = start(1);
        assert_eq!(source.batch_yields(), 0);
        // On the wire, with a hundred callers: one yield.
        assert!(!source.take(Batch::default()).unwrap().is_empty());
        let mut calls = start(99);
        calls.extend(first);
        assert!(!source.take(Batch::default()).unwrap().is_empty());
        assert_eq!(source.batch_yields(), 1);
        // A thousand: as many yields as the batch keeps growing.
        calls.extend(start(900));
        assert!(!source.take(Batch::default()).unwrap().is_empty());
        assert_eq!(source.batch_yields(), MAX_BATCH_YIELDS);
        // Replies delivered in a batch make `live` dip; the callers are still there.
        let mut out = Vec::new();
        for (id, ..) in calls.iter().take(800) {
            shared
                .lock()
                .complete(
                    *id,
                    Ok(Response::new(bytes::Bytes::from_static(b"y"))),
                    &mut out,
                )
                .unwrap();
        }
        assert_eq!(shared.live(), 200);
        assert_eq!(source.batch_yields(), MAX_BATCH_YIELDS);
    }

    #[tokio::test]
    async fn the_deadline_queue_times_out_due_calls_and_stays_small() {
        let shared = shared();
        let t0 = Instant::now();
        let secs = |n: u64| t0 + Duration::from_secs(n);
        let start = |deadline: Instant| {
            shared
                .start(&mut Request::new("M", "x"), None, Some(deadline), false)
                .unwrap()
        };
        let (_, _, mut stuck, queued) = start(secs(10));
        assert!(queued);
        // A call with a timeout of its own keeps its own timer.
        let mut own = Request::new("M", "x");
        own.set_timeout(Some(Duration::from_secs(1)));
        let (.., queued) = shared.start(&mut own, None, Some(secs(1)), false).unwrap();
        assert!(!queued);
        // Thousands of calls start and end behind the stuck one: the queue stays near the
        // number of live calls.
        let mut out = Vec::new();
        for n in 0..10_000 {
            let (id, ..) = start(secs(20 + n));
            shared
                .lock()
                .complete(id, Ok(Response::new(bytes::Bytes::new())), &mut out)
                .unwrap();
            let inner = shared.lock();
            assert!(inner.deadlines.len() <= inner.live + inner.live / 2 + 65);
        }
        let (_, _, mut late, _) = start(secs(30_000));
        // Nothing is due before its deadline; at it, the stuck call times out, counted.
        assert_eq!(shared.expire(secs(9)), Some(secs(10)));
        assert!(stuck.try_recv().is_err());
        assert_eq!(shared.expire(secs(10)), Some(secs(30_000)));
        let err = stuck.try_recv().unwrap().unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert_eq!(
            shared
                .counters
                .timeouts
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // Its id stays reserved for the reply that may still come.
        assert_eq!(shared.live(), 2);
        assert!(late.try_recv().is_err());
    }

    #[tokio::test]
    async fn deadline_entries_stay_small_and_their_numbers_wrap_past_zero() {
        // Per live call: an entry in the pending table and one in the deadline queue.
        assert!(std::mem::size_of::<Slot>() <= 24);
        assert!(std::mem::size_of::<Expiry>() <= 16);
        let shared = shared();
        let deadline = Instant::now() + Duration::from_secs(10);
        shared.lock().expiry_seq = u32::MAX - 1;
        let mut rxs = Vec::new();
        for want in [u32::MAX, 1, 2] {
            let (id, _, rx, queued) = shared
                .start(&mut Request::new("M", "x"), None, Some(deadline), false)
                .unwrap();
            assert!(queued);
            rxs.push(rx);
            let inner = shared.lock();
            assert!(matches!(inner.pending.get(id), Some(Slot::Waiting(.., seq)) if *seq == want));
        }
        // All three are live entries, and all three time out.
        assert_eq!(shared.expire(deadline), None);
        for mut rx in rxs {
            assert!(rx.try_recv().unwrap().unwrap_err().is_timeout());
        }
    }
}
