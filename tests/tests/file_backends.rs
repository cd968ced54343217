//! The file-backend suite against NIXL POSIX and the native io_uring engine: per-key files,
//! the static pool, and segment stores (`layout: segments`).

use kv_integration_tests::{file_suite, nixl_posix, uring};

macro_rules! file_backends {
    ($engine:ident) => {
        mod $engine {
            use super::*;

            #[test]
            fn dynamic_round_trip_buffered() {
                file_suite::dynamic_round_trip($engine(), false, false);
            }

            #[test]
            fn dynamic_round_trip_o_direct_sharded() {
                file_suite::dynamic_round_trip($engine(), true, true);
            }

            #[test]
            fn restart_finds_the_data_again() {
                file_suite::restart_recovery(&$engine);
            }

            #[test]
            fn damaged_and_foreign_files_read_as_misses() {
                file_suite::corruption_reads_as_miss($engine());
            }

            #[test]
            fn path_traversal_keys_are_rejected() {
                file_suite::hostile_keys_rejected($engine());
            }

            #[test]
            fn temporaries_are_removed_at_open() {
                file_suite::temporaries_removed_at_open($engine());
            }

            #[test]
            fn deleted_files_are_recycled() {
                file_suite::deleted_files_are_recycled($engine());
            }

            #[test]
            fn static_pool_buffered() {
                file_suite::static_pool($engine(), false);
            }

            #[test]
            fn static_pool_o_direct() {
                file_suite::static_pool($engine(), true);
            }

            #[test]
            fn segments_round_trip_buffered() {
                file_suite::segment_round_trip($engine(), false);
            }

            #[test]
            fn segments_round_trip_o_direct() {
                file_suite::segment_round_trip($engine(), true);
            }

            #[test]
            fn segments_restart_finds_the_data_and_the_deletes_again() {
                file_suite::segment_restart_recovery(&$engine);
            }

            #[test]
            fn segments_damaged_foreign_and_torn_data_read_as_misses() {
                file_suite::segment_corruption_reads_as_miss($engine());
            }

            #[test]
            fn segments_refuse_hostile_keys() {
                file_suite::segment_hostile_keys_rejected($engine());
            }

            #[test]
            fn segments_full_store_refuses_then_reuses_freed_segments() {
                file_suite::segment_space_is_reused($engine());
            }
        }
    };
}

file_backends!(nixl_posix);
file_backends!(uring);
