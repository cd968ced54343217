//! NIXL's OBJ and AZURE_BLOB plugins against SeaweedFS and Azurite, started by the tests.

use std::sync::Arc;

use kv_integration_tests::fill_chunk;
use kv_integration_tests::services::{AzuriteServer, S3Server};
use nixl_core::{NixlTransport, PageView, StorageExtent, StorageName, Transport, TransportExt};
use pinned_alloc::PoolConfig;

const CHUNK: usize = 256 << 10;

fn s3_transport(server: &S3Server) -> Arc<dyn Transport> {
    Arc::new(NixlTransport::new(server.nixl_config()).unwrap_or_else(|err| panic!("{err}")))
}

fn azure_transport(server: &AzuriteServer) -> Arc<dyn Transport> {
    Arc::new(NixlTransport::new(server.nixl_config()).unwrap_or_else(|err| panic!("{err}")))
}

fn object_round_trip(transport: Arc<dyn Transport>) {
    let pool = PoolConfig::new(CHUNK, 8 * CHUNK as u64).build().unwrap();
    let _memory = transport.register_pool(&pool).unwrap();
    let ids = [11u64, 12, 13];
    let registrations: Vec<_> = ids
        .iter()
        .map(|&id| transport.register_object(id, CHUNK).unwrap())
        .collect();
    assert!(matches!(
        transport.register_object(11, CHUNK),
        Err(nixl_core::Error::DeviceIdInUse { dev_id: 11 })
    ));
    let mut sources = pool.allocate_batch(3).unwrap();
    for (i, page) in sources.iter_mut().enumerate() {
        fill_chunk(i, page.as_mut_slice());
    }
    let writes: Vec<_> = sources
        .iter()
        .zip(&registrations)
        .map(|(p, r)| (p, StorageExtent::new(r.dev_id(), 0)))
        .collect();
    transport.write_pages(&writes, PageView::Exact).unwrap();
    assert_eq!(
        transport
            .exists(&[
                StorageName::Object(11),
                StorageName::Object(99),
                StorageName::Object(13)
            ])
            .unwrap(),
        vec![true, false, true]
    );
    let mut targets = pool.allocate_batch(3).unwrap();
    let mut reads: Vec<_> = targets
        .iter_mut()
        .zip(&registrations)
        .map(|(p, r)| (p, StorageExtent::new(r.dev_id(), 0)))
        .collect();
    transport.read_pages(&mut reads, PageView::Exact).unwrap();
    drop(reads);
    for (i, (s, t)) in sources.iter().zip(&targets).enumerate() {
        assert!(s.as_slice() == t.as_slice(), "object {i} differs");
    }
    let mut ranged = pool.allocate().unwrap();
    ranged.set_len(4096);
    transport
        .read_pages(
            &mut [(&mut ranged, StorageExtent::new(12, 8192))],
            PageView::Exact,
        )
        .unwrap();
    assert_eq!(
        ranged.as_slice(),
        &sources[1].as_slice()[8192..12288],
        "ranged read"
    );
}

#[test]
fn s3_objects_round_trip_through_seaweedfs() {
    let server = S3Server::start();
    object_round_trip(s3_transport(&server));
}

#[test]
fn azure_blobs_round_trip_through_azurite() {
    let server = AzuriteServer::start();
    object_round_trip(azure_transport(&server));
}
