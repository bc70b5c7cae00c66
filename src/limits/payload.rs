//! The process's budget of large-payload bytes in flight.
//!
//! A payload is large when it is over the small cap (`ws.max_frame_bytes`): only image and
//! audio messages may be, and padding can make any frame look like one until it is read.
//! Each large payload holds permits for its bytes from the moment its size is known (a
//! WebSocket frame header, a REST `Content-Length`), before anything allocates for it,
//! until the work on it is done (stored and published, or refused); large frames written
//! to sockets hold permits while they sit in the write buffer. So N concurrent maximum-size
//! sends cannot hold more than the budget, whatever N is: the excess waits up to
//! `memory.large_payload_wait_ms` and is then refused (`server_busy`, with when to retry),
//! never an out-of-memory kill.
//!
//! Usage policy: acquire before reading or copying the bytes, keep the [`PayloadPermit`]
//! next to the data it covers, drop it when the data is gone.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

/// Refused: the budget stayed full for the whole wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// A suggestion for when to try again.
    pub retry_after: Duration,
}

/// Permits for one large payload's bytes (none for a small one); dropping it gives them
/// back.
#[derive(Debug, Default)]
pub struct PayloadPermit(Option<OwnedSemaphorePermit>);

impl PayloadPermit {
    /// Takes over `other`'s permits too (a message whose fragments arrived one by one).
    pub fn merge(&mut self, other: PayloadPermit) {
        match (&mut self.0, other.0) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (mine @ None, theirs) => *mine = theirs,
            (Some(_), None) => {}
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }
}

impl From<OwnedSemaphorePermit> for PayloadPermit {
    fn from(permit: OwnedSemaphorePermit) -> Self {
        Self(Some(permit))
    }
}

/// The budget: one semaphore whose permits are bytes.
#[derive(Debug)]
pub struct PayloadBudget {
    semaphore: Arc<Semaphore>,
    total: usize,
    small: usize,
    wait: Duration,
}

impl PayloadBudget {
    /// `total` bytes in flight at most; payloads up to `small` bytes are not counted;
    /// a large one waits at most `wait` for room.
    pub fn new(total: usize, small: usize, wait: Duration) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            total,
            small,
            wait,
        }
    }

    /// The small cap: payloads up to this size need no permit.
    pub fn small(&self) -> usize {
        self.small
    }

    /// How long a large payload waits for room before it is refused.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// Bytes currently held by large payloads.
    pub fn in_use(&self) -> usize {
        self.total
            .saturating_sub(self.semaphore.available_permits())
    }

    /// What to tell a refused client: the budget turns over within about one wait.
    pub fn busy(&self) -> Busy {
        Busy {
            retry_after: self.wait.max(Duration::from_secs(1)),
        }
    }

    /// The permits a payload of `bytes` needs (0 when it is small). Never more than the
    /// whole budget, so a payload the config admits can always be served eventually.
    pub fn units(&self, bytes: usize) -> u32 {
        if bytes <= self.small {
            return 0;
        }
        u32::try_from(bytes.min(self.total)).unwrap_or(u32::MAX)
    }

    /// Waits (at most [`PayloadBudget::wait`]) for room for `bytes`.
    ///
    /// # Errors
    /// [`Busy`] when the budget stayed full for the whole wait.
    pub async fn acquire(&self, bytes: usize) -> Result<PayloadPermit, Busy> {
        let units = self.units(bytes);
        if units == 0 {
            return Ok(PayloadPermit::default());
        }
        let acquire = self.semaphore.clone().acquire_many_owned(units);
        match tokio::time::timeout(self.wait, acquire).await {
            Ok(Ok(permit)) => Ok(permit.into()),
            // The semaphore is never closed; treat it like a full budget if it were.
            Ok(Err(_)) | Err(_) => {
                crate::metrics::payload_budget_refused();
                Err(self.busy())
            }
        }
    }

    /// Waits for room for `bytes` as long as it takes, in turn with every other waiter; for
    /// callers bounded by a timeout of their own (a socket write).
    pub async fn acquire_queued(&self, bytes: usize) -> PayloadPermit {
        let units = self.units(bytes);
        if units == 0 {
            return PayloadPermit::default();
        }
        match self.semaphore.clone().acquire_many_owned(units).await {
            Ok(permit) => permit.into(),
            // Never closed; an empty permit only undercounts.
            Err(_) => PayloadPermit::default(),
        }
    }

    /// A handle for code that acquires from inside `poll` functions (the WebSocket read
    /// gate).
    pub fn poll_semaphore(&self) -> PollSemaphore {
        PollSemaphore::new(self.semaphore.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn large_payloads_share_the_budget_and_the_excess_is_refused() {
        let budget = PayloadBudget::new(100, 10, Duration::from_millis(500));
        // Small payloads cost nothing, however many.
        let small: Vec<_> = futures_util::future::join_all((0..50).map(|_| budget.acquire(10)))
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(budget.in_use(), 0);
        drop(small);
        let a = budget.acquire(60).await.unwrap();
        let b = budget.acquire(40).await.unwrap();
        assert_eq!(budget.in_use(), 100);
        assert_eq!(a.bytes() + b.bytes(), 100);
        // Full: the next one waits out the wait and is refused.
        let refused = budget.acquire(11).await.unwrap_err();
        assert!(refused.retry_after >= Duration::from_secs(1));
        // Room again once a holder is done.
        drop(a);
        let c = budget.acquire(60).await.unwrap();
        assert_eq!(budget.in_use(), 100);
        drop((b, c));
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_payload_gets_room_freed_during_its_wait() {
        let budget = Arc::new(PayloadBudget::new(100, 10, Duration::from_secs(5)));
        let held = budget.acquire(100).await.unwrap();
        let waiter = {
            let budget = budget.clone();
            async move { budget.acquire(50).await }
        };
        let release = async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(held);
        };
        let (got, ()) = tokio::join!(waiter, release);
        assert_eq!(got.unwrap().bytes(), 50);
    }

    #[test]
    fn permits_merge_and_oversized_payloads_are_clamped() {
        let budget = PayloadBudget::new(100, 10, Duration::from_secs(1));
        assert_eq!(budget.units(10), 0);
        assert_eq!(budget.units(11), 11);
        assert_eq!(budget.units(1000), 100);
        let sem = budget.poll_semaphore().into_inner();
        let mut permit = PayloadPermit::default();
        permit.merge(sem.clone().try_acquire_many_owned(20).unwrap().into());
        permit.merge(sem.try_acquire_many_owned(30).unwrap().into());
        permit.merge(PayloadPermit::default());
        assert_eq!(permit.bytes(), 50);
        assert_eq!(budget.in_use(), 50);
    }
}
