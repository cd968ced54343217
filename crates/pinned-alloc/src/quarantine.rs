//! Pages kept out of circulation for a while: after a failed transfer an engine may still touch
//! the pages it was given (a straggling retry inside a storage SDK), so they must not go back to
//! their pool, and be handed to another chunk, until that can no longer happen.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::pool::Page;

/// Holds pages for a grace period, then lets them return to their pool.
#[derive(Debug)]
pub struct Quarantine {
    grace: Duration,
    held: Mutex<Vec<(Instant, Vec<Page>)>>,
}

impl Quarantine {
    /// Pages held are released `grace` after they were handed in.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            held: Mutex::new(Vec::new()),
        }
    }

    /// Takes pages out of circulation; releases those whose grace has passed.
    pub fn hold(&self, pages: Vec<Page>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        held.retain(|(since, _)| now.duration_since(*since) < self.grace);
        if !pages.is_empty() {
            held.push((now, pages));
        }
    }

    /// Releases the pages whose grace has passed; returns how many remain held.
    pub fn purge(&self) -> usize {
        self.hold(Vec::new());
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, pages)| pages.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LockMode, PoolConfig};

    #[test]
    fn pages_come_back_only_after_the_grace_period() {
        let pool = PoolConfig::new(4096, 4 * 4096)
            .with_lock(LockMode::Off)
            .build()
            .unwrap();
        let quarantine = Quarantine::new(Duration::from_millis(50));
        quarantine.hold(pool.allocate_batch(3).unwrap());
        assert_eq!(pool.stats().free, 1);
        assert_eq!(quarantine.purge(), 3);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(quarantine.purge(), 0);
        assert_eq!(pool.stats().free, 4);
    }
}
