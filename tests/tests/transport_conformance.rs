//! The same transport suite against NIXL POSIX and the native io_uring engine.

use std::sync::Arc;

use kv_integration_tests::{nixl_posix, suite, uring};
use nixl_core::{NixlConfig, NixlTransport, ThreadSync, Transport};

/// NIXL with no locking inside the agent (`nixl_sync_mode: NONE`): the transport serialises
/// agent calls itself, so the shared transport stays safe from several threads.
fn nixl_posix_unsynchronised() -> Arc<dyn Transport> {
    let config = NixlConfig::new("POSIX").with_thread_sync(ThreadSync::None);
    Arc::new(NixlTransport::new(config).unwrap_or_else(|err| panic!("{err}")))
}

macro_rules! conformance {
    ($engine:ident) => {
        mod $engine {
            use super::*;

            #[test]
            fn one_descriptor_round_trip() {
                suite::round_trip($engine(), 1, false);
            }

            #[test]
            fn scattered_batch_of_256() {
                suite::round_trip($engine(), 256, false);
            }

            #[test]
            fn scattered_batch_of_256_with_o_direct() {
                suite::round_trip($engine(), 256, true);
            }

            #[test]
            fn submitted_batches_own_their_pages() {
                suite::submitted_batches($engine());
            }

            #[test]
            fn unstartable_batch_fails_whole_and_returns_pages() {
                suite::unstartable_batch($engine());
            }

            #[test]
            fn refuses_unregistered_memory_and_storage() {
                suite::refusals($engine());
            }

            #[test]
            fn os_failure_is_a_typed_error() {
                suite::failing_transfer($engine());
            }

            #[test]
            fn existence_per_file() {
                suite::existence($engine());
            }

            #[test]
            fn two_threads_one_transport() {
                suite::two_threads($engine());
            }
        }
    };
}

conformance!(nixl_posix);
conformance!(nixl_posix_unsynchronised);
conformance!(uring);
