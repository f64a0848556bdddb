//! [`Gate`]: the connection bound every ckptd server shares (the webhook, both metrics endpoints,
//! the agent's trainer socket).
//!
//! A plain semaphore bounds connections, but lets peers that connect and then say nothing hold
//! every slot until their timeouts fire, so a handful of idle clients starve the ones that talk.
//! The gate tells the two apart: a connection is *fresh* from accept until its server sees a whole
//! request from it, and *established* after that. When every slot is taken, a new connection
//! evicts the oldest fresh one; only when every connection is established does it wait for a
//! slot, and established connections are bounded by their servers' request deadlines and
//! keepalives. A fresh connection also ends by itself after the server's fresh deadline.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// A bound on open connections that evicts idle newcomers before it makes anyone wait.
#[derive(Debug)]
pub struct Gate {
    slots: Arc<Semaphore>,
    size: usize,
    /// Fresh connections by admission order, each with the token that evicts it.
    fresh: Mutex<BTreeMap<u64, CancellationToken>>,
    next: AtomicU64,
}

impl Gate {
    /// A gate for at most `size` connections (at least one).
    pub fn new(size: usize) -> Arc<Gate> {
        let size = size.max(1);
        Arc::new(Gate {
            slots: Arc::new(Semaphore::new(size)),
            size,
            fresh: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
        })
    }

    /// Admits one connection: takes a free slot, or evicts the oldest fresh connection and takes
    /// its slot, or (every connection established) waits for one. Call it before accepting, so
    /// that a server at its bound leaves new peers in the kernel's accept queue.
    pub async fn admit(self: &Arc<Self>) -> Admission {
        let permit = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.evict_oldest_fresh();
                match Arc::clone(&self.slots).acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => unreachable!("the gate never closes its semaphore"),
                }
            }
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = CancellationToken::new();
        self.lock().insert(id, evicted.clone());
        Admission { ticket: Ticket { gate: Arc::clone(self), id }, evicted, _permit: permit }
    }

    /// Evicts the oldest fresh connection, if any; returns whether it did. Servers call it when
    /// accept fails for want of file descriptors, so that idle peers give theirs back.
    pub fn evict_oldest_fresh(&self) -> bool {
        let oldest = self.lock().pop_first();
        match oldest {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.size - self.slots.available_permits()
    }

    /// Waits until every connection has closed, for at most `grace`; returns whether they did.
    pub async fn drained(&self, grace: Duration) -> bool {
        tokio::time::timeout(grace, self.slots.acquire_many(self.size as u32)).await.is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, CancellationToken>> {
        self.fresh.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One admitted connection. Dropping it frees the slot.
#[derive(Debug)]
pub struct Admission {
    ticket: Ticket,
    evicted: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl Admission {
    /// The handle the server's request path uses to mark the connection established.
    pub fn ticket(&self) -> Ticket {
        self.ticket.clone()
    }

    /// Resolves when the connection must close: the gate evicted it, or it stayed fresh for
    /// `fresh_for` (no whole request in that time).
    pub async fn must_close(&self, fresh_for: Duration) {
        let stale = async {
            tokio::time::sleep(fresh_for).await;
            if self.ticket.is_fresh() {
                return;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = self.evicted.cancelled() => {}
            () = stale => {}
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.ticket.established();
    }
}

/// Marks a connection established; cheap to clone into per-request code.
#[derive(Debug, Clone)]
pub struct Ticket {
    gate: Arc<Gate>,
    id: u64,
}

impl Ticket {
    /// The connection delivered a whole request: it is no longer evicted for newcomers and no
    /// longer bound by the fresh deadline.
    pub fn established(&self) {
        self.gate.lock().remove(&self.id);
    }

    fn is_fresh(&self) -> bool {
        self.gate.lock().contains_key(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_gate_evicts_the_oldest_fresh_connection_first() {
        let gate = Gate::new(2);
        let a = gate.admit().await;
        let b = gate.admit().await;
        b.ticket().established();
        assert_eq!(gate.open(), 2);
        // `a` is evicted for the newcomer; `b` is established and stays.
        let c = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.admit().await }
        });
        a.must_close(Duration::from_secs(3600)).await;
        drop(a);
        let c = c.await.unwrap();
        assert_eq!(gate.open(), 2);
        // Every connection established: a newcomer waits for a slot instead of evicting.
        c.ticket().established();
        assert!(!gate.evict_oldest_fresh());
        let waiting = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.admit().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(b);
        let d = waiting.await.unwrap();
        drop((c, d));
        assert!(gate.drained(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_stays_fresh_must_close_after_its_deadline_and_an_established_one_need_not() {
        let gate = Gate::new(4);
        let fresh = gate.admit().await;
        fresh.must_close(Duration::from_secs(10)).await;
        let talking = gate.admit().await;
        talking.ticket().established();
        let closed = tokio::time::timeout(Duration::from_secs(60), talking.must_close(Duration::from_secs(10))).await;
        assert!(closed.is_err(), "an established connection is not closed by the fresh deadline");
    }
}
