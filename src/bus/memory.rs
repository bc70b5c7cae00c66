//! The in-memory bus: publishing hands the payload straight to the local hub.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Bus, BusError, Deliver};

pub struct MemoryBus {
    sink: Arc<dyn Deliver>,
}

impl MemoryBus {
    pub fn new(sink: Arc<dyn Deliver>) -> Self {
        Self { sink }
    }

    /// Called by the memory store, under its lock, so delivery order is history order.
    pub fn publish(&self, channel: &str, payload: &[u8]) {
        self.sink.deliver(channel, payload);
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn subscribe(&self, _channel: &str) -> Result<(), BusError> {
        Ok(())
    }

    fn release(&self, _channel: &str) {}

    fn is_ready(&self) -> bool {
        true
    }
}
