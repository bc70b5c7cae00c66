//! The bus: how events reach every replica, and the hub that hands them to local sessions.
//!
//! Publishing happens inside the store (atomically with the write it announces); the bus
//! owns the receiving side. One subscriber per process listens to the channels that have
//! local members and passes each payload to the [`hub::Hub`], which fans it out to the
//! bounded queues of the local sessions.

use async_trait::async_trait;

mod cluster;
pub mod hub;
pub mod memory;
pub mod redis;

/// Receives bus payloads; implemented by the hub.
pub trait Deliver: Send + Sync + 'static {
    /// One payload published on `channel` (a chat channel name).
    fn deliver(&self, channel: &str, payload: &[u8]);
    /// Whether any local session is in `channel` (the subscriber keeps a subscription
    /// only while this holds).
    fn has_members(&self, channel: &str) -> bool;
    /// Every channel with local members (re-subscribed after a reconnect).
    fn channels(&self) -> Vec<String>;
    /// The bus was disconnected and is back: events published meanwhile were not
    /// received, so local sessions are told to re-read what they may have missed.
    fn resync(&self);
}

/// The bus could not confirm a subscription in time.
#[derive(Debug, thiserror::Error)]
#[error("bus unavailable: {0}")]
pub struct BusError(pub String);

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Makes sure this process receives `channel`'s events; returns once the subscription
    /// is confirmed, so everything published afterwards is delivered.
    async fn subscribe(&self, channel: &str) -> Result<(), BusError>;

    /// Says a channel may have lost its last local member; the subscription is dropped if
    /// the hub confirms it has no members left by the time this is processed.
    fn release(&self, channel: &str);

    /// Whether events are flowing (the subscriber connection is up and subscribed).
    fn is_ready(&self) -> bool;
}
